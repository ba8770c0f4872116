"""A bounded soak of `edgellm serve --parallel N` on loopback: many requests, good and bad, mixed at random.

    python -m edgellm.benchmarks.scripts.serve_soak EXPORT_DIR --parallel 8 --requests 2000 --workers 12 \
        --threads 2 --json serve_soak.json

Run it alone (nothing else busy on the machine); it takes minutes (max_tokens stays small).

One server child process on 127.0.0.1 (a free port). --workers client threads send --requests requests
in all, each drawn (seeded, so a run can be repeated) from these kinds:
- good: chat and completions, streamed or not; chat under a JSON schema (nested objects, enums,
  arrays, bounded numbers) or json_object; chat with tools (tool_choice auto, required, a named
  function). Each must answer 200 with a well-formed body (streamed: every event JSON, a
  finish_reason, `[DONE]` last, no error event); a schema answer that finished must parse and
  validate, a forced tool call that finished must be a call of a function it was given.
- gone: clients that disconnect: mid-stream after a few events, while a non-streamed answer is being
  generated, or right after sending the request. Nothing to check but that the server goes on.
- bad: schemas the grammar library cannot compile, malformed tools and tool_choice, bodies over the
  1 MiB limit, bodies that are not JSON or have wrong types, prompts longer than the context, unknown
  routes. Each must get a 4xx whose body is OpenAI's error object
  ({"error": {"message", "type", "param", "code"}}).
Any 5xx, any answer that is not JSON where JSON is due, or a dead server counts as a failure.

The server's RSS is sampled every 0.5 s over the run: reported at start (ready, before any request),
once warm (after the first --warm share of the requests: the slots' KV pages written), at the end
and its maximum; "flat" means end - warm <= --rss-slack MiB. After the load, /health must show every
slot free and nothing waiting within 10 s, and a burst of --parallel good requests must all succeed.
Then SIGTERM: the server must exit 0, and its log must hold no traceback.

SmolLM2's chat template does not read `tools` (the server answers 400 for tools on it, which the soak
checks too); to soak the tool path on the same model, the server runs on a view of the export (the
same files, linked) whose template adds a Hermes tool section (SmolLM3's and Qwen2.5's format):
--no-tools-template serves the export as it is.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

from edgellm.benchmarks.scripts._common import TOOLS, edgellm_server, run_header, tools_view

TOPICS = ["the sea", "bread", "the moon", "rain", "a bicycle", "coffee", "winter", "music", "a train", "snow"]

SCHEMAS = [
    {  # nested objects, an enum, an array, bounded numbers
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "kind": {"enum": ["cat", "dog", "fish"]},
            "age": {"type": "integer", "minimum": 0, "maximum": 30},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
            "home": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 10}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "kind", "age"],
        "additionalProperties": False,
    },
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {
        "type": "object",
        "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}, "label": {"enum": ["yes", "no"]}},
        "required": ["label", "score"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 1, "maxItems": 3},
]

# schemas the grammar library cannot compile, or response_format / guided_* fields of the wrong shape
BAD_STRUCTURED = [
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/defs/none"}}}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "not a schema"}}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"minimum": "zero"}}}},
    {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}},
        }
    },
    {"response_format": {"type": "json_schema"}},
    {"response_format": {"type": "yaml"}},
    {"response_format": "json"},
    {"guided_json": "{not json"},
    {"guided_json": 5},
    {"guided_regex": "(unclosed"},
    {"guided_regex": ""},
    {"grammar": "root ::= undefined"},
    {"guided_grammar": "start: undefined_rule"},
    {"guided_regex": "[a-z]+", "guided_json": {"type": "object"}},
    {"response_format": {"type": "json_object"}, "tools": TOOLS},
]

# malformed tools / tool_choice / parallel_tool_calls
BAD_TOOLS = [
    {"tools": "get_weather"},
    {"tools": []},
    {"tools": [{"type": "function"}]},
    {"tools": [{"type": "retrieval", "function": {"name": "x"}}]},
    {"tools": [{"type": "function", "function": {"name": "has space"}}]},
    {"tools": [{"type": "function", "function": {"name": "x" * 65}}]},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": "object"}}]},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
    {"tools": [TOOLS[0], TOOLS[0]]},
    {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_stock"}}},
    {"tools": TOOLS, "tool_choice": "sometimes"},
    {"tools": TOOLS, "tool_choice": {"type": "function"}},
    {"tools": TOOLS, "tool_choice": 3},
    {"tool_choice": "required"},
    {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    {"tools": TOOLS, "parallel_tool_calls": "yes"},
]

# other bad bodies: (body or raw bytes, path)
BAD_OTHER = [
    (b"{not json", "/v1/chat/completions"),
    (b"\xff\xfe\x00garbage", "/v1/chat/completions"),
    (b"[1, 2, 3]", "/v1/chat/completions"),
    ({"messages": []}, "/v1/chat/completions"),
    ({"messages": [{"role": "user"}]}, "/v1/chat/completions"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "/v1/chat/completions"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}, "/v1/chat/completions"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, "/v1/chat/completions"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "/v1/chat/completions"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 7}, "/v1/chat/completions"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": 5}, "/v1/chat/completions"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, "/v1/chat/completions"),
    ({"prompt": "hi", "max_tokens": 100000}, "/v1/completions"),
    ({"prompt": [1, 2, -5]}, "/v1/completions"),
    ({"prompt": "hi", "tools": TOOLS}, "/v1/completions"),
    ({}, "/v1/completions"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "/v1/nowhere"),
]


def _msg(rng: random.Random) -> list[dict]:
    return [{"role": "user", "content": f"({rng.randrange(10**6)}) Write one sentence about {rng.choice(TOPICS)}."}]


def draw(i: int, seed: int, n_ctx: int, tools_ok: bool) -> dict:
    """Request i of the soak: {"kind", "expect": ok|gone|bad, "path", "body" (dict or bytes), ...}."""
    rng = random.Random(seed * 1_000_003 + i)
    kinds = [
        ("chat", 16),
        ("completion", 5),
        ("schema", 10),
        ("json_object", 3),
        ("tools_required", 5 if tools_ok else 0),
        ("tools_named", 3 if tools_ok else 0),
        ("tools_auto", 3 if tools_ok else 0),
        ("tools_unsupported", 0 if tools_ok else 3),
        ("gone_stream", 10),
        ("gone_wait", 4),
        ("gone_early", 2),
        ("bad_schema", 10),
        ("bad_tools", 8),
        ("oversized", 4),
        ("too_long", 2),
        ("bad_other", 6),
    ]
    kind = rng.choices([k for k, _ in kinds], [w for _, w in kinds])[0]
    chat = "/v1/chat/completions"
    base = {"messages": _msg(rng), "max_tokens": rng.randint(1, 12), "temperature": rng.choice([0, 0.8])}
    base["stream"] = rng.random() < 0.5
    r = {"kind": kind, "expect": "ok", "path": chat, "body": base}
    if kind == "completion":
        base.pop("messages")
        base["prompt"] = f"({i}) The {rng.choice(TOPICS)} is"
        r["path"] = "/v1/completions"
    elif kind == "schema":
        base["response_format"] = {"type": "json_schema", "json_schema": {"name": "s", "schema": rng.choice(SCHEMAS)}}
        base["max_tokens"] = rng.randint(8, 48)
        r["schema"] = base["response_format"]["json_schema"]["schema"]
    elif kind == "json_object":
        base["response_format"] = {"type": "json_object"}
        base["max_tokens"] = rng.randint(4, 24)
    elif kind.startswith("tools_"):
        base["tools"] = TOOLS
        base["max_tokens"] = 48
        if kind == "tools_required":
            base["tool_choice"] = "required"
            base["parallel_tool_calls"] = False
        elif kind == "tools_named":
            base["tool_choice"] = {"type": "function", "function": {"name": rng.choice(TOOLS)["function"]["name"]}}
        else:
            base["max_tokens"] = rng.randint(2, 12)
        if kind == "tools_unsupported":
            r["expect"] = "bad"
    elif kind == "gone_stream":
        base.update(stream=True, max_tokens=rng.randint(8, 40))
        r["expect"], r["read_events"] = "gone", rng.randint(0, 3)
    elif kind == "gone_wait":
        base.update(stream=False, max_tokens=rng.randint(16, 40))
        r["expect"], r["wait_s"] = "gone", rng.uniform(0.02, 0.4)
    elif kind == "gone_early":
        r["expect"] = "gone"
    elif kind == "bad_schema":
        base.update(rng.choice(BAD_STRUCTURED))
        r["expect"] = "bad"
    elif kind == "bad_tools":
        base.update(rng.choice(BAD_TOOLS))
        r["expect"] = "bad"
    elif kind == "oversized":  # 1 to 3 MiB of message: over the 1 MiB body limit (413)
        base["messages"] = [{"role": "user", "content": "x" * rng.randint(1 << 20, 3 << 20)}]
        r["expect"] = "bad"
    elif kind == "too_long":  # fits the body limit but not the context (400 context_length_exceeded)
        base["messages"] = [{"role": "user", "content": "word " * (n_ctx + rng.randint(0, 2000))}]
        r["expect"] = "bad"
    elif kind == "bad_other":
        body, path = rng.choice(BAD_OTHER)
        r.update(expect="bad", body=body, path=path)
    return r


# ---------------------------------------------------------------- one request and its checks
def _problem_error(status: int, data: bytes) -> str | None:
    """None when `data` is OpenAI's error object for a 4xx, else what is wrong."""
    if not 400 <= status < 500:
        return f"status {status}, expected a 4xx"
    try:
        err = json.loads(data)["error"]
    except (ValueError, KeyError, TypeError):
        return f"{status} with a body that is not an error object: {data[:200]!r}"
    if not isinstance(err.get("message"), str) or not err["message"] or not isinstance(err.get("type"), str):
        return f"{status} error object without message/type: {err}"
    if "param" not in err or "code" not in err:
        return f"{status} error object without param/code: {err}"
    return None


def _check_answer(req: dict, body: dict) -> str | None:
    """None when a finished answer meets its request (schema, forced tool call), else what is wrong."""
    choice = body["choices"][0]
    finish = choice.get("finish_reason")
    if finish not in ("stop", "length", "tool_calls"):
        return f"finish_reason {finish!r}"
    kind = req["kind"]
    if kind in ("schema", "json_object") and finish == "stop":
        import jsonschema

        text = choice["message"]["content"]
        try:
            doc = json.loads(text)
        except ValueError:
            return f"{kind} answer is not JSON: {text[:200]!r}"
        if kind == "schema":
            try:
                jsonschema.validate(doc, req["schema"])
            except jsonschema.ValidationError as exc:
                return f"answer fails its schema: {exc.message}: {text[:200]!r}"
        elif not isinstance(doc, dict):
            return f"json_object answer is not an object: {text[:200]!r}"
    if kind in ("tools_required", "tools_named") and finish != "length":
        calls = choice["message"].get("tool_calls") or []
        if finish != "tool_calls" or not calls:
            return f"{kind}: finish {finish!r} without a tool call"
        names = {t["function"]["name"] for t in TOOLS}
        want = req["body"]["tool_choice"]
        for c in calls:
            if c["function"]["name"] not in names:
                return f"call of an unknown function {c['function']['name']!r}"
            if isinstance(want, dict) and c["function"]["name"] != want["function"]["name"]:
                return f"named tool_choice {want['function']['name']} got {c['function']['name']}"
            json.loads(c["function"]["arguments"])
    return None


def _sse(data: bytes) -> tuple[list[dict], str | None]:
    """The events of a finished stream, or what is wrong with it."""
    events, done = [], False
    for block in data.decode().split("\n\n"):
        if not block.strip():
            continue
        if not block.startswith("data: "):
            return events, f"not an SSE data event: {block[:120]!r}"
        payload = block[6:]
        if payload == "[DONE]":
            done = True
            continue
        if done:
            return events, "events after [DONE]"
        try:
            events.append(json.loads(payload))
        except ValueError:
            return events, f"an event that is not JSON: {payload[:120]!r}"
    if not done:
        return events, "the stream did not end with [DONE]"
    if any("error" in e for e in events):
        return events, f"error event: {next(e for e in events if 'error' in e)}"
    return events, None


def _as_whole(events: list[dict]) -> dict:
    """A streamed chat/completion folded into the shape of the non-streamed answer."""
    text, finish, calls = [], None, {}
    for e in events:
        for c in e.get("choices") or []:
            d = c.get("delta") or {}
            text.append(d.get("content") or c.get("text") or "")
            for tc in d.get("tool_calls") or []:
                slot = calls.setdefault(tc["index"], {"function": {"name": "", "arguments": ""}})
                f = tc.get("function") or {}
                slot["function"]["name"] += f.get("name") or ""
                slot["function"]["arguments"] += f.get("arguments") or ""
            finish = c.get("finish_reason") or finish
    msg = {"content": "".join(text), "tool_calls": [calls[k] for k in sorted(calls)] or None}
    return {"choices": [{"finish_reason": finish, "message": msg}]}


def send(port: int, req: dict, timeout: float) -> tuple[str, str | None, int | None]:
    """Run one request: (outcome, problem or None, HTTP status or None). outcome: ok / bad / gone / failed."""
    body = req["body"]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=req.get("wait_s", timeout))
    try:
        if req["kind"] == "gone_early":  # the whole request, then hang up before any answer
            conn.request("POST", req["path"], data, {"Content-Type": "application/json"})
            return "gone", None, None
        try:
            conn.request("POST", req["path"], data, {"Content-Type": "application/json"})
            resp = conn.getresponse()
        except TimeoutError:
            if req["expect"] == "gone":  # gone_wait: gave up waiting for the answer
                return "gone", None, None
            return "failed", f"no answer within {timeout} s", None
        except (ConnectionError, http.client.HTTPException) as exc:
            return "failed", f"{type(exc).__name__}: {exc}", None
        status = resp.status
        if req["expect"] == "gone" and req["kind"] == "gone_stream" and status == 200:
            for _ in range(req["read_events"] * 2):  # an event is a line and a blank line
                resp.readline()
            return "gone", None, status
        try:
            raw = resp.read()
        except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            return "failed", f"reading the answer: {type(exc).__name__}: {exc}", status
        if status >= 500:
            return "failed", f"{status}: {raw[:300]!r}", status
        if req["expect"] == "bad":
            problem = _problem_error(status, raw)
            return ("failed", problem, status) if problem else ("bad", None, status)
        if status != 200:
            problem = _problem_error(status, raw)
            return "failed", f"{req['kind']} answered {status}: {problem or raw[:300]!r}", status
        if resp.getheader("content-type", "").startswith("text/event-stream"):
            events, problem = _sse(raw)
            if problem:
                return "failed", problem, status
            answer = _as_whole(events)
        else:
            try:
                answer = json.loads(raw)
            except ValueError:
                return "failed", f"200 with a body that is not JSON: {raw[:200]!r}", status
            if "message" in answer["choices"][0]:
                pass
            else:  # completions: the text where a chat answer has its message
                answer["choices"][0]["message"] = {"content": answer["choices"][0].get("text")}
        problem = _check_answer(req, answer)
        return ("failed", problem, status) if problem else ("ok", None, status)
    finally:
        conn.close()


# ---------------------------------------------------------------- the run
class RSS:
    """The server's RSS (MiB) every `every` seconds in a thread, with how many requests were done."""

    def __init__(self, pid: int, done, every: float = 0.5):
        import psutil

        self.proc, self.done, self.every = psutil.Process(pid), done, every
        self.samples: list[tuple[float, int, float]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def now(self) -> float:
        return self.proc.memory_info().rss / 2**20

    def _run(self):
        t0 = time.monotonic()
        while not self._stop.wait(self.every):
            try:
                self.samples.append((time.monotonic() - t0, self.done(), self.now()))
            except Exception:  # noqa: BLE001 - the server is gone; the run reports that
                return

    def stop(self):
        self._stop.set()
        self._t.join()


def health(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", help="edgellm export directory (e.g. SmolLM2-135M 4-bit)")
    ap.add_argument("--parallel", type=int, default=8, help="the server's slots")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=12, help="client threads sending at once")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--timeout", type=float, default=120, help="seconds, any one request")
    ap.add_argument("--warm", type=float, default=0.1, help="share of the requests before RSS counts as warm")
    ap.add_argument("--rss-slack", type=float, default=16.0, help="MiB the RSS may grow after warm-up")
    ap.add_argument("--no-tools-template", action="store_true", help="serve the export's own chat template")
    ap.add_argument("--logs", default=tempfile.gettempdir(), help="folder for the server's log (default: temp dir)")
    ap.add_argument("--json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgellm-soak-"))
    export = Path(args.export) if args.no_tools_template else tools_view(Path(args.export), work)
    log = Path(args.logs) / "serve_soak.log"
    t_start = time.perf_counter()
    srv = edgellm_server(str(export), args.threads, args.ctx, log, ("--parallel", str(args.parallel)))
    print(f"server up in {time.perf_counter() - t_start:.1f} s (pid {srv.proc.pid}, port {srv.port})", flush=True)
    reqs = [draw(i, args.seed, args.ctx, not args.no_tools_template) for i in range(args.requests)]
    lock = threading.Lock()
    state = {"next": 0, "done": 0}
    outcomes: list = [None] * len(reqs)
    rss = RSS(srv.proc.pid, lambda: state["done"])
    rss_start = rss.now()

    def worker():
        while True:
            with lock:
                i = state["next"]
                state["next"] += 1
            if i >= len(reqs):
                return
            t0 = time.perf_counter()
            try:
                outcome = send(srv.port, reqs[i], args.timeout)
            except Exception as exc:  # noqa: BLE001 - a client-side surprise is a failure too
                outcome = ("failed", f"client: {type(exc).__name__}: {exc}", None)
            outcomes[i] = (*outcome, time.perf_counter() - t0)
            with lock:
                state["done"] += 1
                d = state["done"]
            if d % 200 == 0:
                fails = sum(1 for o in outcomes if o and o[0] == "failed")
                print(f"  {d}/{len(reqs)} done, {fails} failed, RSS {rss.now():.0f} MiB", flush=True)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0

    # every slot free, nothing waiting (disconnected clients released theirs)
    idle, deadline, h = False, time.monotonic() + 10, {}
    while time.monotonic() < deadline:
        try:
            h = health(srv.port)
        except OSError as exc:
            h = {"error": str(exc)}
            break
        if h.get("running") == 0 and h.get("waiting") == 0:
            idle = True
            break
        time.sleep(0.2)
    # then a burst of `parallel` good requests at once: each slot serves again
    burst = [
        {
            "kind": "chat",
            "expect": "ok",
            "path": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": f"({k}) Say hi."}], "max_tokens": 4, "temperature": 0},
        }
        for k in range(args.parallel)
    ]
    burst_out: list = [None] * len(burst)

    def one(k):
        burst_out[k] = send(srv.port, burst[k], args.timeout)

    bt = [threading.Thread(target=one, args=(k,)) for k in range(len(burst))]
    for t in bt:
        t.start()
    for t in bt:
        t.join()
    time.sleep(1.0)
    rss.stop()
    rss_end = rss.now()
    exit_code = srv.close()
    log_text = log.read_text()

    by_kind: dict = {}
    failures = []
    for req, (outcome, problem, status, secs) in zip(reqs, outcomes):
        k = by_kind.setdefault(req["kind"], {"n": 0, "ok": 0, "bad": 0, "gone": 0, "failed": 0, "status": {}})
        k["n"] += 1
        k[outcome] += 1
        if status is not None:
            k["status"][str(status)] = k["status"].get(str(status), 0) + 1
        if outcome == "failed":
            failures.append({"kind": req["kind"], "problem": problem, "status": status})
    warm_n = int(args.warm * len(reqs))
    warm = [s[2] for s in rss.samples if s[1] >= warm_n]
    rss_warm = warm[0] if warm else rss_start
    rss_max = max([s[2] for s in rss.samples] + [rss_start, rss_end])
    five_xx = sum(1 for f in failures if f["status"] and f["status"] >= 500)
    tracebacks = log_text.count("Traceback")
    burst_ok = all(b and b[0] == "ok" for b in burst_out)
    out = {
        **run_header(args.threads),
        "export": str(args.export),
        "tools_template": not args.no_tools_template,
        "parallel": args.parallel,
        "requests": len(reqs),
        "workers": args.workers,
        "seed": args.seed,
        "wall_s": wall,
        "by_kind": by_kind,
        "failed": len(failures),
        "five_xx": five_xx,
        "failures": failures[:20],
        "health_after": h,
        "slots_free_after": idle,
        "burst_after_ok": burst_ok,
        "burst_after": [b[:2] for b in burst_out],
        "server_exit_code": exit_code,
        "log_tracebacks": tracebacks,
        "log_500s": log_text.count(" 500 "),
        "log_cancelled": log_text.count("cancelled"),
        "rss_mb": {"start": rss_start, "warm": rss_warm, "end": rss_end, "max": rss_max},
        "rss_samples": [(round(t, 1), n, round(m, 1)) for t, n, m in rss.samples[:: max(1, len(rss.samples) // 200)]],
        "log": str(log),
    }
    flat = rss_end - rss_warm <= args.rss_slack
    passed = not failures and idle and burst_ok and exit_code == 0 and tracebacks == 0 and flat
    out["rss_flat"], out["passed"] = flat, passed
    print(f"{len(reqs)} requests in {wall:.0f} s with {args.workers} workers on --parallel {args.parallel}:")
    print("| kind | n | ok | 4xx as due | gone | failed | statuses |")
    print("|---|---|---|---|---|---|---|")
    for kind, k in sorted(by_kind.items()):
        st = ", ".join(f"{s}: {c}" for s, c in sorted(k["status"].items()))
        print(f"| {kind} | {k['n']} | {k['ok']} | {k['bad']} | {k['gone']} | {k['failed']} | {st} |")
    print(f"failed: {len(failures)} ({five_xx} of them 5xx)")
    for f in failures[:10]:
        print(f"  {f['kind']}: {f['problem']}", file=sys.stderr)
    print(f"after the load: /health {h} -> slots free: {idle}; burst of {args.parallel} ok: {burst_ok}")
    print(
        f"RSS: start {rss_start:.0f} MiB, warm {rss_warm:.0f}, end {rss_end:.0f}, max {rss_max:.0f} "
        f"(flat: end - warm <= {args.rss_slack:.0f} MiB: {flat})"
    )
    print(f"server exit code {exit_code}, tracebacks in its log: {tracebacks}; {'PASSED' if passed else 'FAILED'}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
