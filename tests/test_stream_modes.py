"""Layer-streaming `quantize --rotate` and `--target-bpw` (issue 26): the same bits and the same
plan as the resident path on a tiny multi-layer model, resumable, planned against --max-memory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import tiny
from edgellm.errors import EdgeLLMError
from edgellm.pipeline.quantize import Method, QuantizeOptions, _run_resident, quant_config, run_quantize

SMALL = dict(calib_samples=8, seq_len=64, eval_tokens=1024, method=Method.rtn)


@pytest.fixture(scope="module")
def deep(tmp_path_factory, tokenizer):
    """{name: dir}: 3-layer llama (width 96 = 3 x 32: the rotation's odd factor) and a tied qwen2,
    stored in bf16, with norm scales far from 1 so that the fusion matters."""
    root = tmp_path_factory.mktemp("deep")
    out = {}
    for name, fam, kw in (("llama", "llama", dict(hidden_size=96)), ("qwen2", "qwen2", {})):
        model = tiny.build(fam, num_hidden_layers=3, **kw)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.uniform_(0.5, 1.5)
        out[name] = tiny.save(model.to(torch.bfloat16), tokenizer, root / name)
    return out


class _Notes:
    """A progress object that keeps the notes (and can interrupt once a line starts with `stop`)."""

    def __init__(self, stop: str | None = None):
        self.stop, self.lines = stop, []

    def track(self, iterable, description="", total=None):
        return iterable

    def status(self, message):
        import contextlib

        return contextlib.nullcontext()

    def note(self, message):
        self.lines.append(message)
        if self.stop and message.startswith(self.stop):
            raise KeyboardInterrupt


def _same(a_dir, b_dir):
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _both(model, tmp_path, progress=None, **kw):
    o = QuantizeOptions(**{**SMALL, **kw})
    resident = _run_resident(str(model), tmp_path / "resident", o, quant_config(o), None, False)
    streamed = run_quantize(str(model), tmp_path / "streamed", o, progress=progress)
    _same(tmp_path / "resident", tmp_path / "streamed")
    assert resident.info == streamed.info
    assert resident.before.perplexity == pytest.approx(streamed.before.perplexity, rel=1e-6)
    assert resident.after.perplexity == pytest.approx(streamed.after.perplexity, rel=1e-6)
    return resident, streamed


@pytest.mark.parametrize(
    "name, kw",
    [
        ("llama", dict(embeddings="8")),  # untied, the embedding and head quantized as they are rotated
        ("qwen2", dict(embeddings="keep")),  # tied: untied by the rotation, both written in fp32 row by row
    ],
)
def test_rotate_streamed_is_bit_identical(name, kw, deep, tmp_path, monkeypatch):
    from edgellm.quant import rotation

    monkeypatch.setattr(rotation, "ROT_CHUNK", 100)  # 512 rows: six chunks, the last one short
    notes = _Notes()
    _, streamed = _both(deep[name], tmp_path, progress=notes, rotate=True, **kw)
    assert streamed.info["rotation"]["untied"] == (name == "qwen2") and streamed.info["tied"] is False
    assert json.loads((tmp_path / "streamed" / "config.json").read_text())["tie_word_embeddings"] is False
    assert any(line.startswith("rotated the embedding and head") for line in notes.lines)
    assert [line.split(" done")[0] for line in notes.lines if line.startswith("layer ")] == [
        f"layer {i}/3" for i in (1, 2, 3)
    ]
    assert not list(tmp_path.glob(".*partial*"))


def test_target_bpw_streamed_plans_the_same(deep, tmp_path):
    notes = _Notes()
    # 5.0 bits/weight: width 96 fits groups of 32 at the least (4.5), so 5.0 leaves room to mix
    resident, streamed = _both(deep["llama"], tmp_path, progress=notes, target_bpw=5.0, rotate=True)
    mixed = streamed.info["mixed"]
    assert mixed == resident.info["mixed"] and len(mixed["units"]) == 4 * 3
    assert len({(u["bits"], u["group_size"], u["sym"], u["zero"]) for u in mixed["units"]}) > 1  # really mixed
    assert [line.split(" done")[0] for line in notes.lines if line.startswith("sensitivity layer")] == [
        f"sensitivity layer {i}/3" for i in (1, 2, 3)
    ]


def test_sensitivity_streams_spilled_to_disk_give_the_same_table(deep, tmp_path):
    """The probe streams written to and read back from the work folder (as when memory is short)."""
    from edgellm.checkpoint import Checkpoint
    from edgellm.data import calibration_batch
    from edgellm.modelio import load_model
    from edgellm.quant.mixed import sensitivity
    from edgellm.quant.mixed_stream import Streams, sensitivity_streamed
    from edgellm.quant.stream import StoredEmbedding, _load_block, _shell

    loaded = load_model(deep["qwen2"])  # fp32, as the resident pass holds it
    calib = calibration_batch(torch.arange(4096) % tiny.VOCAB, 4, 64, seed=0)
    ref = sensitivity(loaded.model, calib)
    ckpt = Checkpoint(deep["qwen2"])
    shell = _shell(loaded.model.config, StoredEmbedding(ckpt.get("model.embed_tokens.weight")))
    layers = shell.model.layers
    norm, head = loaded.model.model.norm, loaded.model.lm_head
    streams = Streams(tmp_path / "spill")
    got = sensitivity_streamed(
        shell,
        lambda bi: _load_block(shell, bi, ckpt, f"model.layers.{bi}"),
        lambda bi: layers[bi].to_empty(device="meta"),
        calib,
        lambda: lambda h: head(norm(h)),
        None,
        streams,
        lambda line: None,
        _Notes(),
    )
    assert got == ref and not list((tmp_path / "spill").iterdir())


@pytest.fixture(scope="module")
def bpw_whole(deep, tmp_path_factory):
    """An uninterrupted streamed --target-bpw run to compare the resumed ones with."""
    out = tmp_path_factory.mktemp("bpw") / "whole"
    return out, run_quantize(str(deep["llama"]), out, QuantizeOptions(**SMALL, target_bpw=4.5))


@pytest.mark.parametrize("stop", ["sensitivity layer 2/3", "layer 1/3"])
def test_target_bpw_resumes(stop, deep, bpw_whole, tmp_path):
    """Interrupted in the sensitivity pass, --resume runs it again (its state is every probe stream:
    not kept); interrupted after it, --resume keeps its table and continues from the layer reached."""
    from edgellm.quant.stream import work_dir

    o = dict(SMALL, target_bpw=4.5)
    whole_dir, whole = bpw_whole
    out = tmp_path / "q"
    with pytest.raises(KeyboardInterrupt):
        run_quantize(str(deep["llama"]), out, QuantizeOptions(**o), progress=_Notes(stop))
    assert not out.exists()
    notes = _Notes()
    resumed = run_quantize(str(deep["llama"]), out, QuantizeOptions(**o, resume=True), progress=notes)
    _same(whole_dir, out)
    assert resumed.info == whole.info and not work_dir(out).exists()
    ran_again = any(line.startswith("sensitivity layer 1/3") for line in notes.lines)
    assert ran_again == stop.startswith("sensitivity")
    if not ran_again:
        assert any(line.startswith("resuming at layer 2/3") for line in notes.lines)


def test_rotate_resumes_and_refuses_other_options(deep, tmp_path):
    o = dict(SMALL, rotate=True)
    run_quantize(str(deep["qwen2"]), tmp_path / "whole", QuantizeOptions(**o))
    out = tmp_path / "q"
    with pytest.raises(KeyboardInterrupt):
        run_quantize(str(deep["qwen2"]), out, QuantizeOptions(**o), progress=_Notes("layer 2/3"))
    with pytest.raises(EdgeLLMError, match="other options"):
        run_quantize(str(deep["qwen2"]), out, QuantizeOptions(**dict(o, seed=1), resume=True))
    run_quantize(str(deep["qwen2"]), out, QuantizeOptions(**o, resume=True))
    _same(tmp_path / "whole", out)


def test_plan_counts_the_rotation_and_the_sensitivity_pass(deep, monkeypatch):
    from edgellm.checkpoint import Checkpoint
    from edgellm.modelio import load_config
    from edgellm.quant import stream

    monkeypatch.setattr(stream, "rss", lambda: 300 << 20)  # the process's own size: fixed, so plans compare
    monkeypatch.setattr(stream, "ROW_CHUNK", 64)  # or the embedding chunks outweigh a tiny layer
    config, ckpt = load_config(str(deep["llama"])), Checkpoint(deep["llama"])

    def plan(budget=10**12, **kw):
        o = QuantizeOptions(**{**SMALL, **kw})
        return stream.plan_stream(config, ckpt, quant_config(o), 8, 256, 0, budget)

    plain, rot, mixed = plan(), plan(rotate=True), plan(target_bpw=4.5)
    assert rot.need > plain.need and rot.parts["layer"] > plain.parts["layer"]  # the rotation's chunks
    assert rot.parts["process"] == plain.parts["process"] + 8 * 96 * 96  # Q, float64
    assert mixed.parts["sensitivity"] > 0 and mixed.need >= plain.need and not mixed.spill
    # a budget between the two: the probe streams go to disk rather than the run being refused
    spilled = plan(budget=mixed.need - 1, target_bpw=4.5)
    assert spilled.spill and spilled.need < mixed.need
    with pytest.raises(EdgeLLMError, match="needs about"):
        plan(budget=plain.need // 4, rotate=True)
