"""lm-evaluation-harness scores `edgellm serve` (its `local-completions` model: echo + logprobs)
on a small multiple-choice task shipped in tests/data/lm_eval, and gets the accuracy (and every
choice's log-likelihood) that the same task scored directly from the runtime's logits gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_serve import Server

pytest.importorskip("lm_eval", reason="lm-eval is in the dev extra")

TASK_DIR = Path(__file__).parent / "data" / "lm_eval"
TASK = "edgellm_tiny_arith"


@pytest.fixture(scope="module")
def export(tiny_dirs, tmp_path_factory):
    from typer.testing import CliRunner

    from edgellm.cli import app

    dst = tmp_path_factory.mktemp("lm_eval") / "tiny-fp32"
    r = CliRunner().invoke(app, ["export", str(tiny_dirs["llama"]), "-o", str(dst), "--no-check"])
    assert r.exit_code == 0, r.output
    return dst


def _direct(export: Path) -> tuple[float, list[list[float]]]:
    """(accuracy, log-likelihood of each choice per item) from the runtime's logits, with the
    harness's tokenization of a (context, " " + choice) pair (TemplateLM._encode_pair)."""
    from edgellm.runtime import load
    from edgellm.runtime.logprobs import log_softmax

    gen = load(export, warmup=False)
    docs = [json.loads(line) for line in (TASK_DIR / "tiny_arith.jsonl").read_text().splitlines()]
    correct, lls = 0, []
    for doc in docs:
        row = []
        for choice in doc["choices"]:
            context, continuation = doc["question"], " " + choice
            ctx = gen.tokenizer.encode(context, special=False)
            cont = gen.tokenizer.encode(context + continuation, special=False)[len(ctx) :]
            lp = log_softmax(gen.score(ctx + cont))
            row.append(float(sum(lp[len(ctx) - 1 + j, t] for j, t in enumerate(cont))))
        lls.append(row)
        correct += int(np.argmax(row) == doc["answer"])
    return correct / len(docs), lls


def test_lm_eval_local_completions_equals_direct_scoring(export, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(TASK_DIR)  # the task's data_files path is relative to its folder
    server = Server(export)
    try:
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={
                "base_url": f"http://127.0.0.1:{server.port}/v1/completions",
                "model": export.name,
                "tokenizer": str(export),
                "tokenizer_backend": "huggingface",
                "tokenized_requests": True,
                "max_retries": 1,
            },
            tasks=[TASK],
            task_manager=TaskManager(include_path=str(TASK_DIR)),
            log_samples=True,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
    finally:
        server.close()
    acc, lls = _direct(export)
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    served = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    np.testing.assert_allclose(served, lls, rtol=0, atol=1e-4)
    assert out["results"][TASK]["acc,none"] == acc
