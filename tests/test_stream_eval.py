"""The streamed evaluation (issue 26): each model one decoder layer at a time, equal to the
resident evaluation, and --max-memory planned before any work."""

from __future__ import annotations

from typer.testing import CliRunner

from edgellm.cli import app
from edgellm.data import split_tokens
from edgellm.evaluate import evaluate
from edgellm.modelio import load_model
from edgellm.pipeline.common import data_tokens
from edgellm.pipeline.evaluate import EvalOptions, run_eval
from edgellm.pipeline.quantize import Method, QuantizeOptions, run_quantize


def test_streamed_eval_equals_resident(trained_llama, tmp_path):
    q = run_quantize(
        str(trained_llama), tmp_path / "q", QuantizeOptions(method=Method.rtn, calib_samples=4, seq_len=32)
    ).output
    got = run_eval(str(q), EvalOptions(reference=str(trained_llama), ctx=64, stride=32, eval_tokens=512)).quality
    m, r = load_model(str(q)), load_model(str(trained_llama))
    ids = split_tokens(data_tokens(m.tokenizer, None), "eval")
    want = evaluate(m.model, ids, reference=r.model, ctx=64, stride=32, max_tokens=512)
    assert got.tokens == want.tokens and got.top1 == want.top1
    assert f"{got.perplexity:.4g}" == f"{want.perplexity:.4g}" and f"{got.kl:.4g}" == f"{want.kl:.4g}"
    assert got.kl > 0  # a real comparison: the 4-bit model differs from its source


def test_eval_max_memory_is_planned_first(trained_llama):
    r = CliRunner().invoke(app, ["eval", str(trained_llama), "--max-memory", "1MB"])
    assert r.exit_code == 2 and "evaluating layer by layer needs about" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_distill_max_memory_is_checked_first(trained_llama, tmp_path):
    r = CliRunner().invoke(app, ["distill", str(trained_llama), "-o", str(tmp_path / "d"), "--max-memory", "1MB"])
    assert r.exit_code == 2 and "distilling loads the teacher" in r.output and "1.00 MB" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not list(tmp_path.iterdir())
