"""`edgellm prune`: masks, SparseGPT, the block-by-block driver, structured shrinking, the CLI.

The quality claims are checked on a small llama trained briefly in this module (hidden 128,
intermediate 384, 2 layers, 300 steps). A model that small has none of the outlier input
channels that real LLMs develop (and that make magnitude pruning fail on them), so the
comparison is also run on a function-preserving rescaling of it that creates such channels:
each RMSNorm gain and v/up output is multiplied per channel by exp(N(0, 1)) and the consuming
weights' columns divided by the same factors. The model computes exactly the same thing;
Wanda's and SparseGPT's scores see through it, plain |W| does not.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402
from edgellm.data import builtin_text, calibration_batch, split_tokens, token_ids  # noqa: E402
from edgellm.evaluate import evaluate  # noqa: E402
from edgellm.prune.apply import PruneConfig, prune_unstructured  # noqa: E402
from edgellm.prune.masks import Pattern, follows_pattern, nm_mask, sparsity_of, unstructured_mask, wanda_score  # noqa: E402
from edgellm.prune.sparsegpt import sparsegpt_prune  # noqa: E402

# `trained_llama` (conftest): hidden 128, intermediate 384, 2 layers, 4 heads / 2 KV heads, 300 steps.

CALIB = dict(n_samples=32, seq_len=128)
EVAL = dict(max_tokens=4096, ctx=128, stride=128)
FAST = ["--no-eval", "--calib-samples", "8", "--seq-len", "64"]


@pytest.fixture(scope="module")
def trained(trained_llama, tokenizer):
    """(model dir, tokenizer, calibration batch, eval ids) for conftest's briefly trained llama."""
    ids = token_ids(tokenizer, builtin_text())
    return trained_llama, tokenizer, calibration_batch(ids, **CALIB), split_tokens(ids, "eval")


def _load(path):
    from edgellm.modelio import load_model

    return load_model(path).model


def _ppl(model, eval_ids) -> float:
    return evaluate(model, eval_ids, **EVAL).perplexity


def _with_outlier_channels(model, sigma: float = 1.0, seed: int = 0):
    """A copy computing the same function, with per-channel input scales spread over ~e^(+-2)."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    hd = m.config.head_dim
    with torch.no_grad():
        for b in m.model.layers:
            a, mlp = b.self_attn, b.mlp
            for norm, consumers in (
                (b.input_layernorm, (a.q_proj, a.k_proj, a.v_proj)),
                (b.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj)),
            ):
                s = torch.exp(sigma * torch.randn(norm.weight.shape[0], generator=g))
                norm.weight.mul_(s)
                for lin in consumers:
                    lin.weight.div_(s)
            s = torch.exp(sigma * torch.randn(a.v_proj.weight.shape[0], generator=g))  # (n_kv * hd,)
            a.v_proj.weight.mul_(s.unsqueeze(1))
            rep = a.o_proj.weight.shape[1] // a.v_proj.weight.shape[0]
            a.o_proj.weight.div_(
                s.reshape(-1, hd).repeat_interleave(rep, 0).flatten()
            )  # each KV head feeds `rep` query heads
            s = torch.exp(sigma * torch.randn(mlp.up_proj.weight.shape[0], generator=g))
            mlp.up_proj.weight.mul_(s.unsqueeze(1))
            mlp.down_proj.weight.div_(s)
    return m


def _pruned_ppl(model, method, calib, eval_ids, pattern=None):
    m = copy.deepcopy(model)
    _, info = prune_unstructured(m, PruneConfig(method=method, sparsity=0.5, pattern=pattern), calib)
    assert info["sparsity_reached"] >= 0.5
    return m, _ppl(m, eval_ids)


def _decoder_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}


# ----- maths on single layers -----------------------------------------------------------------


def test_masks_are_exact():
    torch.manual_seed(0)
    score = torch.rand(16, 64)
    score[0, :10] = 0.0  # ties must not change the count
    for per_row in (True, False):
        mask = unstructured_mask(score, 0.5, per_row)
        assert mask.sum().item() == 16 * 32
        if per_row:
            assert (mask.sum(1) == 32).all()
    nm = nm_mask(score, Pattern(2, 4))
    assert (nm.reshape(16, 16, 4).sum(-1) == 2).all()
    kept = score.masked_fill(nm, 0)
    assert follows_pattern(kept, Pattern(2, 4)) and not follows_pattern(score, Pattern(2, 4))
    # the lowest two of each group go (row 0 has ties, skip it)
    g = score.reshape(16, 16, 4)[1:]
    assert torch.equal(nm.reshape(16, 16, 4)[1:], g <= g.sort(-1).values[..., 1:2])


@pytest.mark.parametrize("pattern", [None, Pattern(2, 4)])
def test_sparsegpt_reconstructs_better_than_masking(pattern):
    """||(W - W') X||^2 with SparseGPT's updates beats zeroing the Wanda/magnitude mask."""
    torch.manual_seed(0)
    X = torch.randn(2048, 96) * torch.exp(torch.randn(96))  # (tokens, in): uneven channels
    X[:, 5] = 0.0  # a dead input
    W = torch.randn(48, 96)
    H = X.t() @ X
    new, mask = sparsegpt_prune(W, 2 * H / len(X), 0.5, pattern)
    assert sparsity_of(new) >= 0.5 and torch.equal(new == 0, mask | (new == 0))
    if pattern:
        assert follows_pattern(new, pattern)

    def err(w):
        return ((W - w) @ X.t()).pow(2).sum().item()

    def masked(score, per_row):
        return W.masked_fill(nm_mask(score, pattern) if pattern else unstructured_mask(score, 0.5, per_row), 0)

    by_mag, by_wanda = masked(W.abs(), False), masked(wanda_score(W, H), True)
    assert err(new) < err(by_wanda) < err(by_mag)


# ----- the model-level claims -----------------------------------------------------------------


def test_wanda_and_sparsegpt_beat_magnitude(trained):
    path, _, calib, eval_ids = trained
    model = _load(path)
    dense = _ppl(model, eval_ids)
    outl = _with_outlier_channels(model)
    assert abs(_ppl(outl, eval_ids) - dense) < 1e-3 * dense  # same function
    res = {}
    for name, m in (("plain", model), ("outliers", outl)):
        for method in ("magnitude", "wanda", "sparsegpt"):
            res[name, method] = _pruned_ppl(m, method, calib, eval_ids)[1]
    print({f"{k[0]}/{k[1]}": round(v, 3) for k, v in res.items()}, "dense", round(dense, 3))
    assert all(v > dense for v in res.values())
    assert res["plain", "sparsegpt"] < res["plain", "magnitude"]
    assert res["outliers", "wanda"] < res["outliers", "magnitude"]
    assert res["outliers", "sparsegpt"] < res["outliers", "magnitude"]
    # Wanda's score |W_ij| * ||x_j|| is invariant to the rescaling: the same weights go.
    assert abs(res["outliers", "wanda"] - res["plain", "wanda"]) < 1e-3 * dense


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_two_four_pattern_exact(trained, method):
    path, _, calib, eval_ids = trained
    model = _load(path)
    m, ppl = _pruned_ppl(model, method, calib, eval_ids, Pattern(2, 4))
    for name, lin in _decoder_linears(m).items():
        w = lin.weight.detach()
        groups = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)  # non-zeros per group of 4
        assert (groups <= 2).all(), name
        assert sparsity_of(w) >= 0.5, name
    assert torch.equal(m.lm_head.weight, model.lm_head.weight)  # never pruned
    assert ppl < 4 * _ppl(model, eval_ids)


# ----- structured: the importance ranking against random removal ----------------------------


def _remove(model, kind, removed):
    """A copy of `model` without the given layers (kind "layers": a list of indices) or, per block,
    the given MLP channels / KV groups (a list of index lists, one per block)."""
    from edgellm.prune import structured as st

    m = copy.deepcopy(model)
    cfg = m.config
    if kind == "layers":
        st.remove_layers(m, sorted(removed))
        return m
    n_heads, n_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, st.head_dim(cfg)
    total = cfg.intermediate_size if kind == "mlp" else n_kv
    for block, drop in zip(m.model.layers, removed):
        keep = torch.tensor([i for i in range(total) if i not in set(drop)])
        if kind == "mlp":
            st.remove_channels(block.mlp, keep)
        else:
            st.remove_kv_groups(block.self_attn, keep, n_heads, n_kv, hd)
    n_remove = len(removed[0])
    if kind == "mlp":
        cfg.intermediate_size = total - n_remove
    else:
        kv = n_kv - n_remove
        st.set_head_config(cfg, kv * (n_heads // n_kv), kv, hd)
    return m


def _alternatives(model, kind, n_remove):
    """What random removal could pick: 6 random draws of MLP channels; every possible choice of
    KV groups per block / of layers (few enough to enumerate here)."""
    import itertools

    cfg = model.config
    if kind == "layers":
        return [list(c) for c in itertools.combinations(range(cfg.num_hidden_layers), n_remove)]
    if kind == "heads":
        per_block = [list(c) for c in itertools.combinations(range(cfg.num_key_value_heads), n_remove)]
        return [list(c) for c in itertools.product(per_block, repeat=cfg.num_hidden_layers)]
    g = torch.Generator().manual_seed(0)
    return [
        [torch.randperm(cfg.intermediate_size, generator=g)[:n_remove].tolist() for _ in range(cfg.num_hidden_layers)]
        for _ in range(6)
    ]


@pytest.mark.parametrize("kind", ["mlp", "heads", "layers"])
def test_structured_importance_beats_random_removal(trained, kind):
    """On the trained model, removing half of what the importance scores rank lowest hurts
    perplexity less than random removal on average, and no random choice does better: below
    every random draw of MLP channels; the best of all possible KV-group / layer choices."""
    from edgellm.prune.apply import prune_structured

    path, _, calib, eval_ids = trained
    model = _load(path)
    ranked = copy.deepcopy(model)
    plan = prune_structured(ranked, kind, 0.5, calib)
    ours = _ppl(ranked, eval_ids)
    others = [_ppl(_remove(model, kind, alt), eval_ids) for alt in _alternatives(model, kind, plan["remove"])]
    assert ours < sum(others) / len(others), (ours, others)
    assert ours < min(others) if kind == "mlp" else ours == pytest.approx(min(others)), (ours, others)


# ----- CLI: structured, records, quantize, bad input ------------------------------------------


def _cli(args):
    from typer.testing import CliRunner

    from edgellm.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("kind,ratio", [("heads", 0.5), ("mlp", 0.25), ("layers", 0.5)])
def test_structurally_pruned_model_exports(trained, tmp_path, kind, ratio):
    """The smaller model exports to ONNX; ONNX Runtime (with and without cache) and the Numba
    runtime reproduce it."""
    import numpy as np

    from edgellm.export.check import FP_TOL
    from edgellm.export.exporter import export_model
    from edgellm.modelio import load_model
    from edgellm.runtime.model import NumbaModel

    out = tmp_path / kind
    assert _cli(["prune", trained[0], "--structured", kind, "--ratio", ratio, "-o", out, *FAST]).exit_code == 0
    loaded = load_model(out)
    res = export_model(loaded, tmp_path / "onnx")
    assert res.parity["max_abs_diff"] <= FP_TOL and res.parity["cache_vs_nocache_max_abs_diff"] <= FP_TOL
    ids = np.array([5, 17, 200, 33, 99, 1, 400, 7])
    with torch.no_grad():
        ref = loaded.model(input_ids=torch.tensor(ids).unsqueeze(0)).logits[0, -1].numpy()
    got = NumbaModel(tmp_path / "onnx", n_ctx=64, threads=1).forward(ids)
    assert np.abs(got - ref).max() <= FP_TOL * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize(
    "kind,ratio,expect",
    [
        ("layers", 0.5, {"num_hidden_layers": 1}),
        ("heads", 0.5, {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}),
        ("mlp", 0.25, {"intermediate_size": 288}),
    ],
)
def test_structured_gives_plain_smaller_model(trained, tmp_path, kind, ratio, expect):
    from transformers import AutoModelForCausalLM

    path, tok, _, _ = trained
    out = tmp_path / kind
    r = _cli(["prune", path, "--structured", kind, "--ratio", ratio, "-o", out, *FAST])
    assert r.exit_code == 0, r.output
    plain = AutoModelForCausalLM.from_pretrained(str(out))  # no edgellm involved
    original = AutoModelForCausalLM.from_pretrained(str(path))
    for key, value in expect.items():
        assert getattr(plain.config, key) == value
    n_new, n_old = sum(p.numel() for p in plain.parameters()), sum(p.numel() for p in original.parameters())
    assert n_new < n_old
    x = tok("def f(x): return x", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = plain(input_ids=x).logits
        cached = plain.generate(x, max_new_tokens=4, do_sample=False)  # the KV cache works too
    assert torch.isfinite(logits).all() and cached.shape[1] == x.shape[1] + 4
    step = json.loads((out / "edgellm.json").read_text())["steps"][-1]
    assert step["step"] == "prune" and step["params"]["structured"] == kind
    assert step["result"]["parameters_before"] == n_old and step["result"]["parameters_after"] == n_new


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_structured_other_llama_families(tiny_dirs, tmp_path, family):
    """Qwen2 (q/k/v biases, layer_types) and Mistral shrink to valid configs too."""
    from transformers import AutoModelForCausalLM

    for kind, key, value in (
        ("heads", "num_key_value_heads", 1),
        ("mlp", "intermediate_size", 80),
        ("layers", "num_hidden_layers", 1),
    ):
        out = tmp_path / kind
        r = _cli(["prune", tiny_dirs[family], "--structured", kind, "--ratio", "0.5", "-o", out, *FAST])
        assert r.exit_code == 0, r.output
        m = AutoModelForCausalLM.from_pretrained(str(out))
        assert getattr(m.config, key) == value
        if getattr(m.config, "layer_types", None) is not None:
            assert len(m.config.layer_types) == m.config.num_hidden_layers
        with torch.no_grad():
            assert torch.isfinite(m(input_ids=torch.arange(12).unsqueeze(0)).logits).all()


def test_unstructured_cli_records(trained, tmp_path):
    path = trained[0]
    out = tmp_path / "wanda24"
    r = _cli(["prune", path, "--method", "wanda", "--pattern", "2:4", "-o", out, *FAST])
    assert r.exit_code == 0, r.output
    step = json.loads((out / "edgellm.json").read_text())["steps"][-1]
    assert step["params"]["method"] == "wanda" and step["params"]["pattern"] == "2:4"
    assert step["result"]["sparsity_reached"] == 0.5 and len(step["result"]["per_layer"]) == 14
    model = _load(out)
    assert all(follows_pattern(lin.weight, Pattern(2, 4)) for lin in _decoder_linears(model).values())


@pytest.fixture(scope="module")
def sparse24(trained):
    """The trained llama pruned once with Wanda 2:4 (shared by the quantize tests)."""
    model = _load(trained[0])
    prune_unstructured(model, PruneConfig(method="wanda", pattern=Pattern(2, 4), sparsity=0.5), trained[2])
    return model


@pytest.mark.parametrize("method,sym", [("gptq", True), ("gptq", False), ("rtn", True), ("rtn", False), ("awq", True)])
def test_quantize_keeps_zeros(trained, sparse24, method, sym):
    """Pruned zeros stay exactly 0.0 through quantization: the symmetric zero point is a code,
    and an asymmetric group's range always contains 0, whose code is its integer zero point."""
    from edgellm.quant.apply import QuantConfig, quantize_model
    from edgellm.quant.formats import QuantFormat
    from edgellm.quant.modules import QuantLinear

    model = copy.deepcopy(sparse24)
    zeros = {n: (lin.weight == 0) for n, lin in _decoder_linears(model).items()}
    quantize_model(model, QuantConfig(fmt=QuantFormat(bits=4, group_size=32, sym=sym), method=method), trained[2][:8])
    for name, was_zero in zeros.items():
        q = model.get_submodule(name)
        assert isinstance(q, QuantLinear)
        deq = q.dequantize()
        assert (deq[was_zero] == 0).all(), name
        assert follows_pattern(deq, Pattern(2, 4)), name


def test_pruned_then_quantized_via_cli(trained, tmp_path):
    path = trained[0]
    pruned, q4 = tmp_path / "p", tmp_path / "q4"
    assert _cli(["prune", path, "--method", "magnitude", "--sparsity", "0.6", "-o", pruned, "--no-eval"]).exit_code == 0
    r = _cli(["quantize", pruned, "-o", q4, "--bits", "4", "--group-size", "32", *FAST])
    assert r.exit_code == 0, r.output
    before, after = _load(pruned), _load(q4)
    for name, lin in _decoder_linears(before).items():
        deq = after.get_submodule(name).dequantize()
        assert (deq[lin.weight == 0] == 0).all(), name
    steps = [s["step"] for s in json.loads((q4 / "edgellm.json").read_text())["steps"]]
    assert steps == ["prune", "quantize"]


def test_pruned_quantized_exported_runs_on_numba(trained, tmp_path):
    """prune (KV groups) -> quantize (4-bit GPTQ) -> export (MatMulNBits) -> Numba runtime."""
    import numpy as np

    from edgellm.export.exporter import export_model
    from edgellm.modelio import load_model
    from edgellm.runtime.model import NumbaModel

    pruned, q4 = tmp_path / "p", tmp_path / "q4"
    assert _cli(["prune", trained[0], "--structured", "heads", "--ratio", "0.5", "-o", pruned, *FAST]).exit_code == 0
    r = _cli(["quantize", pruned, "-o", q4, "--bits", "4", "--group-size", "32", *FAST])
    assert r.exit_code == 0, r.output
    loaded = load_model(q4)
    assert loaded.model.config.num_key_value_heads == 1
    res = export_model(loaded, tmp_path / "onnx")  # parity-checked against ONNX Runtime inside
    ids = np.array([5, 17, 200, 33, 99, 1, 400, 7])
    with torch.no_grad():
        ref = loaded.model(input_ids=torch.tensor(ids).unsqueeze(0)).logits[0, -1].numpy()
    got = NumbaModel(tmp_path / "onnx", n_ctx=64, threads=1).forward(ids)
    assert res.parity["max_abs_diff"] < 0.05 * np.abs(ref).max()
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max() and got.argmax() == ref.argmax()


@pytest.fixture(scope="module")
def gpt2_dir(trained, tmp_path_factory):
    return tiny.save(tiny.build("gpt2"), trained[1], tmp_path_factory.mktemp("gpt2") / "gpt2")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--method", "wanda", "--sparsity", "1.0"], "outside [0, 1)"),
        (["--method", "magnitude", "--sparsity", "-0.1"], "outside [0, 1)"),
        (["--method", "wanda", "--pattern", "3:7"], "does not divide"),
        (["--method", "wanda", "--pattern", "4:2"], "invalid"),
        (["--method", "wanda", "--pattern", "2:4", "--sparsity", "0.7"], "contradicts"),
        (["--structured", "layers", "--ratio", "0.9"], "every one"),
        (["--structured", "heads", "--ratio", "0.8"], "every one"),
        (["--structured", "mlp", "--ratio", "1.0"], "outside (0, 1)"),
        (["--structured", "layers", "--ratio", "0.01"], "removes none"),
        (["--structured", "mlp"], "needs --ratio"),
        ([], "give either"),
        (["--method", "wanda", "--structured", "mlp", "--ratio", "0.5"], "give either"),
        (["GPT2", "--structured", "heads", "--ratio", "0.5"], "does not support 'gpt2'"),
    ],
)
def test_bad_input_exit_2_nothing_written(trained, gpt2_dir, tmp_path, args, needle):
    src = trained[0]
    if args and args[0] == "GPT2":
        src, args = gpt2_dir, args[1:]
    out = tmp_path / "out"
    r = _cli(["prune", src, "-o", out, *FAST, *args])
    assert r.exit_code == 2, r.output
    assert needle in r.output and r.output.strip().startswith("error:"), r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_gpt2_layers_and_unstructured(gpt2_dir, tmp_path):
    """Layer removal and N:M work on GPT-2 too (Conv1D weights are stored transposed)."""
    r = _cli(["prune", gpt2_dir, "--structured", "layers", "--ratio", "0.5", "-o", tmp_path / "l", *FAST])
    assert r.exit_code == 0, r.output
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "l")).config.n_layer == 1
    r = _cli(["prune", gpt2_dir, "--method", "sparsegpt", "--pattern", "2:4", "-o", tmp_path / "s", *FAST])
    assert r.exit_code == 0, r.output
    m = _load(tmp_path / "s")
    from edgellm.arch import linear_weight

    for blk in m.transformer.h:
        for lin in (blk.attn.c_attn, blk.attn.c_proj, blk.mlp.c_fc, blk.mlp.c_proj):
            assert follows_pattern(linear_weight(lin), Pattern(2, 4))
