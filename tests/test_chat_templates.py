"""Issue 25: each family's chat template renders in the runtime's Jinja environment exactly as
transformers renders it (tests/chat_templates.py: short faithful copies), Qwen3's
enable_thinking included, through `run --chat --no-think` and the server's
`chat_template_kwargs`; Gemma 3 (no system role) merges the system prompt into the first user
turn as its template does."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from chat_templates import TEMPLATES  # noqa: E402
from guards import one_line_error  # noqa: E402

import tiny  # noqa: E402
from edgellm.cli import app  # noqa: E402

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
    {"role": "user", "content": "And 3 + 3?"},
]


def _tokenizer_dir(tokenizer, root: Path, template: str) -> Path:
    """The test tokenizer saved with `template` as its chat template."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    tok.save_pretrained(str(root))
    return root


@pytest.mark.parametrize("family", list(TEMPLATES))
@pytest.mark.parametrize("thinking", [None, False])
def test_template_renders_as_transformers(tokenizer, tmp_path, family, thinking):
    from edgellm.runtime.generate import Tokenizer

    opts = {} if thinking is None else {"enable_thinking": thinking}
    path = _tokenizer_dir(tokenizer, tmp_path, TEMPLATES[family])
    got = Tokenizer(path).apply_chat_template(CHAT, **opts)
    want = tokenizer.apply_chat_template(
        CHAT, chat_template=TEMPLATES[family], tokenize=False, add_generation_prompt=True, **opts
    )
    assert got == want
    if family == "qwen3":
        assert got.endswith("<think>\n\n</think>\n\n") == (thinking is False)
        assert "add them" not in got  # earlier turns' reasoning is dropped by the template
    if family == "gemma3_text":  # no system role: merged into the first user turn
        assert "<start_of_turn>user\nYou are terse.\n\nWhat is 2 + 2?<end_of_turn>" in got
        assert "system" not in got and got.endswith("<start_of_turn>model\n")


def test_gemma_template_refuses_non_alternating_roles(tokenizer, tmp_path):
    from edgellm.errors import EdgeLLMError
    from edgellm.runtime.generate import Tokenizer

    tok = Tokenizer(_tokenizer_dir(tokenizer, tmp_path, TEMPLATES["gemma3_text"]))
    with pytest.raises(EdgeLLMError, match="chat template: Conversation roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


@pytest.fixture(scope="module")
def qwen3_chat(tokenizer, tmp_path_factory):
    """A tiny Qwen3 fp32 export whose tokenizer carries Qwen3's template."""
    from edgellm.export.exporter import export_model
    from edgellm.export.weights import Options
    from edgellm.modelio import Loaded

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TEMPLATES["qwen3"]
    path = tmp_path_factory.mktemp("qwen3-chat") / "onnx"
    export_model(Loaded(tiny.build("qwen3"), tok, "t", {"steps": []}), path, Options(), False)
    return path


def test_run_chat_no_think(qwen3_chat, tmp_path):
    from edgellm.runtime.generate import Sampling, load

    r = CliRunner().invoke(
        app, ["run", str(qwen3_chat), "--chat", "--no-think", "-p", "hi", "-n", "3", "--temperature", "0"], input=""
    )
    assert r.exit_code == 0, r.output
    line = one_line_error(["run", str(qwen3_chat), "-p", "hi", "--no-think"])
    assert "--chat" in line
    gen = load(qwen3_chat, threads=2, n_ctx=128, warmup=False)
    gen.template_options["enable_thinking"] = False
    list(gen.chat("hi", Sampling(max_new_tokens=2, temperature=0.0)))
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\n" in gen.tokenizer.decode(gen.cached)
    gen.model.close()


def test_serve_chat_template_kwargs(qwen3_chat):
    pytest.importorskip("uvicorn")
    from test_serve import Server

    from edgellm.runtime.generate import Tokenizer

    s = Server(qwen3_chat)
    try:
        msgs = [{"role": "user", "content": "hi"}]
        body = {"model": qwen3_chat.name, "messages": msgs, "max_tokens": 1, "temperature": 0}
        tok = Tokenizer(qwen3_chat)
        for opts in ({}, {"enable_thinking": False}):
            status, _, out = s.call("POST", "/v1/chat/completions", dict(body, chat_template_kwargs=opts or None))
            assert status == 200, out
            want = len(tok.encode(tok.apply_chat_template(msgs, **opts), special=False))
            assert out["usage"]["prompt_tokens"] == want
        for bad in ([1], {"enable_thinking": [1]}, {"messages": []}):
            status, _, out = s.call("POST", "/v1/chat/completions", dict(body, chat_template_kwargs=bad))
            assert status == 400 and out["error"]["param"] == "chat_template_kwargs", out
    finally:
        s.close()


def test_exported_stop_tokens(qwen3_chat, tmp_path):
    """The family's stop tokens come from generation_config.json beside the export (Gemma 3:
    <eos> and <end_of_turn>; Qwen3: <|im_end|> and <|endoftext|>)."""
    from edgellm.runtime.generate import load

    path = tmp_path / "e"
    shutil.copytree(qwen3_chat, path)
    gc = json.loads((path / "generation_config.json").read_text()) if (path / "generation_config.json").exists() else {}
    gc["eos_token_id"] = [0, 7]
    (path / "generation_config.json").write_text(json.dumps(gc))
    gen = load(path, threads=2, n_ctx=64, warmup=False)
    assert {0, 7} <= gen.eos_ids
    assert np.isfinite(gen.model.forward([1])).all()
    gen.model.close()
