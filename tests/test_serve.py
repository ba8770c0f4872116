"""`edgellm serve`: the real `openai` client against the server on a tiny 4-bit export, its output
equal to `edgellm run`; OpenAI-shaped errors and status codes; API key; the bounded FIFO queue
(429 + Retry-After); a client that disconnects mid-stream; prefix reuse; SIGTERM; bad CLI input.

Every server binds 127.0.0.1 on an ephemeral port and is stopped by the test that starts it; every
client call has a timeout.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from guards import BLOCK_TORCH  # noqa: E402
from typer.testing import CliRunner

from edgellm.cli import app

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

TIMEOUT = 60  # seconds, any one client call
CTX = 512


@pytest.fixture(scope="module")
def export(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    runner = CliRunner()
    q4 = root / "llama-q4"
    r = runner.invoke(
        app,
        [
            "quantize",
            str(tiny_dirs["llama"]),
            "--bits",
            "4",
            "--group-size",
            "32",
            "--sym",
            "--method",
            "rtn",
            "--no-eval",
            "-o",
            str(q4),
        ],
    )
    assert r.exit_code == 0, r.output
    dst = root / "tiny-q4"
    r = runner.invoke(app, ["export", str(q4), "-o", str(dst), "--no-check"])
    assert r.exit_code == 0, r.output
    return dst


def slow_down(gen, seconds: float):
    """Make each model step take at least `seconds` more: a tiny model is so fast on an idle
    machine that a request would end before a test can queue another behind it or disconnect."""
    forward = gen.model.forward

    def slowed(*args, **kwargs):
        time.sleep(seconds)
        return forward(*args, **kwargs)

    gen.model.forward = slowed


class Server:
    """create_app(...) on uvicorn in a thread, on 127.0.0.1 and a free port."""

    def __init__(self, export, step_s: float = 0.0, **kw):
        from edgellm.runtime import load
        from edgellm.runtime.serve import bind, create_app

        self.gen = load(export, threads=2, n_ctx=CTX)
        if step_s:
            slow_down(self.gen, step_s)
        self.app = create_app(self.gen, export.name, **kw)
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, access_log=False, lifespan="on", log_config=None, timeout_keep_alive=5)
        )
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def client(self, key="none"):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=TIMEOUT)

    def call(self, method, path, body=None, headers=None):
        """(status, headers, parsed JSON) of one raw HTTP request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        raw = r.read()
        conn.close()
        return r.status, r.headers, json.loads(raw) if raw else None  # headers: case-insensitive

    def close(self):
        self.server.should_exit = True
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def server(export):
    s = Server(export)
    yield s
    s.close()


@pytest.fixture(scope="module")
def guarded(export):
    """API key, one running + one waiting request at most, no prefix reuse, small body limit,
    at least 10 ms a token (450 tokens take over 4 s)."""
    s = Server(export, step_s=0.01, api_key="sekrit", max_queue=1, reuse_prefix=False, max_body=8192)
    yield s
    s.close()


def _run(export, *args, stdin=""):
    r = CliRunner().invoke(app, ["run", str(export), "--threads", "2", "--ctx", str(CTX), *args], input=stdin)
    assert r.exit_code == 0, r.output
    assert r.stdout.endswith("\n")
    return r.stdout[:-1]


def _error(status, body, code=None):
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]["message"]


# ----------------------------------------------------------------------------- the openai client
def test_openai_client_equals_edgellm_run(server, export):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [export.name]
    assert client.models.retrieve(export.name).id == export.name
    kw = dict(model=export.name, max_tokens=24, temperature=0.8, seed=7)

    # completions: non-streaming and streaming give edgellm run's text, usage and finish_reason
    want = _run(export, "-p", "hello world", "-n", "24", "-t", "0.8", "--seed", "7")
    r = client.completions.create(prompt="hello world", **kw)
    assert r.choices[0].text == want and want
    assert r.usage.prompt_tokens == len(server.gen.tokenizer.encode("hello world"))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 24 else "stop")
    chunks = list(client.completions.create(prompt="hello world", stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    # chat: through the model's chat template, as edgellm run --chat
    want = _run(export, "--chat", "-p", "hello there", "-n", "24", "-t", "0.8", "--seed", "7")
    msgs = [{"role": "user", "content": "hello there"}]
    r = client.chat.completions.create(messages=msgs, **kw)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens and r.usage.completion_tokens <= 24
    chunks = list(
        client.chat.completions.create(messages=msgs, stream=True, stream_options={"include_usage": True}, **kw)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == r.choices[0].finish_reason
    assert finals[0].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens  # include_usage chunk

    # stop strings end the text before them, with finish_reason "stop", as edgellm run --stop
    greedy = dict(model=export.name, max_tokens=40, temperature=0)
    full = client.completions.create(prompt="hello world", **greedy).choices[0].text
    stop = full[10:13]
    r = client.completions.create(prompt="hello world", stop=[stop], **greedy)
    assert (
        r.choices[0].text
        == full[: full.find(stop)]
        == _run(export, "-p", "hello world", "-n", "40", "-t", "0", "--stop", stop)
    )
    assert r.choices[0].finish_reason == "stop"
    r = client.completions.create(prompt="hello world", **{**greedy, "max_tokens": 5})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def test_prefix_reuse_continuing_chat(server, guarded, export):
    """Turn 2 extends turn 1: the reusing server prefills only the new tokens, with the same text."""
    texts = {}
    for s, key in ((server, "none"), (guarded, "sekrit")):
        client = s.client(key)
        msgs = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "hello"}]
        first = client.chat.completions.create(model=export.name, messages=msgs, max_tokens=16, temperature=0)
        msgs += [
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "and then?"},
        ]
        second = client.chat.completions.create(model=export.name, messages=msgs, max_tokens=16, temperature=0)
        texts[s is server] = (first.choices[0].message.content, second.choices[0].message.content)
        cached = second.usage.prompt_tokens_details.cached_tokens
        if s is server:
            assert cached >= first.usage.prompt_tokens - 1 and cached < second.usage.prompt_tokens
        else:
            assert cached == 0
    assert texts[True] == texts[False]


def test_logprobs_openai_shapes(server, export):
    """chat logprobs/top_logprobs and completions logprobs + echo (max_tokens 0 scores the prompt):
    OpenAI's shapes through the real client, the values the model's own log-softmax."""
    import numpy as np

    from edgellm.runtime import load
    from edgellm.runtime.logprobs import log_softmax

    client = server.client()
    ids = server.gen.tokenizer.encode("the cat sat on the mat")
    direct = log_softmax(load(export, threads=2, n_ctx=CTX, warmup=False).score(ids))  # (len(ids), V)
    want = [float(direct[i, t]) for i, t in enumerate(ids[1:])]

    r = client.completions.create(model=export.name, prompt=ids, max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.usage.completion_tokens == 0 and r.choices[0].text == server.gen.tokenizer.decode(ids)
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[1:], want, rtol=0, atol=1e-6)
    assert all(1 <= len(top) <= 2 and max(top.values()) >= v - 1e-9 for top, v in zip(lp.top_logprobs[1:], want))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]

    # lm-evaluation-harness's request: echo + one generated token, logprobs 1
    r = client.completions.create(model=export.name, prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1
    np.testing.assert_allclose(lp.token_logprobs[1:-1], want, rtol=0, atol=1e-6)
    assert lp.token_logprobs[-1] == pytest.approx(direct[-1].max(), abs=1e-4)  # greedy: the most likely token

    msgs = [{"role": "user", "content": "hello there"}]
    kw = dict(model=export.name, messages=msgs, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) >= r.usage.completion_tokens >= 1  # plus the end-of-sequence token when it ends there
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 3 and c.bytes == list(c.token.encode())
        tops = [t.logprob for t in c.top_logprobs]
        assert tops == sorted(tops, reverse=True) and c.logprob == pytest.approx(tops[0], abs=1e-9)  # greedy
    chunks = list(client.chat.completions.create(stream=True, **kw))
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
    plain = client.chat.completions.create(model=export.name, messages=msgs, max_tokens=4)
    assert plain.choices[0].logprobs is None

    # over the limits: OpenAI-style 400s naming the parameter
    for path, body, param in (
        ("/v1/chat/completions", {**kw, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {**kw, "logprobs": False}, "top_logprobs"),
        ("/v1/chat/completions", {**kw, "top_logprobs": -1}, "top_logprobs"),
        ("/v1/completions", {"model": export.name, "prompt": "hi", "logprobs": 6}, "logprobs"),
        ("/v1/completions", {"model": export.name, "prompt": "hi", "logprobs": True}, "logprobs"),
        ("/v1/completions", {"model": export.name, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ):
        status, _, err = server.call("POST", path, body)
        assert status == 400 and err["error"]["param"] == param, (body, err)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(**{**kw, "top_logprobs": 30})


# ----------------------------------------------------------------------------- errors
def test_errors_are_openai_shaped(server, export):
    ok = {"model": export.name, "prompt": "hi", "max_tokens": 2}
    status, _, body = server.call("POST", "/v1/completions", b"{not json")
    assert status == 400 and "JSON" in _error(status, body, "invalid_json")
    for field, value in (
        ("temperature", "hot"),
        ("max_tokens", 2.5),
        ("stop", 3),
        ("seed", "x"),
        ("stream", "yes"),
        ("top_p", 0),
    ):
        status, _, body = server.call("POST", "/v1/completions", {**ok, field: value})
        assert status == 400 and body["error"]["param"] == field, (field, body)
    status, _, body = server.call("POST", "/v1/chat/completions", {"model": export.name, "messages": "hi"})
    assert status == 400 and body["error"]["param"] == "messages"
    status, _, body = server.call(
        "POST", "/v1/chat/completions", {"model": export.name, "messages": [{"role": "user", "content": 5}]}
    )
    assert status == 400 and body["error"]["param"] == "messages[0].content"
    status, _, body = server.call("POST", "/v1/completions", {**ok, "n": 2})
    assert status == 400 and body["error"]["param"] == "n"
    status, _, body = server.call("POST", "/v1/completions", {**ok, "model": "gpt-4o"})
    assert status == 400 and "gpt-4o" in _error(status, body, "model_not_found")

    # prompt + max_tokens beyond the context: both numbers in the message
    prompt = "the cat sat on the mat " * 30
    n_prompt = len(server.gen.tokenizer.encode(prompt))
    status, _, body = server.call("POST", "/v1/completions", {**ok, "prompt": prompt, "max_tokens": CTX})
    msg = _error(status, body, "context_length_exceeded")
    assert status == 400 and str(n_prompt) in msg and str(CTX) in msg and str(n_prompt + CTX) in msg
    with pytest.raises(openai.BadRequestError, match="context"):
        server.client().chat.completions.create(
            model=export.name, messages=[{"role": "user", "content": prompt * 3}], max_tokens=8
        )

    status, _, body = server.call("GET", "/v1/nope")
    assert status == 404 and "/v1/nope" in _error(status, body, "not_found")
    status, headers, body = server.call("GET", "/v1/completions")
    assert status == 405 and _error(status, body)
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("other-model")
    status, _, body = server.call("GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["running"] == 0


def test_body_limit_and_api_key(guarded, export):
    key = {"Authorization": "Bearer sekrit"}
    status, _, body = guarded.call(
        "POST", "/v1/completions", json.dumps({"model": export.name, "prompt": "x" * 20000}).encode(), key
    )
    assert status == 413 and "8192" in _error(status, body, "request_too_large")

    assert guarded.call("GET", "/health")[0] == 200  # /health never needs the key
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
        status, _, body = guarded.call("GET", "/v1/models", headers=headers)
        assert status == 401, headers
        _error(status, body, "invalid_api_key")
    status, _, body = guarded.call("POST", "/v1/completions", {"model": export.name, "prompt": "hi", "max_tokens": 2})
    assert status == 401
    assert guarded.call("GET", "/v1/models", headers=key)[0] == 200
    with pytest.raises(openai.AuthenticationError):
        guarded.client("wrong").models.list()
    assert guarded.client("sekrit").models.list().data[0].id == export.name


# ----------------------------------------------------------------------------- queue and disconnects
def _open_stream(port, body, key="sekrit"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    conn.request(
        "POST",
        "/v1/completions",
        body=json.dumps({**body, "stream": True}),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    return conn, conn.getresponse()


def _events(resp):
    """The data payloads of a server-sent event stream, as they arrive."""
    for line in resp:
        line = line.decode().strip()
        if line.startswith("data: "):
            yield line[6:]


def test_queue_full_and_disconnect(guarded, export, caplog):
    caplog.set_level(logging.INFO, logger="edgellm.serve")
    long = {"model": export.name, "prompt": "hello world", "max_tokens": 450, "temperature": 0}
    conn_a, a = _open_stream(guarded.port, long)  # runs
    assert a.status == 200
    first = json.loads(next(_events(a)))
    assert first["object"] == "text_completion" and first["choices"][0]["finish_reason"] is None
    conn_b, b = _open_stream(guarded.port, {**long, "max_tokens": 3})  # waits (max_queue=1)
    assert b.status == 200
    status, headers, body = guarded.call(
        "POST", "/v1/completions", {**long, "max_tokens": 3}, {"Authorization": "Bearer sekrit"}
    )
    assert status == 429 and int(headers["Retry-After"]) >= 1
    _error(status, body, "queue_full")
    with pytest.raises(openai.RateLimitError):
        guarded.client("sekrit").completions.create(model=export.name, prompt="hi", max_tokens=2)

    a_id = first["id"]
    t0 = time.monotonic()
    conn_a.sock.shutdown(2)  # the first client goes away mid-stream
    conn_a.close()
    events = list(_events(b))  # the waiting one is served at once, to the end
    waited = time.monotonic() - t0
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    conn_b.close()
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith(a_id))
    done = int(re.search(r"completion=(\d+)", line).group(1))
    assert " cancelled " in line and done < 450, line
    assert waited < 10, waited
    deadline = time.monotonic() + 10
    while guarded.call("GET", "/health")[2]["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)


# ----------------------------------------------------------------------------- the command
def test_serve_command_sigterm_and_logs(export):
    """The CLI: binds 127.0.0.1 by default, logs one line per request without the prompt, and on
    SIGTERM finishes the in-flight stream with its final event and exits 0."""
    cmd = [
        sys.executable,
        "-c",
        "from edgellm.cli import main; main()",
        "serve",
        str(export),
        "--port",
        "0",
        "--threads",
        "1",
        "--ctx",
        "256",
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while True:
            line = proc.stderr.readline()
            assert line and time.monotonic() < deadline, "".join(lines)
            lines.append(line)
            m = re.search(r"on http://([\d.]+):(\d+)/v1", line)
            if m:
                break
        assert m.group(1) == "127.0.0.1"
        port = int(m.group(2))
        secret = "SECRET-PROMPT-TEXT"
        conn, resp = _open_stream(port, {"prompt": secret, "max_tokens": 200, "temperature": 0}, key="")
        events = _events(resp)
        got = [next(events)]
        proc.send_signal(signal.SIGTERM)
        got += list(events)
        conn.close()
        assert got[-1] == "[DONE]" and json.loads(got[-2])["choices"][0]["finish_reason"] in ("stop", "length")
        assert proc.wait(TIMEOUT) == 0
        err = "".join(lines) + proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rid = json.loads(got[0])["id"]
    log = [ln for ln in err.splitlines() if rid in ln]
    assert len(log) == 1 and re.search(r"prompt=\d+ .*completion=\d+ .*ttft=[\d.]+s [\d.]+ tokens/s", log[0]), err
    assert " cancelled " not in log[0] and " error" not in log[0], log[0]  # it ran to its end, not cut by the shutdown
    assert secret not in err


def test_sigterm_finishes_in_flight_and_queued(export):
    """SIGTERM while one stream runs and another waits: both end with their final event, exit 0."""
    code = textwrap.dedent(f"""
        import time
        from edgellm.runtime import load
        from edgellm.runtime.serve import bind, create_app, serve_on
        gen = load({str(export)!r}, threads=1, n_ctx=256)
        forward = gen.model.forward
        gen.model.forward = lambda *a, **k: (time.sleep(0.01), forward(*a, **k))[1]  # >= 10 ms a token, as slow_down
        sock = bind("127.0.0.1", 0)
        print(sock.getsockname()[1], flush=True)
        serve_on(create_app(gen, "m"), sock)
        print("returned", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        body = {"prompt": "hello world", "max_tokens": 100, "temperature": 0}
        conn_a, a = _open_stream(port, body, key="")
        events_a = _events(a)
        got_a = [next(events_a)]  # A runs (at least 1 s: 100 tokens at 10 ms)
        conn_b, b = _open_stream(port, {**body, "max_tokens": 5}, key="")  # B waits behind it
        assert b.status == 200
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        got_a += list(events_a)
        got_b = list(_events(b))
        conn_a.close(), conn_b.close()
        for got, n in ((got_a, 100), (got_b, 5)):
            final = json.loads(got[-2])
            assert got[-1] == "[DONE]" and final["choices"][0]["finish_reason"] in ("stop", "length"), got[-3:]
            assert final["choices"][0]["finish_reason"] == "stop" or final["usage"]["completion_tokens"] == n
        assert proc.wait(TIMEOUT) == 0
        assert proc.stdout.read().strip() == "returned"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_bad_input(export, tmp_path):
    for args, word in (
        (["--port", "70000"], "port"),
        (["--max-queue", "-1"], "max-queue"),
        (["--threads", "0"], "threads"),
        (["--api-key", " "], "api-key"),
    ):
        r = CliRunner().invoke(app, ["serve", str(export), *args])
        lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:") and word in lines[0], r.output
    r = CliRunner().invoke(app, ["serve", str(tmp_path / "missing"), "--port", "0"])
    assert r.exit_code == 2 and r.output.startswith("error:"), r.output


def test_server_never_imports_torch(export):
    code = BLOCK_TORCH + textwrap.dedent(f"""
        from edgellm.runtime import load
        from edgellm.runtime.serve import create_app
        import edgellm.commands.serve
        app = create_app(load({str(export)!r}, threads=1, n_ctx=64), 'm')
        assert not any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules), 'torch imported'
        print('OK')
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ})
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]
