"""GGUF input per family (issue 25): a tiny seeded Qwen3 / Gemma 3 / Phi-3 written as llama.cpp
writes it (benchmarks/scripts/hf_to_gguf.py, tokenizer metadata included) gives, through `edgellm
info`, `quantize` and `export`, the same model as its Hugging Face directory; the families
transformers cannot read from a GGUF (granite, olmo2, smollm3) get one `error:` line, exit 2.

Each tiny config sets what transformers' GGUF key table leaves out (edgellm/gguf_input.py): Qwen3's
head_dim 24, Phi-3's partial rotary 0.75 (and LongRoPE), Gemma 3's attention scale from head_dim
16. A test shows transformers alone would read them otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from guards import one_line_error  # noqa: E402

import tiny  # noqa: E402
from edgellm.benchmarks.scripts.hf_to_gguf import write_gguf  # noqa: E402
from edgellm.cli import app  # noqa: E402

# each family with what sets it apart that a GGUF must carry (Gemma 3: six layers, so the 5:1
# pattern llama.cpp implies has a global layer; no soft-caps, as Gemma 3 has none)
CASES = {
    "qwen3": dict(),
    "phi3": dict(),
    "gemma3_text": dict(
        num_hidden_layers=6,
        layer_types=None,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
        bos_token_id=2,
        eos_token_id=1,
    ),
}
TEXT = "def add(a, b):\n    return a + b  # é"


def _longrope_phi3():
    """Phi-4-mini's rope (LongRoPE over 0.75 partial rotary, original context 32) at tiny size."""
    half = 6
    return tiny.build(
        "phi3",
        initializer_range=0.15,
        rope_parameters=None,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0 + 0.3 * i for i in range(half)],
            "long_factor": [3.0 + 2.0 * i for i in range(half)],
        },
        original_max_position_embeddings=32,
        partial_rotary_factor=0.75,
        rope_theta=10000.0,
    )


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """{case: (Hugging Face dir, .gguf written from it)}."""
    root = tmp_path_factory.mktemp("gguf-families")
    out = {}
    for name, over in [*CASES.items(), ("phi3-longrope", None)]:
        model = _longrope_phi3() if over is None else tiny.build(name, **over)
        src = root / name
        model.save_pretrained(str(src), safe_serialization=True)
        # Gemma's is a sentencepiece vocabulary (GGUF "llama"); Qwen3 and Phi-4-mini byte-level BPE ("gpt2")
        (tiny.make_sentencepiece_tokenizer if name == "gemma3_text" else tiny.make_tokenizer)(src)
        write_gguf(src, root / f"{name}.gguf")
        out[name] = (src, root / f"{name}.gguf")
    return out


def _invoke(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def _logits(export: Path, ids: list[int]) -> np.ndarray:
    """Every position's logits of an fp32 export, run by ONNX Runtime without a cache."""
    from edgellm.runtime import load

    gen = load(str(export), backend="onnxruntime", threads=1, warmup=False)
    try:
        return np.asarray(gen.model.forward(ids, True))
    finally:
        gen.model.close()


def _tensors(path: Path) -> dict:
    from safetensors.numpy import load_file

    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("name", [*CASES, "phi3-longrope"])
def test_gguf_gives_the_same_model(ggufs, tmp_path, name):
    """info names the family; the fp32 export from the .gguf computes the HF directory's logits
    (within 1e-4 of their scale, 40 positions: past LongRoPE's switch at 32) and tokenizes alike;
    RTN quantize from either gives the same codes."""
    from transformers import AutoTokenizer

    src, gguf = ggufs[name]
    family = name.split("-")[0]
    assert family in _invoke("info", gguf)
    _invoke("export", src, "-o", tmp_path / "hf-onnx", "--no-check")
    _invoke("export", gguf, "-o", tmp_path / "gguf-onnx")  # with the ORT-vs-PyTorch parity check
    ids = AutoTokenizer.from_pretrained(str(src))(TEXT)["input_ids"]
    ids = (ids * 3)[:40]
    a, b = _logits(tmp_path / "hf-onnx", ids), _logits(tmp_path / "gguf-onnx", ids)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max(), np.abs(a - b).max()
    from edgellm.runtime.generate import Tokenizer

    assert Tokenizer(tmp_path / "gguf-onnx").encode(TEXT) == Tokenizer(tmp_path / "hf-onnx").encode(TEXT)
    if name in ("qwen3", "gemma3_text"):
        q = ["quantize", "--bits", "4", "--group-size", "16", "--method", "rtn", "--no-eval", "-o"]
        _invoke(q[0], src, *q[1:], tmp_path / "q-hf")
        _invoke(q[0], gguf, *q[1:], tmp_path / "q-gguf")
        ta, tb = _tensors(tmp_path / "q-hf"), _tensors(tmp_path / "q-gguf")
        assert ta.keys() == tb.keys()
        assert all(np.array_equal(ta[k], tb[k]) for k in ta)


def test_transformers_alone_reads_these_ggufs_otherwise(ggufs):
    """What edgellm/gguf_input.py sets is real: transformers' own reading of the files differs."""
    from transformers import AutoConfig

    from edgellm.modelio import load_config

    def both(name):
        _, gguf = ggufs[name]
        return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name), load_config(str(gguf))

    plain, ours = both("qwen3")
    assert (plain.head_dim, ours.head_dim) == (128, 24)
    plain, ours = both("phi3")
    assert plain.rope_parameters["partial_rotary_factor"] == 1.0
    assert ours.rope_parameters["partial_rotary_factor"] == 0.75
    plain, ours = both("gemma3_text")
    assert (plain.query_pre_attn_scalar, ours.query_pre_attn_scalar) == (256, 16)
    plain, ours = both("phi3-longrope")
    assert plain.rope_parameters.get("rope_type", "default") == "default"
    assert ours.rope_parameters["rope_type"] == "longrope"
    assert ours.rope_parameters["short_factor"][1] == pytest.approx(1.3)


def _foreign_gguf(path: Path, arch: str) -> Path:
    """A minimal GGUF of an architecture transformers does not read from GGUF."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch", ["granite", "olmo2", "smollm3"])
@pytest.mark.parametrize("command", ["info", "quantize", "export"])
def test_unreadable_family_gguf_one_line(tmp_path, arch, command):
    src = _foreign_gguf(tmp_path / f"{arch}.gguf", arch)
    out = tmp_path / "out"
    args = [command, str(src)] + ([] if command == "info" else ["-o", str(out)])
    line = one_line_error(args + (["--no-eval"] if command == "quantize" else []))
    assert arch in line and "not supported" in line, line
    assert not out.exists()


@pytest.mark.parametrize(
    "what,says",
    [("rope_scaling_yarn", "rope.scaling.type 'yarn'"), ("longrope_without_factors", "rope_factors_long")],
)
def test_gguf_metadata_transformers_drops_is_refused(ggufs, tmp_path, what, says):
    """A rope scaling transformers would silently drop, or LongRoPE missing its factors: one line."""
    import gguf

    src, _ = ggufs["phi3"]
    dst = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(dst), "phi3")
    reader = gguf.GGUFReader(str(ggufs["phi3"][1]))
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        val = f.contents()
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_array(name, val)
        else:
            w.add_key_value(name, val, f.types[0])
    if what == "rope_scaling_yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    else:
        w.add_rope_scaling_orig_ctx_len(32)
        w.add_tensor("rope_factors_short.weight", np.ones(6, np.float32))
    for t in reader.tensors:
        w.add_tensor(t.name, np.asarray(t.data).reshape([int(x) for x in reversed(t.shape.tolist())]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    line = one_line_error(["info", str(dst)])
    assert says in line, line
