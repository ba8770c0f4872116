"""`edgellm distill --draft-for` (issue 29): a draft distilled on the target's own greedy text is
accepted more often by speculative decoding than the same draft before training and than a random
one of the same shape, and `run --draft` with it prints plain greedy's text; the recipe stage and
bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from guards import one_line_error
from typer.testing import CliRunner

import tiny
from edgellm.cli import app

PROMPTS = [
    "The tutorial introduces the reader informally to the basic concepts",
    "def f(x):\n    return",
    "A module is a file containing Python definitions and statements.",
    "The for statement in Python differs a bit from what you may be used to",
]


@pytest.fixture(scope="module")
def pair(tokenizer, tmp_path_factory):
    """A briefly trained 3-layer target; its draft (1 layer, distilled with --draft-for), the same
    draft untrained, and a random 1-layer model: all 4-bit exports with the target's tokenizer."""
    from edgellm.distill.draft import draft_from_target

    root = tmp_path_factory.mktemp("draft")
    target = tiny.build("llama", num_hidden_layers=3, seed=1)
    tiny.train(target, tokenizer, steps=80, seq_len=64, batch=8, lr=5e-3)
    tdir = tiny.save(target, tokenizer, root / "target")
    runner = CliRunner()
    r = runner.invoke(
        app,
        ["distill", "--draft-for", str(tdir), "--draft-layers", "1", "--prompts", "96", "--gen-tokens", "32"]
        + ["--steps", "80", "--seed", "0", "--prompt-style", "continue", "--out", str(root / "draft")],
    )
    assert r.exit_code == 0, r.output
    untrained, _, _ = draft_from_target(target, 1)
    dirs = {
        "target": tdir,
        "draft": root / "draft",
        "untrained": tiny.save(untrained, tokenizer, root / "untrained"),
        "random": tiny.save(tiny.build("llama", num_hidden_layers=1, seed=2), tokenizer, root / "random"),
    }
    out = {"log": r.output}
    for name, src in dirs.items():
        out[name] = tiny.export_q4(src, root, name)
    out["target_dir"], out["draft_dir"] = tdir, root / "draft"
    return out


def test_draft_output_and_record(pair):
    """The draft: 1 layer, the target's tokenizer, embeddings and head (frozen: bit-equal), the held-out
    agreement reported and improved by training."""
    from safetensors.torch import load_file

    d, t = Path(pair["draft_dir"]), Path(pair["target_dir"])
    assert json.loads((d / "config.json").read_text())["num_hidden_layers"] == 1
    assert (d / "tokenizer.json").read_bytes() == (t / "tokenizer.json").read_bytes()
    dw, tw = load_file(d / "model.safetensors"), load_file(t / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(dw[name], tw[name]), name
    step = json.loads((d / "edgellm.json").read_text())["steps"][-1]
    assert step["draft_for"]["spec"] == str(t) and step["student"]["from_target_layers"] == [0]
    assert sorted(step["student"]["frozen"]) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert step["data"]["prompt_style"] == "continue"  # as asked (the briefly trained target's text is easy
    # to predict after a request: the untrained draft already agreed 90% there, too close to show training)
    q = step["quality"]
    assert q["draft"]["agreement"] > q["initial"]["agreement"] + 0.1, q
    assert q["draft"]["kl"] < q["initial"]["kl"], q
    assert "agreement with the target" in " ".join(pair["log"].split())
    assert not list(d.parent.glob("draft.tmp*"))  # written through a temporary sibling, renamed


def test_task_prompts(tokenizer):
    """--prompt-style tasks: each window of data inside a request (the templates in turn), every
    prompt the same length, the window a contiguous slice of the data; auto picks tasks for a chat
    template and the bare window without one (the old prompts, token for token)."""
    import copy

    from edgellm.distill.draft import TASK_TEMPLATES, PromptStyle, chat_frame, prompts
    from edgellm.pipeline.common import data_tokens

    ids = data_tokens(tokenizer, None)[:20_000]
    n = 2 * len(TASK_TEMPLATES)
    rows, chat, style = prompts(tokenizer, ids, n, 24, seed=3)  # the function's default: continue
    assert (chat, style) == (True, PromptStyle.continue_)
    before, after = chat_frame(tokenizer)
    rows_auto, _, style_auto = prompts(tokenizer, ids, n, 24, seed=3, style="auto")
    assert style_auto is PromptStyle.tasks and rows_auto.shape[1] > rows.shape[1]
    text = ids.tolist()
    for i, row in enumerate(rows_auto.tolist()):
        body = row[len(before) : len(row) - len(after)]
        a, b = (
            tokenizer(x, add_special_tokens=False)["input_ids"] if x else []
            for x in TASK_TEMPLATES[i % len(TASK_TEMPLATES)]
        )
        assert body[: len(a)] == a and body[len(body) - len(b) :] == b, i
        window = body[len(a) : len(body) - len(b)]
        assert len(window) >= 24
        starts = [s for s in range(len(text) - len(window)) if text[s : s + len(window)] == window]
        assert starts, i  # a contiguous slice of the data
    for row in rows.tolist():  # continue: the bare window of 24 tokens
        assert len(row) == len(before) + 24 + len(after)
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    rows_plain, chat_plain, style_plain = prompts(plain, ids, n, 24, seed=3, style="auto")
    assert (chat_plain, style_plain) == (False, PromptStyle.continue_)
    assert torch.equal(rows_plain, rows[:, len(before) : rows.shape[1] - len(after)])


def test_default_prompts_are_requests_for_a_chat_target(pair, tmp_path):
    """`--prompt-style auto` (the default) on a target with a chat template: the prompts are requests
    around windows of the data, longer than the bare windows, recorded in edgellm.json."""
    from transformers import AutoTokenizer

    from edgellm.distill.draft import chat_frame

    r = CliRunner().invoke(
        app,
        ["distill", "--draft-for", str(pair["target_dir"]), "--prompts", "16", "--gen-tokens", "4", "--steps", "2"]
        + ["--prompt-tokens", "8", "--no-eval", "--out", str(tmp_path / "d")],
    )
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "d" / "edgellm.json").read_text())["steps"][-1]["data"]
    assert data["prompt_style"] == "tasks" and data["prompts"] == 16, data
    frame = sum(map(len, chat_frame(AutoTokenizer.from_pretrained(str(pair["target_dir"])))))
    assert data["prompt_len"] > frame + 8, data  # 8 tokens of data + the request


def _acceptance(pair, name):
    from edgellm.runtime import speculate as S
    from edgellm.runtime.generate import Generator, Sampling, Tokenizer
    from edgellm.runtime.model import NumbaModel

    m = NumbaModel(pair["target"], n_ctx=256, threads=2, kv_cache="fp32")
    gen = Generator(m, Tokenizer(pair["target"]), set(m.config.eos_token_ids))
    draft = S.DraftModel(NumbaModel(pair[name], n_ctx=256, threads=2, kv_cache="fp32"))
    p = Sampling(temperature=0, max_new_tokens=32, ignore_eos=True)
    drafted = accepted = 0
    for prompt in PROMPTS:
        plain, spec = [], []
        gen.speculator = None
        for _ in gen.stream(prompt, p, observe=lambda tok, lg: plain.append(tok)):
            pass
        gen.speculator = S.Speculator(draft, k_max=4)
        for _ in gen.stream(prompt, p, observe=lambda tok, lg: spec.append(tok)):
            pass
        assert spec == plain, (name, prompt)  # speculation never changes greedy output
        drafted += gen.stats.spec.drafted
        accepted += gen.stats.spec.accepted
    return accepted / drafted


def test_distilled_draft_is_accepted_more(pair):
    """Measured by the runtime's speculation: the distilled draft's acceptance beats the same draft
    untrained and a random draft of the same shape."""
    got = {name: _acceptance(pair, name) for name in ("draft", "untrained", "random")}
    # measured under the lock: draft 89.3%, untrained 87.6%, random 0% on these prompts (the briefly trained
    # target's greedy text is repetitive, so the untrained copy of its first layer already agrees often; the
    # held-out agreement of test_draft_output_and_record separates them: 72% -> 94%)
    assert got["draft"] > got["untrained"] and got["draft"] > got["random"] + 0.3, got
    assert got["draft"] > 0.6, got


def test_run_with_the_draft_prints_plain_greedy(pair):
    t, d = str(pair["target"]), str(pair["draft"])
    args = ["run", t, "-p", PROMPTS[0], "-n", "24", "-t", "0", "--ignore-eos"]
    plain = CliRunner().invoke(app, args)
    spec = CliRunner().invoke(app, [*args, "--draft", d, "-v"])
    assert plain.exit_code == 0 and spec.exit_code == 0, spec.output
    assert "speculation:" in spec.output
    assert plain.output.split("prompt:")[0].strip() in spec.output


def test_bad_input(pair, tmp_path):
    t = str(pair["target_dir"])
    out = ["-o", str(tmp_path / "x")]
    assert "must be smaller than the target's 3 layers" in one_line_error(
        ["distill", "--draft-for", t, "--draft-layers", "3", *out]
    )
    (tmp_path / "empty").mkdir()
    assert "not a model" in one_line_error(["distill", "--draft-for", str(tmp_path / "empty"), *out])
    assert "export" in one_line_error(["distill", "--draft-for", str(pair["target"]), *out])
    assert "not both" in one_line_error(["distill", t, "--draft-for", t, *out])
    assert "does not apply with --draft-for" in one_line_error(
        ["distill", "--draft-for", t, "--student-layers", "1", *out]
    )
    assert "needs --draft-for" in one_line_error(["distill", t, "--draft-layers", "1", *out])
    assert "TEACHER" in one_line_error(["distill", *out])
    assert "out of range" in one_line_error(["distill", "--draft-for", t, "--lr", "0", *out])
    assert not (tmp_path / "x").exists()


def test_recipe_checks_the_draft_chain(pair, tmp_path):
    """A draft stage starts a second chain (quantize and export again are allowed after it); a draft
    stage's target is the recipe's model, not an option."""
    from edgellm.errors import EdgeLLMError
    from edgellm.recipe import spec

    doc = {
        "model": str(pair["target_dir"]),
        "stages": [
            {"name": "tq", "quantize": {"bits": 4, "method": "rtn"}},
            {"name": "tx", "export": {}},
            {"draft": {"draft-layers": 1, "steps": 5}},
            {"name": "dq", "quantize": {"bits": 4, "method": "rtn"}},
            {"name": "dx", "export": {}},
        ],
    }
    r = spec.parse(doc)
    assert [s.command for s in r.stages] == ["quantize", "export", "draft", "quantize", "export"]
    assert r.stages[2].options == {"draft_layers": 1, "steps": 5}
    bad = dict(doc, stages=[*doc["stages"][:2], {"draft": {"target": "x"}}, {"name": "q2", "quantize": {}}])
    with pytest.raises(EdgeLLMError) as e:
        spec.parse(bad)
    assert "unknown option 'target'" in str(e.value)
    spec.read_recipe(Path(__file__).parents[1] / "recipes" / "smollm2-draft.yaml")  # the shipped recipe checks


def test_sparse_kl_is_the_kl_of_the_coarsened_distributions():
    from edgellm.distill.losses import kl_loss, sparse_kl

    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(6, 40, generator=g) * 3, torch.randn(6, 40, generator=g) * 3
    lp = torch.log_softmax(t, -1)
    v, i = lp.topk(40, -1)
    assert torch.allclose(sparse_kl(s, v, i), kl_loss(s, t), atol=1e-5)  # k = V: the full KL
    v, i = lp.topk(4, -1)
    p, q = lp.exp(), torch.softmax(s, -1)
    keep = torch.zeros_like(p, dtype=torch.bool).scatter(-1, i, True)
    pc = torch.cat([p.gather(-1, i), (p * ~keep).sum(-1, keepdim=True)], -1)  # (6, 5) coarsened
    qc = torch.cat([q.gather(-1, i), (q * ~keep).sum(-1, keepdim=True)], -1)
    want = (pc * (pc.log() - qc.log())).sum(-1).mean()
    assert torch.allclose(sparse_kl(s, v, i), want, atol=1e-5)
    mask = torch.tensor([True, False, True, True, False, True])
    assert np.isclose(float(sparse_kl(s, v, i, mask)), float((pc * (pc.log() - qc.log())).sum(-1)[mask].mean()))
