"""Issue 25: the families of 2026 (Qwen3, SmolLM3, Granite, OLMo 2, Phi-3, Gemma 3 text) through
every command, each a description the one layer loop reads (runtime/features.py), on tiny seeded
configs with each family's features switched on (tests/tiny.py FAMILIES):

- export: ONNX Runtime reproduces transformers at fp32 within 1e-4 of the logit scale, with and
  without the KV cache (contract 1);
- run: the numba runtime's greedy tokens equal transformers' for 32 steps on the fp32 export;
- quantize RTN / GPTQ / AWQ (4-bit) and export: the accuracy_level-0 twin of the file equals the
  packed PyTorch model (export --check), and the numba runtime is as accurate as ONNX Runtime at
  accuracy level 4 against the same file at accuracy level 0 (contract 2: mean max |Δlogit|
  within 1.25x ORT-l4's);
- the CLI: info, quantize, export, run; --rotate refused with its reason;
- bad input: a family outside the table, an unknown layer type, an unimplemented rope type and
  inconsistent export metadata each give one `error:` line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from fuzz_seeds import copy, edit_config  # noqa: E402
from guards import one_line_error  # noqa: E402

import tiny  # noqa: E402
from edgellm.arch import family_of  # noqa: E402
from edgellm.cli import app  # noqa: E402
from edgellm.export.exporter import export_model  # noqa: E402
from edgellm.export.weights import Options  # noqa: E402
from edgellm.modelio import Loaded  # noqa: E402
from edgellm.quant.apply import QuantConfig, quantize_model  # noqa: E402
from edgellm.quant.formats import QuantFormat  # noqa: E402

FAMILIES = list(tiny.FAMILIES)
PROMPT = np.array([5, 17, 100, 3, 77, 250, 9, 11, 400, 12, 33, 7], np.int64)


def _model(family: str, seed: int = 0):
    return tiny.family_model(family, seed)  # random norm weights, logits of order 5


@pytest.fixture(scope="module")
def fp32(tokenizer, tmp_path_factory):
    """{family: (model, export dir, parity figures)}: fp32 exports with `export --check`."""
    root, out = tmp_path_factory.mktemp("families"), {}
    for fam in FAMILIES:
        model = _model(fam)
        res = export_model(Loaded(model, tokenizer, "t", {"steps": []}), root / fam, Options())
        out[fam] = model, root / fam, res.parity
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_onnxruntime_parity_fp32(fp32, family):
    _, path, p = fp32[family]
    scale = p["max_abs_logit"]
    assert scale > 1.0 and p["decode_steps"] == 8
    assert p["max_abs_diff"] <= 1e-4 * scale, p
    assert p["cache_vs_nocache_max_abs_diff"] <= 1e-4 * scale, p
    cfg = json.loads(
        next(m.value for m in _meta(path) if m.key == "edgellm.config")
    )  # the family's description is in the file
    assert cfg["architecture"] == family


def _meta(path):
    import onnx

    return onnx.load(str(path / "model.onnx"), load_external_data=False).metadata_props


def _torch_greedy(model, prompt, n) -> tuple[list[int], np.ndarray]:
    ids = list(prompt)
    with torch.inference_mode():
        first = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :], first


@pytest.mark.parametrize("family", FAMILIES)
def test_numba_greedy_equals_transformers(fp32, family):
    from edgellm.runtime.model import NumbaModel

    model, path, _ = fp32[family]
    want, ref = _torch_greedy(model, PROMPT.tolist(), 32)
    nm = NumbaModel(path, n_ctx=128, threads=2)
    got = nm.forward(PROMPT, all_logits=True)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    ids = []
    for _ in range(32):
        ids.append(int(got.argmax(-1).reshape(-1)[-1]))
        got = nm.forward([ids[-1]])
    nm.close()
    assert ids == want


def _calib(n=8, t=32):
    return torch.randint(1, tiny.VOCAB, (n, t), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_quantized_export_parity(tokenizer, tmp_path, family, method):
    """Quantize (4-bit g32, 8-bit embeddings), export with --check: the accuracy_level 0 twin
    equals the packed PyTorch model within 1e-3 (AWQ's folding into each family's norms exact)."""
    model = _model(family)
    cfg = QuantConfig(fmt=QuantFormat(4, 32, True), method=method, embeddings="8")
    _, info = quantize_model(model, cfg, _calib())
    assert len(info["modules"]) == 4 * sum(len(m) for _, m in family_of(model.config).linears)
    res = export_model(Loaded(model, tokenizer, "t", {"steps": [], "quantization": info}), tmp_path / "q", Options())
    assert res.parity["accuracy_level_0_max_abs_diff"] <= 1e-3, res.parity


@pytest.mark.parametrize("family", FAMILIES)
def test_numba_as_accurate_as_onnxruntime_level4(tokenizer, tmp_path, family):
    """Contract 2 on a quantized export of each family: against the file exported at accuracy
    level 0 (fp32 activations, run by ONNX Runtime: the truth), the numba runtime's mean max
    |Δlogit| over the prompt positions and decode steps is within 1.25x ORT's at level 4."""
    from edgellm.runtime.model import NumbaModel
    from edgellm.runtime.ort_backend import OrtModel

    model = _model(family)
    _, info = quantize_model(model, QuantConfig(fmt=QuantFormat(4, 32, True), method="rtn"), _calib(2))
    rec = {"steps": [], "quantization": info}
    for level in (0, 4):
        export_model(Loaded(model, tokenizer, "t", rec), tmp_path / f"l{level}", Options(accuracy_level=level), False)
    truth, ort4 = OrtModel(tmp_path / "l0", threads=2), OrtModel(tmp_path / "l4", threads=2)
    nm = NumbaModel(tmp_path / "l4", n_ctx=128, threads=2)
    t = truth.forward(PROMPT, all_logits=True)
    e_ort, e_nb = (
        [np.abs(ort4.forward(PROMPT, all_logits=True) - t).max(-1)],
        [np.abs(nm.forward(PROMPT, all_logits=True) - t).max(-1)],
    )
    tok = int(t[-1].argmax())
    for _ in range(16):
        t = truth.forward([tok])
        e_ort.append([np.abs(ort4.forward([tok]) - t).max()])
        e_nb.append([np.abs(nm.forward([tok]) - t).max()])
        tok = int(t.argmax())
    nm.close()
    m_ort, m_nb = np.concatenate(e_ort).mean(), np.concatenate(e_nb).mean()
    assert m_nb <= 1.25 * m_ort, (m_nb, m_ort)


# ----------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def family_dirs(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("family-dirs")
    return {fam: tiny.save(_model(fam), tokenizer, root / fam) for fam in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_info_quantize_export_run(family_dirs, tmp_path, family):
    runner, src = CliRunner(), family_dirs[family]
    r = runner.invoke(app, ["info", str(src)])
    assert r.exit_code == 0 and family in r.output, r.output
    q = tmp_path / "q4"
    r = runner.invoke(app, ["quantize", str(src), "--bits", "4", "--method", "rtn", "--no-eval", "-o", str(q)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["export", str(q), "-o", str(tmp_path / "onnx")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["info", str(tmp_path / "onnx")])
    assert r.exit_code == 0 and family in r.output, r.output
    r = runner.invoke(
        app, ["run", str(tmp_path / "onnx"), "-p", "def f(x):", "-n", "4", "--temperature", "0", "--threads", "1"]
    )
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("family", ["qwen3", "olmo2", "gemma3_text"])
def test_rotate_refused_with_reason(family_dirs, tmp_path, family):
    line = one_line_error(["quantize", str(family_dirs[family]), "--rotate", "--no-eval", "-o", str(tmp_path / "o")])
    assert "--rotate" in line and family in line
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- bad input
def _edit_hf(src: Path, dst: Path, **changes) -> Path:
    copy(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    "changes,says",
    [
        (dict(model_type="gpt_neox"), "architecture 'gpt_neox' is not supported"),
        (dict(layer_types=["full_attention", "chunked_attention"] * 2), "layer_types"),
        (
            dict(rope_parameters={"rope_type": "proportional", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
            "rope_type 'proportional'",
        ),
    ],
    ids=["family", "layer_types", "rope_type"],
)
@pytest.mark.parametrize("command", ["info", "quantize", "export"])
def test_unsupported_configs_one_line(family_dirs, tmp_path, changes, says, command):
    src = _edit_hf(family_dirs["qwen3"], tmp_path / "m", **changes)
    out = tmp_path / "out"
    args = [command, str(src)] + ([] if command == "info" else ["-o", str(out)])
    args += ["--no-eval"] if command == "quantize" else []
    line = one_line_error(args)
    assert says in line and "supported" in line, line
    assert not out.exists()


@pytest.mark.parametrize(
    "changes,says",
    [
        (dict(norm_placement="sideways"), "norm_placement"),
        (dict(qk_norm="row"), "qk_norm"),
        (dict(rope_dims=7), "rope_dims"),
        (dict(layer_rope=["global", "local", "none", "global"]), "rope_local_theta"),
        (dict(layer_rope=["global"]), "layer_rope"),
        (dict(rope_local_theta=1e4), "rope_local_theta"),
        (dict(residual_multiplier=-1), "residual_multiplier"),
        (dict(norm="layer"), "qk_norm"),
    ],
)
def test_inconsistent_export_metadata_one_line(fp32, tmp_path, changes, says):
    """A Qwen3 export (q/k norm per head) with its metadata edited: one line naming the field."""
    path = edit_config(copy(fp32["qwen3"][1], tmp_path / "m"), **changes)
    line = one_line_error(["run", str(path), "-p", "x", "-n", "1"])
    assert says in line and "expected" in line, line


# ----------------------------------------------------------------------------- kernels (contract 3)
@pytest.mark.parametrize("t", [1, 5])
def test_family_kernels_against_references(t):
    """The kernels the description adds, against their numpy references on odd shapes."""
    from edgellm.runtime.kernels import family as F
    from edgellm.runtime.kernels import layers as Lk

    rng = np.random.default_rng(t)
    nh, nkv, hd, rot = 3, 1, 12, 8
    x = rng.standard_normal((t, (nh + 2 * nkv) * hd)).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(hd)).astype(np.float32)
    y = x.copy()
    F.rms_norm_cols(y, 0, nh, hd, w.ctypes.data, np.float32(1e-6))
    np.testing.assert_allclose(y, F.ref_rms_norm_cols(x, 0, nh, hd, w, 1e-6), rtol=1e-5, atol=1e-5)
    wp = (1 + 0.1 * rng.standard_normal(nh * hd)).astype(np.float32)
    y = x.copy()
    F.rms_norm_cols(y, 0, 1, nh * hd, wp.ctypes.data, np.float32(1e-6))
    np.testing.assert_allclose(y, F.ref_rms_norm_cols(x, 0, 1, nh * hd, wp, 1e-6), rtol=1e-5, atol=1e-5)
    gu = rng.standard_normal((t, 2 * 13)).astype(np.float32) * 3
    out = np.empty((t, 13), np.float32)
    F.geglu(gu, 13, out)
    np.testing.assert_allclose(out, F.ref_geglu(gu, 13), rtol=1e-5, atol=1e-5)
    y = gu.copy()
    F.scale_cap(y, np.float32(0.4), np.float32(2.0))
    np.testing.assert_allclose(y, F.ref_scale_cap(gu, 0.4, 2.0), rtol=1e-5, atol=1e-6)
    cos, sin = Lk.rope_tables(16, Lk.rope_inv_freq(rot, 10000.0, None))
    y, pos0 = x.copy(), 3
    Lk.rope(y, 0, nh, hd, pos0, cos, sin, rot)
    ref = F.ref_rope_partial(x[:, : nh * hd].reshape(t, nh, hd), np.arange(pos0, pos0 + t), cos, sin)
    np.testing.assert_allclose(y[:, : nh * hd], ref.reshape(t, -1), rtol=1e-5, atol=1e-5)
    # attention with the family's scale and soft-cap, both paths
    ctx = pos0 + t
    q = rng.standard_normal((t, nh * hd)).astype(np.float32)
    kc, vc = (rng.standard_normal((nkv, ctx, hd)).astype(np.float32) for _ in range(2))
    want = Lk.ref_attention(q.reshape(t, nh, hd), kc, vc, pos0, 2, 0.3, 5.0).reshape(t, -1)
    for fn in (Lk.attention, Lk.attention_mat):
        o = np.zeros((t, nh * hd), np.float32)
        kt, vt = Lk.kv_layout(kc, 4), Lk.kv_layout(vc, 4)
        fn(q, kt, vt, pos0, nh, nkv, hd, o, np.zeros((t * nh, ctx), np.float32), 2, 0.3, 5.0)
        np.testing.assert_allclose(o, want, rtol=1e-4, atol=1e-5)
