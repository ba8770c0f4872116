"""Issue 25 on the CUDA path: every family of tests/tiny.py FAMILIES (Qwen3, SmolLM3, Granite,
OLMo 2, Phi-3, Gemma 3 text; plus Phi-3 with LongRoPE across its switch) runs through the CUDA
model, one layer loop reading the family's description (runtime/features.py), and gives the CPU
numba runtime's greedy tokens on the same file, fp32 and 4-bit (4-bit: a flip only at a near tie,
see the test).

Device-agnostic like tests/cuda_suite.py: tests/test_cuda.py runs it under numba's CUDA
simulator (NUMBA_ENABLE_CUDASIM=1) in a subprocess; on a GPU, `python -m pytest
tests/cuda_families.py`. Shapes are tinier than tests/test_families.py's (hidden 32, 2 layers):
the simulator pays per element. `-s` prints each case's figures (the FIGURES lines).

Tolerances, as tests/cuda_suite.py `_check_logits`: the CUDA path computes with fp16 weights
(float exports) and fp16 activations, the CPU runtime with fp32 (float exports) or int8
activations (quantized ones): max |Δlogit| <= 1% of max |logit| for fp32 exports (fp16 rounding,
~2^-11 relative per product, over sums of ~100 terms and 2 layers) and 3% for 4-bit ones (the
CPU's int8 activations: the bound the CPU runtime has against ONNX Runtime).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.setswitchinterval(5e-5)  # simulator threads hand the GIL over at every barrier (cuda_suite.py)

from numba import cuda  # noqa: E402
from numba.core import config  # noqa: E402

SIM = bool(config.ENABLE_CUDASIM)
if not SIM and not cuda.is_available():
    pytest.skip("no CUDA GPU and the simulator is off (tests/test_cuda.py runs this under it)", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

TPB = 32 if SIM else 256  # the simulator: each thread a Python thread, each barrier a switch through all of them
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
ORIG = 8  # LongRoPE's original_max_position_embeddings: the 6-token prompt + 4 steps cross it
OVERRIDES = {
    # a sliding layer, then a full one; the window (4) is shorter than the prompt (6)
    "gemma3_text": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=4),
    "phi3-longrope": dict(
        rope_parameters=None,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0 + 0.3 * i for i in range(3)],  # rope_dims / 2: head_dim 8 x 0.75 / 2
            "long_factor": [3.0 + 2.0 * i for i in range(3)],
        },
        original_max_position_embeddings=ORIG,
        max_position_embeddings=128,
        partial_rotary_factor=0.75,
        rope_theta=10000.0,
    ),
}
CASES = list(tiny.FAMILIES) + ["phi3-longrope"]
VARIANTS = ("f32", "q4")
PROMPT = np.array([5, 17, 100, 3, 77, 250], np.int64)
STEPS = 4
TOL = {"f32": 0.01, "q4": 0.03}  # of max |logit| (the module docstring)


def _build(case: str):
    family = "phi3" if case == "phi3-longrope" else case
    return tiny.family_model(family, seed=0, **SMALL, **OVERRIDES.get(case, {}))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{(case, variant): export dir}: each tiny family model exported in fp32, then RTN 4-bit
    (groups of 32, symmetric, 8-bit embeddings and head inside the 4-bit file)."""
    import torch

    from edgellm.export.exporter import export_model
    from edgellm.export.weights import Options
    from edgellm.modelio import Loaded
    from edgellm.quant.apply import QuantConfig, quantize_model
    from edgellm.quant.formats import QuantFormat

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cuda-families")
    tok = tiny.make_tokenizer(root / "tokenizer")
    calib = torch.randint(1, tiny.VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    out = {}
    for case in CASES:
        model = _build(case)
        out[case, "f32"] = root / f"{case}-f32"
        export_model(Loaded(model, tok, "t", {"steps": []}), out[case, "f32"], Options(), False)
        _, info = quantize_model(model, QuantConfig(fmt=QuantFormat(4, 32, True), method="rtn", embeddings="8"), calib)
        out[case, "q4"] = root / f"{case}-q4"
        export_model(Loaded(model, tok, "t", {"steps": [], "quantization": info}), out[case, "q4"], Options(), False)
    return out


def _pair(path, **kw):
    from edgellm.runtime.cuda.model import CudaModel
    from edgellm.runtime.model import NumbaModel

    return CudaModel(path, n_ctx=32, threads_per_block=TPB, **kw), NumbaModel(path, n_ctx=32, threads=1)


@pytest.mark.parametrize("var", VARIANTS)
@pytest.mark.parametrize("case", CASES)
def test_family_greedy_and_logits_match_cpu_runtime(exports, case, var):
    """The prompt (every row: the tiled GEMM path) and STEPS greedy decode steps (the cooperative
    step), both fed the CPU runtime's greedy tokens: every logit row within TOL of the CPU's logit
    scale, and the CUDA path's argmax the CPU's token at each of the STEPS + 1 steps. fp32: no
    exception. 4-bit: the CPU computes with int8 activations, so the two differ by up to ~2.5% of
    the scale (measured) and a random tiny model's top-2 logits can lie closer than that: at most
    one step may pick the other token, and only where the CPU's top-2 margin is within twice that
    step's measured max |Δlogit| (the difference explains the flip; a kernel bug would not)."""
    gm, cm = _pair(exports[case, var])
    a, b = gm.forward(PROMPT, all_logits=True), cm.forward(PROMPT, all_logits=True)
    diffs, scales = [float(np.abs(a - b).max())], [float(np.abs(b).max())]
    a, b = a[-1], b[-1]
    ids, flips = [], []
    for step in range(STEPS + 1):
        ids.append(int(b.argmax()))
        if int(a.argmax()) != ids[-1]:
            top2 = np.sort(b)[-2:]
            flips.append(dict(step=step, cuda=int(a.argmax()), cpu=ids[-1], margin=float(top2[1] - top2[0])))
            flips[-1]["tie"] = flips[-1]["margin"] <= 2 * float(np.abs(a - b).max())
        if step < STEPS:
            a, b = gm.forward([ids[-1]]), cm.forward([ids[-1]])
            diffs.append(float(np.abs(a - b).max()))
            scales.append(float(np.abs(b).max()))
    diff, scale = max(diffs), max(scales)
    print(f"FIGURES {case} {var}: max|dlogit| {diff:.4g} / max|logit| {scale:.4g} = {diff / scale:.3%}; "
          f"tokens {ids}, {STEPS + 1 - len(flips)}/{STEPS + 1} equal, flips {flips}")  # fmt: skip
    assert gm.decode_mode == "cooperative"
    assert diff <= TOL[var] * scale, (diff, scale)
    assert scale > 1.0  # a real comparison: logits of order 3 (tiny.family_model)
    if var == "f32":
        assert not flips, (ids, flips)
    else:
        assert len(flips) <= 1 and all(f["tie"] for f in flips), (ids, flips)
    if case == "phi3-longrope":
        assert gm.rope_switch == ORIG and len(PROMPT) + STEPS > ORIG  # the long tables ran


def test_family_phases_fallback_equals_cooperative_step(exports):
    """The per-phase launches (the host skips the phases a layer lacks) give the cooperative step's
    logits on Gemma 3 (q/k norm, four norms, a sliding layer with its own rope table, soft-caps,
    GeGLU; one family: the simulator's time)."""
    for case in ("gemma3_text",):
        a, _ = _pair(exports[case, "q4"])
        b, _ = _pair(exports[case, "q4"], fused=False)
        for m in (a, b):
            m.forward(PROMPT[:3])
        for tok in (7, 300):
            la, lb = a.forward([tok]), b.forward([tok])
            assert np.abs(la - lb).max() <= 1e-5 * np.abs(lb).max(), (case, np.abs(la - lb).max())
        assert a.decode_mode == "cooperative" and b.decode_mode == "phases"


def test_family_cli_run_on_cuda(exports):
    """`edgellm run --device cuda` on a Gemma 3 export: exit 0, the tokens/s line."""
    from typer.testing import CliRunner

    from edgellm.cli import app

    path = exports["gemma3_text", "q4"]
    r = CliRunner().invoke(
        app, ["run", str(path), "-p", "def f(x):", "-t", "0", "-n", "1", "--device", "cuda", "--ctx", "32"]
    )
    assert r.exit_code == 0, r.output
    assert "tokens/s" in r.output


def test_what_the_cuda_path_refuses_is_one_line(tmp_path):
    """What the CUDA path still cannot run (a head wider than its attention kernel's shared
    buffers hold: 2 x MAX_THREADS dims) is refused by `edgellm run --device cuda` with one
    `error:` line naming it, exit 2; the CPU runtime runs the same file."""
    from guards import one_line_error

    from edgellm.export.exporter import export_model
    from edgellm.export.weights import Options
    from edgellm.modelio import Loaded

    wide = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1)
    model = tiny.family_model("qwen3", num_key_value_heads=1, head_dim=520, **wide)
    tok = tiny.make_tokenizer(tmp_path / "tokenizer")
    export_model(Loaded(model, tok, "t", {"steps": []}), tmp_path / "onnx", Options(), False)
    line = one_line_error(["run", str(tmp_path / "onnx"), "-p", "a", "-n", "1", "--device", "cuda"])
    assert "head_dim 520" in line and "CUDA path" in line, line
