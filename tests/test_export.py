"""edgellm export: ONNX Runtime reproduces the PyTorch model (float and packed 4/8-bit), with and
without the KV cache; the file follows docs/EXPORT_FORMAT.md; bad input fails cleanly."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import tiny
from edgellm.export import check as check_mod
from edgellm.export.check import FP_TOL, ParityError, _feed, _session, reference_logits
from edgellm.export.exporter import export_model
from edgellm.export.weights import Options
from edgellm.modelio import Loaded
from edgellm.quant.apply import QuantConfig, quantize_model
from edgellm.quant.formats import QuantFormat

FAMILIES = ["llama", "mistral", "qwen2", "gpt2"]


def _model(family: str, seed: int = 0, **overrides):
    """A tiny model with larger-than-default weights (logits of order 10, so errors show) and
    random biases and norm weights (zeros/ones would hide a missing or misplaced tensor)."""
    model = tiny.build(family, seed=seed, initializer_range=0.15, **overrides)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=g))
    return model


def _quantize(model, bits=4, group_size=32, sym=True, embeddings=False):
    cfg = QuantConfig(fmt=QuantFormat(bits, group_size, sym), method="rtn", quantize_embeddings=embeddings)
    _, info = quantize_model(
        model, cfg, torch.randint(0, tiny.VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    )
    return {"steps": [{"step": "quantize"}], "quantization": info}


def _export(model, tokenizer, out, record=None, **opts):
    return export_model(Loaded(model, tokenizer, "test", record or {"steps": []}), out, Options(**opts))


def _ops(out) -> list[str]:
    return [n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node]


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_parity_with_and_without_cache(family, tokenizer, tmp_path):
    model = _model(family)
    res = _export(model, tokenizer, tmp_path / "onnx")
    p = res.parity
    assert p["onnx_checker"] == "passed" and p["decode_steps"] == 8
    assert p["max_abs_logit"] > 1.0  # the comparison is not between near-zero numbers
    assert p["max_abs_diff"] <= FP_TOL and p["cache_vs_nocache_max_abs_diff"] <= FP_TOL
    assert set(_ops(tmp_path / "onnx")).isdisjoint({"MatMulNBits", "GatherBlockQuantized", "DequantizeLinear"})


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batch_with_left_padding(family, tokenizer, tmp_path):
    """Dynamic batch: two rows, the second left-padded, each equal to PyTorch on its own tokens."""
    model = _model(family)
    export_model(Loaded(model, tokenizer, "t", {"steps": []}), tmp_path / "onnx", check=False)
    sess = _session(str(tmp_path / "onnx" / "model.onnx"))
    a = np.array([5, 17, 42, 99, 123, 7, 300, 11], np.int64)
    b = np.array([8, 64, 200, 31, 9], np.int64)
    ids = np.stack([a, np.concatenate([np.zeros(3, np.int64), b])])
    feed = _feed(sess, ids, None, 0)
    feed["attention_mask"] = (np.arange(8)[None] >= np.array([[0], [3]])).astype(np.int64)
    feed["position_ids"] = np.maximum(np.cumsum(feed["attention_mask"], 1) - 1, 0)
    logits = sess.run(["logits"], feed)[0]
    np.testing.assert_allclose(logits[0], reference_logits(model, a), atol=FP_TOL)
    np.testing.assert_allclose(logits[1, 3:], reference_logits(model, b), atol=FP_TOL)


QUANT_CASES = {
    "4bit-sym-g32-emb": dict(family="llama", bits=4, group_size=32, sym=True, embeddings=True),
    "4bit-asym-g16": dict(family="mistral", bits=4, group_size=16, sym=False, embeddings=False),
    "8bit-sym-g32-tied-emb": dict(family="qwen2", bits=8, group_size=32, sym=True, embeddings=True),
    "8bit-asym-g64-padded": dict(family="llama", bits=8, group_size=64, sym=False, embeddings=True, hidden_size=96),
    "4bit-asym-g64-padded-tied-emb": dict(
        family="qwen2", bits=4, group_size=64, sym=False, embeddings=True, hidden_size=96
    ),
    "4bit-per-channel": dict(family="gpt2", bits=4, group_size=-1, sym=False, embeddings=True, n_embd=96),
}


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
@pytest.mark.parametrize("case", list(QUANT_CASES))
def test_quantized_parity(case, fmt, tokenizer, tmp_path):
    kw = dict(QUANT_CASES[case])
    family, bits, gs, sym, emb = (kw.pop(k) for k in ("family", "bits", "group_size", "sym", "embeddings"))
    model = _model(family, **kw)
    record = _quantize(model, bits, gs, sym, emb)
    res = _export(model, tokenizer, tmp_path / "onnx", record, format=fmt)
    p = res.parity
    assert p["max_abs_logit"] > 1.0
    ops = _ops(tmp_path / "onnx")
    if fmt == "matmulnbits":
        assert "MatMulNBits" in ops and "DequantizeLinear" not in ops
        assert ("GatherBlockQuantized" in ops) == emb
        # same packed bytes as PyTorch: exact with fp32 activations; int8 activations within the bound
        assert (
            p["accuracy_level_0_max_abs_diff"] <= FP_TOL
            and p["accuracy_level_0_cache_vs_nocache_max_abs_diff"] <= FP_TOL
        )
        assert p["max_abs_diff"] <= check_mod.INT8_ACT_REL_TOL * p["max_abs_logit"]
    else:
        assert "DequantizeLinear" in ops and "MatMulNBits" not in ops and "GatherBlockQuantized" not in ops
        m = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False)
        assert all(o.domain in ("", "ai.onnx") for o in m.opset_import)
        assert p["max_abs_diff"] <= FP_TOL and p["cache_vs_nocache_max_abs_diff"] <= FP_TOL


def test_tied_quantized_embeddings_one_copy_and_small(tokenizer, tmp_path):
    model = _model("qwen2", vocab_size=2048, hidden_size=128)
    _export(model, tokenizer, tmp_path / "fp32")
    record = _quantize(model, 4, 32, True, embeddings=True)
    _export(model, tokenizer, tmp_path / "q4", record)
    m = onnx.load(str(tmp_path / "q4" / "model.onnx"), load_external_data=False)
    names = {t.name for t in m.graph.initializer}
    assert not any(n.startswith("lm_head.") for n in names)
    users = sorted(n.op_type for n in m.graph.node if "model.embed_tokens.qweight" in n.input)
    assert users == ["GatherBlockQuantized", "MatMulNBits"]  # lm_head and the gather share the bytes
    # every GatherBlockQuantized input but the ids is an initializer (OpenVINO reads only constants)
    gather = next(n for n in m.graph.node if n.op_type == "GatherBlockQuantized")
    assert [i for i in gather.input if i not in names] == ["input_ids"]
    ratio = (tmp_path / "q4" / "model.onnx.data").stat().st_size / (
        tmp_path / "fp32" / "model.onnx.data"
    ).stat().st_size
    assert ratio <= 0.25, ratio


def test_packed_bytes_unchanged(tokenizer, tmp_path):
    """The file holds the very codes and fp16 scales edgellm quantize chose (no requantization)."""
    model = _model("llama")
    record = _quantize(model, 4, 32, False, embeddings=False)
    _export(model, tokenizer, tmp_path / "onnx", record)
    m = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    init = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    a = model.model.layers[1].self_attn
    q, k = a.q_proj, a.k_proj
    qw = init["model.layers.1.self_attn.qkv_proj.qweight"]
    assert np.array_equal(qw[: q.out_features], q.qweight.numpy())
    assert np.array_equal(qw[q.out_features : q.out_features + k.out_features], k.qweight.numpy())
    sc = init["model.layers.1.self_attn.qkv_proj.scales"].reshape(qw.shape[0], -1)
    assert sc.dtype == np.float16  # 2 bytes per group in the file; a Cast widens them for MatMulNBits
    assert np.array_equal(sc[: q.out_features], q.scales.numpy())
    (cast,) = [n for n in m.graph.node if n.input == ["model.layers.1.self_attn.qkv_proj.scales"]]
    assert cast.op_type == "Cast" and any(
        n.op_type == "MatMulNBits" and n.input[2] == cast.output[0] for n in m.graph.node
    )
    zp = init["model.layers.1.self_attn.qkv_proj.qzeros"].reshape(qw.shape[0], -1)
    assert np.array_equal(
        np.stack([zp & 15, zp >> 4], -1).reshape(qw.shape[0], -1)[: q.out_features, : sc.shape[1]], q.qzeros.numpy()
    )


def test_files_metadata_and_alignment(tokenizer, tmp_path):
    model = _model("llama")
    record = _quantize(model, 4, 32, True, embeddings=True)
    _export(model, tokenizer, tmp_path / "onnx", record)
    out = tmp_path / "onnx"
    for f in ("model.onnx", "model.onnx.data", "tokenizer.json", "generation_config.json", "edgellm.json"):
        assert (out / f).is_file(), f
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["edgellm.format_version"] == "1"
    cfg = json.loads(meta["edgellm.config"])
    assert (
        cfg["architecture"] == "llama" and cfg["num_kv_heads"] == 2 and cfg["head_dim"] == 16 and cfg["norm"] == "rms"
    )
    assert cfg["rope_theta"] == 10000.0 and cfg["tie_word_embeddings"] is False and cfg["mlp"] == "gated"
    q = json.loads(meta["edgellm.quantization"])
    tensor_bits = q.pop("tensor_bits")  # every packed tensor's own width (8-bit embeddings, mixed plans)
    assert tensor_bits and set(tensor_bits.values()) == {4} and "model.embed_tokens" in tensor_bits
    assert q == {
        "bits": 4,
        "group_size": 32,
        "sym": True,
        "method": "rtn",
        "embeddings": True,
        "accuracy_level": 4,
        "format": "matmulnbits",
    }
    assert json.loads(meta["edgellm.source"])["steps"][0]["step"] == "quantize"
    for t in m.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        assert ext["location"] == "model.onnx.data" and int(ext["offset"]) % 64 == 0, t.name
    assert [i.name for i in m.graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert m.graph.output[0].name == "logits" and m.graph.output[1].name.startswith("present.")
    rec = json.loads((out / "edgellm.json").read_text())
    assert rec["steps"][-1]["step"] == "export" and rec["steps"][-1]["parity"]["onnx_checker"] == "passed"


def test_failed_check_keeps_export_elsewhere(tokenizer, tmp_path, monkeypatch):
    model = _model("gpt2")
    monkeypatch.setattr(check_mod, "reference_logits", lambda m, ids: reference_logits(m, ids) + 0.5)
    with pytest.raises(ParityError, match=r"max \|Δlogit\| vs PyTorch = 0\.5"):
        _export(model, tokenizer, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
    assert (tmp_path / "onnx.failed-check" / "model.onnx").is_file()


# -- CLI ----------------------------------------------------------------------------------------


def _cli(*args):
    from typer.testing import CliRunner

    from edgellm.cli import app

    return CliRunner().invoke(app, ["export", *map(str, args)])


def test_cli_quantized_dir(tiny_dirs, tokenizer, tmp_path):
    from edgellm.modelio import load_model, save_model

    loaded = load_model(tiny_dirs["qwen2"])
    record = _quantize(loaded.model, 4, 32, False, embeddings=True)
    save_model(loaded.model, tokenizer, tmp_path / "q4", record)
    r = _cli(tmp_path / "q4", "-o", tmp_path / "onnx", "--format", "qdq")
    assert r.exit_code == 0, r.output
    assert "parity" in r.output and (tmp_path / "onnx" / "model.onnx").is_file()


@pytest.mark.parametrize("kind", ["not-a-model", "unsupported", "exists"])
def test_cli_bad_input(kind, tiny_dirs, tmp_path):
    out = tmp_path / "out"
    src = tmp_path / "src"
    src.mkdir()
    if kind == "unsupported":
        (src / "config.json").write_text(
            json.dumps(
                {
                    "model_type": "bert",
                    "vocab_size": 100,
                    "hidden_size": 16,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "intermediate_size": 32,
                }
            )
        )
    if kind == "exists":
        src = tiny_dirs["llama"]
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    r = _cli(src, "-o", out)
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    if kind == "exists":
        assert "--force" in r.output and [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
        assert ("llama" in r.output.lower()) if kind == "unsupported" else ("not a model" in r.output)
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_cli_fp16_dir(tokenizer, tmp_path):
    """A float16 checkpoint (e.g. a distilled student saved in half precision) exports as fp32
    values, so parity holds at the fp32 tolerance."""
    model = _model("mistral").half()
    tiny.save(model, tokenizer, tmp_path / "fp16")
    r = _cli(tmp_path / "fp16", "-o", tmp_path / "onnx")
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "onnx" / "edgellm.json").read_text())
    assert rec["steps"][-1]["parity"]["max_abs_diff"] <= FP_TOL
