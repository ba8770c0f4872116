"""The streamed weights on 2 MiB pages (runtime/hugepages.py): same bytes, same logits, where they live."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from edgellm.cli import app
from edgellm.runtime import hugepages
from edgellm.runtime.hugepages import HUGE, Arena


@pytest.fixture(scope="module")
def q4_export(tiny_dirs, tmp_path_factory):
    root, runner = tmp_path_factory.mktemp("huge"), CliRunner()
    q = root / "llama-q4"
    args = ["quantize", str(tiny_dirs["llama"]), "--bits", "4", "--group-size", "32", "--method", "rtn", "--no-eval"]
    r = runner.invoke(app, [*args, "-o", str(q)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["export", str(q), "-o", str(root / "onnx"), "--no-check"])
    assert r.exit_code == 0, r.output
    return root / "onnx"


def test_arena_places_copies_aligned(monkeypatch):
    monkeypatch.setattr(hugepages, "wanted", lambda: True)
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (5, 3, 7), dtype=np.uint8), rng.standard_normal((33,)).astype(np.float32)]
    arena = Arena.open(arrays)
    placed = [arena.place(a) for a in arrays]
    assert placed[0].ctypes.data % HUGE == 0  # the arena starts on a huge page boundary
    for a, p in zip(arrays, placed):
        assert p.ctypes.data % 64 == 0 and p.dtype == a.dtype and p.shape == a.shape
        assert np.array_equal(a, p) and not np.shares_memory(a, p)
    assert placed[1].ctypes.data >= placed[0].ctypes.data + arrays[0].nbytes + hugepages.PAD
    with pytest.raises(ValueError, match="full"):
        arena.place(arrays[1])


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("EDGELLM_HUGEPAGES", "0")
    assert not hugepages.wanted() and Arena.open([np.zeros(8, np.uint8)]) is None


def _greedy(path, n=12):
    from edgellm.runtime.model import NumbaModel

    m = NumbaModel(path, n_ctx=64, threads=1)
    logits = [m.forward(np.array([5, 17, 100, 3], np.int64), prompt=True)]
    for _ in range(n):
        logits.append(m.forward(np.array([int(np.argmax(logits[-1]))], np.int64)))
    return m, np.stack(logits)


def test_same_logits_and_weights_in_the_arena(q4_export, monkeypatch):
    monkeypatch.setenv("EDGELLM_HUGEPAGES", "0")
    off, ref = _greedy(q4_export)
    assert off.weights.arena is None
    monkeypatch.setenv("EDGELLM_HUGEPAGES", "1")
    monkeypatch.setattr(hugepages, "wanted", lambda: True)  # whatever this kernel's THP mode
    on, got = _greedy(q4_export)
    assert np.array_equal(ref, got)  # bit for bit: the same bytes, read from elsewhere
    # run --verbose says where they live
    assert off.weight_pages == "file map" and on.weight_pages.startswith(f"{HUGE >> 20} MiB pages (")
    arena = on.weights.arena
    lo = arena._buf.ctypes.data
    inside = lambda d: lo <= d.w_addr < lo + arena.size  # noqa: E731
    rows = on.weights.layers.view(np.recarray)
    assert all(inside(getattr(r, role)) for r in rows for role in ("qkv", "o", "up", "down"))
    assert inside(on.weights.model.head)
    tied = on.config.tie_word_embeddings
    assert inside(on.weights.model.embed) == tied  # an untied embedding (one row a step) stays in the file map
    on.close()
    off.close()


def test_copied_in_chunks_each_released(monkeypatch):
    """A big tensor is copied a chunk at a time and each copied piece handed to `release` (the
    loader drops its file pages), so it never sits in memory twice."""
    monkeypatch.setattr(hugepages, "wanted", lambda: True)
    monkeypatch.setattr(hugepages, "CHUNK", 48)
    a = np.arange(50, dtype=np.int32).reshape(5, 10)  # 200 bytes: chunks of 48, 48, 48, 48, 8
    pieces = []
    arena = Arena.open([a])
    p = arena.place(a, release=lambda piece: pieces.append(piece.copy()))
    assert np.array_equal(p, a)
    assert [x.nbytes for x in pieces] == [48, 48, 48, 48, 8]
    assert np.array_equal(np.concatenate(pieces).view(np.int32), a.reshape(-1))
    b = np.asfortranarray(np.ones((4, 3), np.float32))  # not C-contiguous: copied whole, nothing to release
    arena2 = Arena.open([b])
    assert np.array_equal(arena2.place(b, release=lambda piece: pieces.append(None)), b) and pieces[-1] is not None
