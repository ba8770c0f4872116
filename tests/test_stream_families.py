"""Issue 26, the families gap: every family the resident paths support streams through the same
code (quantize, eval, prune, export), equal to the resident path. Each tiny model has what sets
its family apart switched on (tests/tiny.py FAMILIES) and, where the family has them, layers of
both kinds: Gemma 3's sliding and global layers (local and global rope bases), Qwen3 / SmolLM3
with sliding layers (SmolLM3's NoPE layers too), so a block run with block 0's mask or rotary
table shows in the perplexity."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402
from edgellm.cli import app  # noqa: E402
from edgellm.pipeline.quantize import Method, QuantizeOptions, _run_resident, quant_config, run_quantize  # noqa: E402

FAMILIES = list(tiny.FAMILIES)  # qwen3, smollm3, granite, olmo2, phi3, gemma3_text
# layer types on top of tiny.FAMILIES (gemma3_text has them already: layer 2 is global)
LAYER_TYPES = {
    "qwen3": dict(use_sliding_window=True, sliding_window=6, max_window_layers=2),
    "smollm3": dict(use_sliding_window=True, sliding_window=6),
}
SMALL = dict(calib_samples=8, seq_len=64, eval_tokens=1024)


@pytest.fixture(scope="module")
def family_dirs(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("stream-families")
    return {f: tiny.save(tiny.family_model(f, **LAYER_TYPES.get(f, {})), tokenizer, root / f) for f in FAMILIES}


class _Streams:
    """A progress object that records the streamed driver's notes (proof the streamed path ran)."""

    def __init__(self):
        self.notes = []

    def track(self, iterable, description="", total=None):
        return iterable

    def status(self, message):
        import contextlib

        return contextlib.nullcontext()

    def note(self, message):
        self.notes.append(message)


def _both(src, tmp_path, **kw):
    o = QuantizeOptions(**{**SMALL, **kw})
    resident = _run_resident(str(src), tmp_path / "resident", o, quant_config(o), None, False)
    progress = _Streams()
    streamed = run_quantize(str(src), tmp_path / "streamed", o, progress=progress)
    assert any(n.startswith("streaming 4 layers") for n in progress.notes), progress.notes
    a = load_file(str(tmp_path / "resident" / "model.safetensors"))
    b = load_file(str(tmp_path / "streamed" / "model.safetensors"))
    assert a.keys() == b.keys()
    return resident, streamed, a, b


def test_the_layers_differ_by_type(family_dirs):
    """The configs really give blocks different keyword arguments (else the tests below prove little)."""
    from edgellm.calibration import capture_layer_inputs
    from edgellm.modelio import load_config
    from edgellm.skeleton import skeleton_model

    for f in ("qwen3", "smollm3", "gemma3_text"):
        config = load_config(str(family_dirs[f]))
        model = skeleton_model(config)
        model.get_input_embeddings().to_empty(device="cpu")
        _, kw = capture_layer_inputs(model, torch.zeros(1, 16, dtype=torch.long), 1)
        masks = [k["attention_mask"] for k in kw.table[0]]
        assert any(m is not masks[0] for m in masks), f


def test_the_memory_plan_reads_the_family_linears(family_dirs):
    """Phi-3's fused qkv_proj / gate_up_proj are each their own statistics, in forward order; the
    q/k/v (gate/up) of the others share one (what quantize_block holds at once)."""
    from edgellm.arch import FAMILIES as ARCH
    from edgellm.checkpoint import Checkpoint
    from edgellm.quant.stream import _layer_linears

    def plan(f):
        rows = _layer_linears(Checkpoint(family_dirs[f]), "model.layers.0.", ARCH[f])
        return [(n.split("layers.0.")[1][: -len(".weight")], key.startswith("model.")) for n, _, _, key in rows]

    assert plan("phi3") == [
        (f"{m}", True) for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    ]
    assert [own for _, own in plan("gemma3_text")] == [False, False, False, True, False, False, True]


@pytest.mark.parametrize("family", FAMILIES)
def test_rtn_streamed_is_bit_identical(family, family_dirs, tmp_path):
    resident, streamed, a, b = _both(family_dirs[family], tmp_path, method=Method.rtn)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert resident.info == streamed.info
    assert resident.before.perplexity == pytest.approx(streamed.before.perplexity, rel=1e-6)
    assert resident.after.perplexity == pytest.approx(streamed.after.perplexity, rel=1e-6)


@pytest.mark.parametrize("family", ["qwen3", "phi3", "gemma3_text"])
def test_gptq_streamed_matches_resident(family, family_dirs, tmp_path):
    """GPTQ calibrates every block on what reaches it, with its own mask and rotary table in both paths."""
    resident, streamed, a, b = _both(family_dirs[family], tmp_path, method=Method.gptq, evaluate=False)
    for k in a:
        if k.endswith("qweight") and "layers" in k:  # float noise may flip a rare rounding
            assert (a[k] == b[k]).float().mean() > 0.999, k
        else:
            assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-6), k


@pytest.mark.parametrize(
    "family,kw",
    [
        ("phi3", dict(method=Method.awq)),  # AWQ's scales fold into the fused qkv_proj / gate_up_proj
        ("gemma3_text", dict(method=Method.awq)),  # ... and into Gemma's 1 + w norms
        # the sensitivity pass: each block with its own kwargs, the KL on the logits the model's forward
        # makes (Gemma 3's softcapping, Granite's logits_scaling), in both paths
        ("gemma3_text", dict(method=Method.rtn, target_bpw=4.5, seq_len=128)),
        ("granite", dict(method=Method.rtn, target_bpw=4.5, seq_len=128)),
    ],
    ids=["phi3-awq", "gemma3-awq", "gemma3-mixed", "granite-mixed"],
)
def test_awq_and_mixed_streamed_are_bit_identical(family, kw, family_dirs, tmp_path):
    resident, streamed, a, b = _both(family_dirs[family], tmp_path, **kw)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert resident.info == streamed.info
    assert resident.after.perplexity == pytest.approx(streamed.after.perplexity, rel=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_eval_equals_resident(family, family_dirs):
    from edgellm.data import split_tokens
    from edgellm.evaluate import evaluate
    from edgellm.modelio import load_model
    from edgellm.pipeline.common import data_tokens
    from edgellm.pipeline.evaluate import EvalOptions, _run_streamed
    from edgellm.progress import NULL

    src = str(family_dirs[family])
    o = EvalOptions(ctx=64, stride=32, eval_tokens=512)
    got = _run_streamed(src, o, 32, NULL).quality  # None would mean it did not stream
    m = load_model(src)
    want = evaluate(m.model, split_tokens(data_tokens(m.tokenizer, None), "eval"), ctx=64, stride=32, max_tokens=512)
    assert got.tokens == want.tokens and got.perplexity == pytest.approx(want.perplexity, rel=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_prune_equals_resident(family, family_dirs, tmp_path, monkeypatch):
    import edgellm.pipeline.prune as pipeline_prune
    from edgellm.pipeline.prune import PruneOptions, run_prune

    o = PruneOptions(method="wanda", calib_samples=4, seq_len=64, eval_tokens=1024)
    real, ran = pipeline_prune._run_streamed, []

    def spy(*args, **kwargs):
        ran.append(real(*args, **kwargs))
        return ran[-1]

    monkeypatch.setattr(pipeline_prune, "_run_streamed", spy)
    streamed = run_prune(str(family_dirs[family]), tmp_path / "s", o)
    assert ran and ran[0] is not None  # it streamed
    monkeypatch.setattr(pipeline_prune, "_run_streamed", lambda *a, **k: None)  # the resident path
    resident = run_prune(str(family_dirs[family]), tmp_path / "r", o)
    a, b = load_file(str(tmp_path / "s" / "model.safetensors")), load_file(str(tmp_path / "r" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert streamed.result == resident.result
    assert streamed.before.perplexity == pytest.approx(resident.before.perplexity, rel=1e-6)
    assert streamed.after.perplexity == pytest.approx(resident.after.perplexity, rel=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_export_equals_resident(family, family_dirs, tmp_path):
    from edgellm.export.exporter import export_model
    from edgellm.modelio import load_model
    from edgellm.pipeline.export import ExportOptions, run_export

    o = QuantizeOptions(method=Method.rtn, calib_samples=4, seq_len=32, evaluate=False)
    q = run_quantize(str(family_dirs[family]), tmp_path / "q", o).output
    export_model(load_model(str(q)), tmp_path / "resident", check=False)
    res = run_export(str(q), tmp_path / "streamed", ExportOptions(check=False))
    assert res.plan.check == "none"  # the streamed export ran
    for name in ("model.onnx", "model.onnx.data", "config.json", "genai_config.json"):
        assert (tmp_path / "resident" / name).read_bytes() == (tmp_path / "streamed" / name).read_bytes(), name


def test_layer_by_layer_export_check_gemma3(family_dirs, tmp_path, monkeypatch):
    """The layer-by-layer parity check runs each layer with its own mask (Gemma 3's global layer 2)
    and the head with the final softcapping: it passes on a correct export."""
    from edgellm.export import stream as export_stream
    from edgellm.pipeline.export import ExportOptions, run_export

    monkeypatch.setattr(export_stream, "FULL_CHECK_MAX_BYTES", 0)
    res = run_export(str(family_dirs["gemma3_text"]), tmp_path / "e", ExportOptions())
    assert res.parity["check"] == "layer by layer" and res.parity["layer_exact_max_rel_diff"] < 1e-5


def test_rotate_is_refused_as_the_resident_path_refuses(family_dirs, tmp_path):
    from edgellm.quant.rotation import check_rotatable

    src = family_dirs["gemma3_text"]
    r = CliRunner().invoke(app, ["quantize", str(src), "-o", str(tmp_path / "q"), "--rotate", "--no-eval"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    from edgellm.modelio import load_model

    with pytest.raises(Exception) as resident:
        check_rotatable(load_model(str(src)).model)
    assert str(resident.value) in " ".join(r.output.split()) and not (tmp_path / "q").exists()
