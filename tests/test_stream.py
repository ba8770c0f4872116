"""Layer-streaming quantize (issue 26): equal to the resident path, resumable, within a budget,
and bad checkpoints refused before loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from edgellm.cli import app
from edgellm.errors import EdgeLLMError
from edgellm.pipeline.quantize import Method, QuantizeOptions, _run_resident, quant_config, run_quantize

SMALL = dict(calib_samples=8, seq_len=64, eval_tokens=1024)


def _opts(**kw):
    return QuantizeOptions(**{**SMALL, **kw})


def _both(model, tmp_path, **kw):
    o = _opts(**kw)
    resident = _run_resident(str(model), tmp_path / "resident", o, quant_config(o), None, False)
    streamed = run_quantize(str(model), tmp_path / "streamed", o)
    a = load_file(str(tmp_path / "resident" / "model.safetensors"))
    b = load_file(str(tmp_path / "streamed" / "model.safetensors"))
    return resident, streamed, a, b


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rtn_streamed_is_bit_identical(family, tiny_dirs, trained_llama, tmp_path):
    model = trained_llama if family == "llama" else tiny_dirs[family]  # qwen2: tied embeddings
    resident, streamed, a, b = _both(model, tmp_path, method=Method.rtn)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert resident.info == streamed.info
    assert resident.after.perplexity == pytest.approx(streamed.after.perplexity, rel=1e-6)
    assert resident.before.perplexity == pytest.approx(streamed.before.perplexity, rel=1e-6)
    assert not list(tmp_path.glob(".*partial*"))  # the work folder goes once the output is in place


def test_gptq_streamed_matches_resident(trained_llama, tmp_path):
    resident, streamed, a, b = _both(trained_llama, tmp_path, method=Method.gptq)
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("qweight") and "layers" in k:  # GPTQ: float noise may flip a rare rounding
            assert (a[k] == b[k]).float().mean() > 0.999, k
        else:
            assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-6), k
    assert f"{resident.after.perplexity:.4g}" == f"{streamed.after.perplexity:.4g}"
    assert f"{resident.before.perplexity:.4g}" == f"{streamed.before.perplexity:.4g}"


class _StopAfter:
    """A progress object that interrupts the run once `line` has been noted (a Ctrl-C mid-run)."""

    def __init__(self, line: str):
        self.line = line

    def track(self, iterable, description="", total=None):
        return iterable

    def status(self, message):
        import contextlib

        return contextlib.nullcontext()

    def note(self, message):
        if message.startswith(self.line):
            raise KeyboardInterrupt


def test_resume_continues_and_refuses_other_options(trained_llama, tmp_path):
    from edgellm.quant.stream import work_dir

    whole = run_quantize(str(trained_llama), tmp_path / "whole", _opts(method=Method.rtn))
    out = tmp_path / "q"
    with pytest.raises(KeyboardInterrupt):
        run_quantize(str(trained_llama), out, _opts(method=Method.rtn), progress=_StopAfter("layer 1/2"))
    assert not out.exists() and json.loads((work_dir(out) / "state.json").read_text())["next"] == 1
    with pytest.raises(EdgeLLMError, match="other options"):
        run_quantize(str(trained_llama), out, _opts(method=Method.rtn, bits=8, resume=True))
    assert not out.exists()
    resumed = run_quantize(str(trained_llama), out, _opts(method=Method.rtn, resume=True))
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.after.perplexity == whole.after.perplexity and not work_dir(out).exists()


def test_max_memory_below_one_layer_is_refused(tiny_dirs, tmp_path):
    r = CliRunner().invoke(
        app, ["quantize", str(tiny_dirs["llama"]), "-o", str(tmp_path / "q"), "--max-memory", "1MB", "--no-eval"]
    )
    assert r.exit_code == 2 and "quantizing one decoder layer needs about" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "q").exists()
    assert not list(tmp_path.iterdir())


def _bad_copy(src, dst, edit):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg, dst)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _missing_shard(cfg, d):
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shards[0], "b": shards[1]}}))


BAD = {
    "wrong type": (lambda c, d: c.update(hidden_size="64"), "hidden_size is '64'"),
    "zero heads": (lambda c, d: c.update(num_attention_heads=0), "num_attention_heads is 0"),
    "shapes": (lambda c, d: c.update(intermediate_size=128), "config.json implies [128, 64]"),
    "missing shard": (_missing_shard, "missing shard(s) model-00002-of-00002"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("command", ["info", "quantize", "prune", "export", "eval"])
def test_bad_checkpoint_is_one_line_exit_2(case, command, tiny_dirs, tmp_path):
    edit, message = BAD[case]
    model = _bad_copy(tiny_dirs["llama"], tmp_path / "bad", edit)
    out = tmp_path / "out"
    args = {
        "info": [],
        "quantize": ["-o", str(out), "--no-eval"],
        "prune": ["-o", str(out), "--method", "magnitude", "--sparsity", "0.5", "--no-eval"],
        "export": ["-o", str(out)],
        "eval": [],
    }[command]
    r = CliRunner().invoke(app, [command, str(model), *args])
    assert r.exit_code == 2 and message in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not out.exists()


CHILD = """
import resource, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from edgellm.pipeline.quantize import QuantizeOptions, _run_resident, quant_config, run_quantize
import edgellm.quant.stream, transformers.models.llama.modeling_llama  # both paths' imports (213 MB VmData)
def vm_data():
    for line in open('/proc/self/status'):
        if line.startswith('VmData:'):
            return int(line.split()[1]) * 1024
o = QuantizeOptions(method='rtn', calib_samples=4, seq_len=64, evaluate=False)
cap = vm_data() + {headroom}
resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
if '{mode}' == 'stream':
    run_quantize('{model}', Path('{out}'), o)
else:
    _run_resident('{model}', Path('{out}'), o, quant_config(o), None, False)
print('done')
"""
HEADROOM = 280 << 20  # above the VmData after both paths' imports. Measured (2026-12-07, RLIMIT_DATA, this model):
# streaming passed 160 MB above it and failed 140 MB above; the resident path failed 420 MB above and
# passed 480. The cap used to be set before the imports of transformers' llama (213 MB of VmData), at
# 360 MB: streaming needed 340-360 there, and failed once in CI.


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc and RLIMIT_DATA")
def test_quantize_fits_a_memory_cap_only_by_streaming(tmp_path, tokenizer):
    import subprocess
    import sys

    import tiny

    model = tiny.build(
        "llama",
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=24,
        num_attention_heads=4,
        num_key_value_heads=4,
    ).to(torch.bfloat16)
    src = tiny.save(model, tokenizer, tmp_path / "m")
    del model

    def child(mode):
        code = CHILD.format(headroom=HEADROOM, mode=mode, model=src, out=tmp_path / mode)
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)

    r = child("stream")
    assert r.returncode == 0 and "done" in r.stdout, r.stderr[-2000:]
    assert (tmp_path / "stream" / "model.safetensors").is_file()
    r = child("resident")  # the cap is real: the whole model in fp32 does not fit under it
    # out of memory shows as MemoryError, or as a thread whose stack cannot be mapped under the cap
    oom = ("memory" in r.stderr.lower(), "can't start new thread" in r.stderr)
    assert r.returncode != 0 and any(oom), r.stderr[-2000:]
    assert not (tmp_path / "resident").exists()
