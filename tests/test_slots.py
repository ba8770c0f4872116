"""`edgellm serve --parallel N`: requests decoded together in one batched step per token.

- (the batched attention kernel against its numpy reference: tests/test_kernels_rows.py)
- the batched step (runtime/batched.py) against the single-sequence forward, bit for bit, on
  prompts read in chunks beside decoding slots, on two kernel tiers;
- the real `openai` client: 4 concurrent greedy requests (streaming and not, own max_tokens and
  stop) each equal to the same request served alone by today's one-at-a-time server;
- a client that disconnects frees its slot at the next step; the queue limit per slot (429);
  shutdown (SIGTERM's path) drains every slot; bad --parallel on the command line.
"""

from __future__ import annotations

import http.client
import json
import threading
import time

import numpy as np
import pytest
from test_serve import TIMEOUT, _error, _events, _open_stream
from typer.testing import CliRunner

from edgellm.cli import app
from edgellm.runtime.kernels import tiers

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

CTX = 256


@pytest.fixture(scope="module")
def export(tmp_path_factory, tokenizer):
    import tiny

    root = tmp_path_factory.mktemp("slots")
    src = tiny.save(tiny.build("llama"), tokenizer, root / "llama")
    runner = CliRunner()
    q4 = root / "llama-q4"
    args = ["quantize", str(src), "--bits", "4", "--group-size", "32", "--sym", "--method", "rtn", "--no-eval"]
    r = runner.invoke(app, [*args, "-o", str(q4)])
    assert r.exit_code == 0, r.output
    dst = root / "tiny-q4"
    r = runner.invoke(app, ["export", str(q4), "-o", str(dst), "--no-check"])
    assert r.exit_code == 0, r.output
    return dst


# ----------------------------------------------------------------------------- the batched step
@pytest.mark.parametrize("kernels", sorted({tiers.best().name, "generic"}))
def test_batched_step_equals_single_forward(export, kernels):
    """Slots reading prompts of several lengths in chunks (longer than the 4x4 tile and the 16-query
    attention tile) beside slots decoding: each slot's logits equal model.forward's alone, bit for bit."""
    from edgellm.runtime.batched import SlotCaches
    from edgellm.runtime.model import NumbaModel

    m = NumbaModel(export, n_ctx=CTX, threads=2, kernels=kernels)
    rng = np.random.default_rng(1)
    V = m.config.vocab_size
    prompts = [rng.integers(0, V, n) for n in (3, 41, 2, 19)]
    decode = rng.integers(0, V, (4, 3))

    want = []  # per slot: logits after its prompt, then after each decode token
    for p, d in zip(prompts, decode):
        m.reset()
        want.append([m.forward(p)] + [m.forward(d[i : i + 1]) for i in range(3)])

    sc = SlotCaches(m, 4)
    got = [[] for _ in prompts]
    fed = [0] * 4
    step = 0
    while any(len(g) < 4 for g in got):  # slot s joins at step s; prompts in chunks of at most 16
        segs = []
        for s, p in enumerate(prompts):
            if s > step or len(got[s]) == 4:
                continue
            if fed[s] < len(p):
                n = min(16, len(p) - fed[s])
                segs.append((s, p[fed[s] : fed[s] + n], fed[s] + n == len(p), True))
                fed[s] += n
            else:
                segs.append((s, decode[s][len(got[s]) - 1 : len(got[s])], True, False))
        logits = sc.step(segs)
        k = 0
        for s, _, wants, _ in segs:
            if wants:
                got[s].append(logits[k].copy())
                k += 1
        step += 1
    for s in range(4):
        for i in range(4):
            np.testing.assert_array_equal(got[s][i], want[s][i], err_msg=f"slot {s} output {i} ({kernels})")
    m.close()


# ----------------------------------------------------------------------------- the server
class Server:
    """create_app(gen, ...) on uvicorn in a thread on 127.0.0.1 and a free port."""

    def __init__(self, gen, **kw):
        from edgellm.runtime.serve import bind, create_app

        self.gen = gen
        self.app = create_app(gen, "m", **kw)
        self.engine = self.app.state.engine
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

    def client(self):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="x", max_retries=0, timeout=TIMEOUT)

    def health(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        conn.request("GET", "/health")
        body = json.loads(conn.getresponse().read())
        conn.close()
        return body

    def close(self):
        self.server.should_exit = True  # what uvicorn's SIGTERM handler sets
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def gen(export):
    from edgellm.runtime import load

    return load(export, threads=2, n_ctx=CTX)


def slow_steps(engine, seconds: float):
    """At least `seconds` per batched step: the tiny model would finish before a test can act."""
    step = engine.slots.step

    def slowed(segments):
        time.sleep(seconds)
        return step(segments)

    engine.slots.step = slowed


REQUESTS = [  # (kind, prompt, extra): each its own length, max_tokens, stop, streaming or not
    ("chat", "hello there", dict(max_tokens=30)),
    ("completion", "the quick brown fox " * 12, dict(max_tokens=24, stream=True)),
    ("chat", "tell me about the sea and the moon", dict(max_tokens=40, stream=True)),
    ("completion", "once upon a time", dict(max_tokens=35)),
]


def _ask(client, kind, prompt, extra, stop=None):
    kw = dict(model="m", temperature=0, **extra)
    if stop:
        kw["stop"] = [stop]
    if kind == "chat":
        r = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kw)
        if kw.get("stream"):
            chunks = list(r)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return text, [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        return r.choices[0].message.content, [r.choices[0].finish_reason]
    r = client.completions.create(prompt=prompt, **kw)
    if kw.get("stream"):
        chunks = list(r)
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        return text, [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return r.choices[0].text, [r.choices[0].finish_reason]


def test_parallel_requests_equal_alone(gen):
    """4 concurrent greedy requests on --parallel 4 (threads of the real openai client) each give
    the text the one-at-a-time server gives for it alone; so do the same requests with a stop
    string each (cut where that server cuts), and one at a time on the parallel server."""
    one = Server(gen)  # today's server: one request at a time
    alone = [_ask(one.client(), *r) for r in REQUESTS]
    stops = [text[len(text) // 2 : len(text) // 2 + 3] for text, _ in alone]
    alone_stop = [_ask(one.client(), *r, stop=s) for r, s in zip(REQUESTS, stops)]
    one.close()
    assert all(t for t, _ in alone)

    par = Server(gen, parallel=4)
    try:
        results = {}

        def client(i, stop):
            results[i, stop] = _ask(par.client(), *REQUESTS[i], stop=stop)

        threads = [threading.Thread(target=client, args=(i, None)) for i in range(4)]
        threads += [threading.Thread(target=client, args=(i, stops[i])) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert par.engine.steps < sum(len(gen.tokenizer.encode(t)) for t, _ in alone)  # steps were shared
        for i in range(4):
            assert results[i, None] == alone[i], (i, results[i, None], alone[i])
            assert results[i, stops[i]] == alone_stop[i], (i, stops[i])
            assert alone_stop[i][1] == ["stop"] and stops[i] not in alone_stop[i][0]
        assert _ask(par.client(), *REQUESTS[2]) == alone[2]  # alone on the parallel server
        assert par.health()["slots"] == 4
    finally:
        par.close()


def test_disconnect_frees_slot_and_queue_limit(gen, caplog):
    """--parallel 2, --max-queue 1: two streams run, one waits, a fourth gets 429; a client that
    goes away mid-stream frees its slot at the next step (the waiting one starts, its log line says
    cancelled); closing the server (SIGTERM's path) lets every running request finish."""
    par = Server(gen, parallel=2, max_queue=1)
    slow_steps(par.engine, 0.02)
    body = {"prompt": "hello world", "max_tokens": 150, "temperature": 0}
    try:
        conn_a, a = _open_stream(par.port, body, key="")
        ev_a = _events(a)
        next(ev_a)
        conn_b, b = _open_stream(par.port, {**body, "max_tokens": 30}, key="")
        ev_b = _events(b)
        next(ev_b)
        conn_c, c = _open_stream(par.port, {**body, "max_tokens": 20}, key="")  # waits for a slot
        assert c.status == 200
        deadline = time.monotonic() + TIMEOUT
        while par.health()["waiting"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        h = par.health()
        assert h["running"] == 2 and h["slots"] == 2
        status, _, err = _post(par.port, body)
        assert status == 429 and "busy" in _error(status, err, "queue_full")

        with caplog.at_level("INFO", logger="edgellm.serve"):
            conn_a.close()  # A goes away: its slot goes to C at the next step
            got_c = list(_events(c))
            conn_c.close()
            assert json.loads(got_c[-2])["usage"]["completion_tokens"] == 20
            deadline = time.monotonic() + TIMEOUT
            while not any(" cancelled " in r.message for r in caplog.records):
                assert time.monotonic() < deadline
                time.sleep(0.01)
        line = next(r.message for r in caplog.records if " cancelled " in r.message)
        assert 0 < int(line.split("completion=")[1].split()[0]) < 150
        # B still streams, and finishes although the server is told to stop meanwhile
        closer = threading.Thread(target=par.close)
        closer.start()
        got_b = list(ev_b)
        conn_b.close()
        closer.join(TIMEOUT)
        final = json.loads(got_b[-2])
        assert got_b[-1] == "[DONE]" and final["choices"][0]["finish_reason"] == "length"
        assert final["usage"]["completion_tokens"] == 30
    finally:
        if par.thread.is_alive():
            par.close()


def _post(port, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    return r.status, r.headers, json.loads(raw)


def test_parallel_bad_input(export):
    for args, words in (
        (["--parallel", "0"], ("--parallel 0", "1 or more")),
        (["--parallel", "-3"], ("--parallel -3",)),
        (["--parallel", "2", "--backend", "onnxruntime"], ("numba",)),
        (["--parallel", "100000000"], ("MiB", "--parallel 100000000", "available")),  # caches beyond memory
    ):
        r = CliRunner().invoke(app, ["serve", str(export), "--port", "0", *args])
        lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.output
        assert all(w in lines[0] for w in words), lines[0]


def test_prefix_copied_from_a_busy_slot(gen):
    """A request whose prompt a running request's slot already holds starts from a copy of those
    keys and values (cached_tokens: all but the last prompt token) and gives the same text."""
    par = Server(gen, parallel=2)
    slow_steps(par.engine, 0.01)
    body = {"prompt": "the quick brown fox jumps over the lazy dog " * 6, "max_tokens": 40, "temperature": 0}
    try:
        conn_a, a = _open_stream(par.port, body, key="")
        ev_a = _events(a)
        got_a = [next(ev_a)]  # A runs: its slot holds the prompt
        status, _, r = _post(par.port, body)
        got_a += list(ev_a)
        conn_a.close()
        assert status == 200
        n = r["usage"]["prompt_tokens"]
        assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == n - 1
        chunks = [json.loads(e) for e in got_a[:-1]]
        text_a = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        assert r["choices"][0]["text"] == text_a and text_a
    finally:
        par.close()
