"""edgellm quantize: quality on a briefly trained model, every family, packed storage, load-back."""

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tiny
from edgellm.cli import app
from edgellm.data import builtin_text, calibration_batch, split_tokens, token_ids
from edgellm.evaluate import evaluate
from edgellm.modelio import load_model, save_model
from edgellm.quant.apply import QuantConfig, quantize_model
from edgellm.quant.formats import QuantFormat
from edgellm.quant.modules import QuantLinear
from edgellm.record import add_step

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(trained_llama):
    loaded = load_model(trained_llama)
    ids = token_ids(loaded.tokenizer, builtin_text())
    return loaded, calibration_batch(ids, 32, 256), split_tokens(ids, "eval")


def _ppl_after(loaded, calib, eval_ids, **cfg):
    model = copy.deepcopy(loaded.model)
    quantize_model(model, QuantConfig(**cfg), calib)
    return evaluate(model, eval_ids, max_tokens=8192).perplexity


def test_quality_on_trained_llama(trained):
    loaded, calib, eval_ids = trained
    fp = evaluate(loaded.model, eval_ids, max_tokens=8192).perplexity
    q8 = _ppl_after(loaded, calib, eval_ids, fmt=QuantFormat(8, 128, True), method="rtn")
    rtn = _ppl_after(loaded, calib, eval_ids, fmt=QuantFormat(4, 128, True), method="rtn")
    gptq = _ppl_after(loaded, calib, eval_ids, fmt=QuantFormat(4, 128, True), method="gptq")
    awq = _ppl_after(loaded, calib, eval_ids, fmt=QuantFormat(4, 128, True), method="awq")
    print(f"\nfp32 {fp:.4f}  int8 {q8:.4f}  rtn4 {rtn:.4f}  gptq4 {gptq:.4f}  awq4 {awq:.4f}")
    assert abs(q8 / fp - 1) < 0.005, "8-bit must be within 0.5% of fp32 perplexity"
    assert gptq < rtn and awq < rtn, "GPTQ and AWQ must beat RTN at 4-bit group 128"
    assert rtn > fp, "4-bit RTN should cost something on a trained model"


def test_asym_and_gptq_options_run(trained):
    loaded, calib, eval_ids = trained
    fp = evaluate(loaded.model, eval_ids, max_tokens=8192).perplexity
    ppl = _ppl_after(loaded, calib[:8], eval_ids, fmt=QuantFormat(4, 32, False), method="gptq", act_order=False)
    assert fp < ppl < fp * 1.1


@pytest.mark.parametrize("family", list(tiny.CONFIGS))
@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_every_family_round_trips(family, method, tiny_dirs, tmp_path):
    loaded = load_model(tiny_dirs[family])
    ids = token_ids(loaded.tokenizer, builtin_text()[:40000])
    cfg = QuantConfig(fmt=QuantFormat(4, 32, sym=(method != "awq")), method=method, quantize_embeddings=True)
    _, info = quantize_model(loaded.model, cfg, calibration_batch(ids, 4, 64))
    x = ids[:40].unsqueeze(0)
    with torch.no_grad():
        before = loaded.model(input_ids=x).logits
    rec = add_step(loaded.record, "quantize")
    rec["quantization"] = info
    save_model(loaded.model, loaded.tokenizer, tmp_path / "q", rec)
    back = load_model(tmp_path / "q")
    assert any(isinstance(m, QuantLinear) for m in back.model.modules())
    with torch.no_grad():
        after = back.model(input_ids=x).logits
    assert torch.equal(before, after), "loading back must compute from exactly the stored values"


def test_packed_size_and_record(trained_llama, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "q4"
    r = runner.invoke(
        app,
        [
            "quantize",
            str(trained_llama),
            "-o",
            str(out),
            "--bits",
            "4",
            "--method",
            "rtn",
            "--calib-samples",
            "8",
            "--seq-len",
            "128",
            "--eval-tokens",
            "1024",
        ],
    )
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "edgellm.json").read_text())
    assert rec["quantization"]["bits"] == 4 and rec["steps"][-1]["quality"]["after"]["perplexity"] > 1
    fp_bytes = q_bytes = 0
    with safe_open(str(trained_llama / "model.safetensors"), "pt") as f:
        for k in f.keys():
            if ".layers." in k and k.endswith("proj.weight"):
                fp_bytes += f.get_tensor(k).numel() * 4
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for k in f.keys():
            if k.endswith((".qweight", ".scales", ".qzeros")):
                q_bytes += f.get_tensor(k).numel() * f.get_tensor(k).element_size()
    assert 0 < q_bytes <= 0.3 * fp_bytes, (q_bytes, fp_bytes)


def _tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def _assert_clean_failure(result, out: Path):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [l for l in result.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.mark.parametrize("args", [["--bits", "3"], ["--group-size", "48"], ["--group-size", "8"]])
def test_bad_options(args, tiny_dirs, tmp_path):
    src = tiny_dirs["llama"]
    before = _tree_hash(src)
    out = tmp_path / "out"
    _assert_clean_failure(runner.invoke(app, ["quantize", str(src), "-o", str(out), *args]), out)
    assert _tree_hash(src) == before


def test_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    _assert_clean_failure(
        runner.invoke(app, ["quantize", str(tmp_path / "empty"), "-o", str(tmp_path / "o")]), tmp_path / "o"
    )


def test_unsupported_architecture(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    r = runner.invoke(app, ["quantize", str(tmp_path / "m"), "-o", str(tmp_path / "o")])
    _assert_clean_failure(r, tmp_path / "o")
    assert "Llama" in r.output and "GPT-2" in r.output


def test_truncated_safetensors(tiny_dirs, tmp_path):
    import shutil

    src = tmp_path / "broken"
    shutil.copytree(tiny_dirs["llama"], src)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = runner.invoke(app, ["quantize", str(src), "-o", str(tmp_path / "o")])
    _assert_clean_failure(r, tmp_path / "o")
    assert "truncated" in r.output


def test_empty_data_file(tiny_dirs, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    r = runner.invoke(
        app, ["quantize", str(tiny_dirs["llama"]), "-o", str(tmp_path / "o"), "--data", str(tmp_path / "empty.txt")]
    )
    _assert_clean_failure(r, tmp_path / "o")


def test_existing_output_needs_force(tiny_dirs, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = runner.invoke(
        app,
        ["quantize", str(tiny_dirs["llama"]), "-o", str(out), "--calib-samples", "2", "--seq-len", "32", "--no-eval"],
    )
    assert r.exit_code == 2 and "--force" in r.output
    assert (out / "keep.txt").read_text() == "mine"
    r = runner.invoke(
        app,
        [
            "quantize",
            str(tiny_dirs["llama"]),
            "-o",
            str(out),
            "--calib-samples",
            "2",
            "--seq-len",
            "32",
            "--no-eval",
            "--force",
        ],
    )
    assert r.exit_code == 0, r.output
    assert not (out / "keep.txt").exists() and (out / "edgellm.json").exists()


def test_clip_search_lowers_gptq_output_error():
    """The per-group clipping search never rounds a group worse, and on heavy-tailed weights
    (a few large values per group) it lowers GPTQ's output error ||(W - Wq) X||."""
    from edgellm.quant.gptq import gptq_quantize
    from edgellm.quant.modules import QuantLinear

    g = torch.Generator().manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((64, 256)) * 0.02  # (out, in), heavy tails
    x = torch.randn(2048, 256, generator=g)
    H = 2 * x.t() @ x / len(x)
    err = {}
    for clip in (False, True):
        q = QuantLinear(256, 64, False, QuantFormat(4, 64, True))
        q.set_codes(*gptq_quantize(w, H, q.fmt, clip_search=clip))
        err[clip] = ((w - q.dequantize()) @ x.t()).pow(2).sum().item()
    assert err[True] < 0.97 * err[False], err


def test_packing_is_one_function_for_torch_and_numpy():
    import numpy as np

    from edgellm.quant.packing import pack, unpack

    codes = torch.randint(0, 16, (3, 5, 32), dtype=torch.uint8)
    for bits in (4, 8):
        c = codes if bits == 4 else codes * 16
        pt, pn = pack(c, bits), pack(c.numpy(), bits)
        assert isinstance(pn, np.ndarray) and np.array_equal(pt.numpy(), pn)
        assert torch.equal(unpack(pt, bits), c) and np.array_equal(unpack(pn, bits), c.numpy())
    assert pack(np.array([[1, 2, 3]], np.uint8), 4, pad_odd=True).tolist() == [[0x21, 0x03]]
    with pytest.raises(ValueError):
        pack(np.array([[1, 2, 3]], np.uint8), 4)


@pytest.mark.parametrize("dim, bits, group", [(576, 8, 64), (576, 4, 32), (384, 8, 128), (384, 4, 32), (48, 4, 16)])
def test_embedding_group_sizes(dim, bits, group):
    """8-bit embeddings: the largest power of two <= 128 dividing the width; 4-bit: <= 32 (Q4_0's
    blocks), where SmolLM2's tied head measured 13.19 perplexity against 16.17 at group 64."""
    from edgellm.quant.apply import embedding_format

    assert embedding_format(bits, dim).group_size == group


def test_four_bit_embeddings_round_plainly_eight_bit_search_clipping():
    """4-bit embedding rows keep each group's min/max (no clipping of a tied head's largest
    weights, which the search would clip here); 8-bit ones take the MSE clipping search."""
    from edgellm.quant.apply import _embedding_codes, _rtn_clipped, embedding_format
    from edgellm.quant.formats import quantize_rtn

    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.rand(64, 1)
    w[3, 5] = 9.0  # an outlier
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b))  # noqa: E731
    four, eight = embedding_format(4, 96), embedding_format(8, 96)
    assert same(_embedding_codes(w, four), quantize_rtn(w, four))
    assert not same(_rtn_clipped(w, four), quantize_rtn(w, four))  # the search would have clipped
    assert same(_embedding_codes(w, eight), _rtn_clipped(w, eight))
