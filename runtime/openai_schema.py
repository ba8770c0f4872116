"""OpenAI's wire format for `edgellm serve`: request validation, responses, stream chunks, errors.

Pure data in, plain dicts out (no HTTP here), so every rule is testable on its own. Field rules
follow the OpenAI API reference; `top_k` and `repetition_penalty` are accepted as extensions (as
llama.cpp's and vLLM's servers do, sent by the `openai` client through `extra_body`). Fields this
runtime cannot honour (n > 1, tools, penalties other than 0) are refused with a 400 rather than
silently ignored; fields that change nothing here (`user`, `metadata`) are ignored. Structured
output: `response_format` json_schema / json_object, and as extensions (vLLM's names)
`guided_json`, `guided_regex`, `guided_grammar` (Lark or GBNF; llama.cpp's `grammar` is the same
field); tools: `tools`, `tool_choice`, `parallel_tool_calls` (runtime/tools.py). `logprobs`
(chat: `logprobs` + `top_logprobs`; completions: `logprobs` + `echo`, `max_tokens: 0` to score the
prompt only) are answered in OpenAI's shapes (`chat_logprobs`, `completion_logprobs`).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from .generate import Sampling
from .tools import ToolsError, check_choice, check_tools

# When a request omits a sampling field, it gets `edgellm run`'s default, so the same request
# gives the same text through the server and the command line.
DEFAULTS = Sampling()
MAX_STOP = 4  # OpenAI's limit on `stop` strings
MAX_TOP_LOGPROBS = 20  # chat `top_logprobs`, OpenAI's limit
MAX_COMPLETION_LOGPROBS = 5  # completions `logprobs`, OpenAI's limit


class APIError(Exception):
    """An error answered as OpenAI's JSON error object with an HTTP status."""

    TYPES = {
        400: "invalid_request_error",
        401: "invalid_request_error",
        404: "invalid_request_error",
        405: "invalid_request_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        500: "server_error",
        503: "server_error",
    }

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


@dataclass
class Request:
    """A validated completion request: what to feed the model and how to sample it."""

    kind: str  # "chat" | "completion"
    model: str
    messages: list | None  # chat: [{"role", "content"}] with text content
    prompt: str | list | None  # completion: text or token ids
    max_tokens: int | None  # None: the rest of the context
    sampling: Sampling  # max_new_tokens is set once the prompt length is known
    stream: bool
    include_usage: bool  # stream_options.include_usage: also send a usage-only chunk at the end
    logprobs: int | None = None  # alternatives per token to report (0: the chosen token's only); None: off
    echo: bool = False  # completions: the answer starts with the prompt (and its logprobs)
    structured: tuple | None = None  # (kind, spec, field): runtime/constrain.py grammar kind, its source, the field
    tools: list | None = None  # chat: OpenAI tool definitions (checked)
    tool_choice: str = "none"  # auto | none | required | a function name
    parallel_tool_calls: bool = True
    template_options: dict | None = None  # chat: chat_template_kwargs (vLLM's), e.g. {"enable_thinking": false}


# ----------------------------------------------------------------------------- field checks
def _number(body: dict, name: str, lo: float, hi: float, default, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(f"'{name}' must be a number, got {type(v).__name__}", name, "invalid_type")
    if v < lo or v > hi or (lo_open and v == lo):
        raise bad(f"'{name}' is {v}; it must be in {'(' if lo_open else '['}{lo}, {hi}]", name)
    return float(v)


def _integer(body: dict, name: str, lo: int, default):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"'{name}' must be an integer, got {type(v).__name__}", name, "invalid_type")
    if v < lo:
        raise bad(f"'{name}' is {v}; it must be at least {lo}", name)
    return v


def _flag(body: dict, name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be a boolean, got {type(v).__name__}", name, "invalid_type")
    return v


def _stop(body: dict) -> tuple:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(items) > MAX_STOP:
        raise bad(f"'stop' has {len(items)} strings; at most {MAX_STOP} are allowed", "stop")
    return tuple(s for s in items if s)


def _unsupported(body: dict):
    """Refuse what batch-1 text generation cannot do, instead of answering something else."""
    if body.get("n") not in (None, 1):
        _integer(body, "n", 1, 1)
        raise bad(f"'n' is {body['n']}; this server generates one choice per request (n=1)", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, -2.0, 2.0, 0.0) != 0.0:
            raise bad(
                f"'{name}' is not supported (only 0); use 'repetition_penalty' instead", name, "unsupported_parameter"
            )
    for name in ("functions", "logit_bias"):
        if body.get(name):
            raise bad(f"'{name}' is not supported by this server", name, "unsupported_parameter")
    if body.get("best_of") not in (None, 1):
        raise bad("'best_of' is not supported (only 1)", "best_of", "unsupported_parameter")


GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_grammar": "grammar", "grammar": "grammar"}


def _structured(body: dict) -> tuple | None:
    """(grammar kind, spec, field) from response_format or one guided_* extension; None: free text."""
    found = []
    fmt = body.get("response_format")
    if fmt is not None and not isinstance(fmt, dict):
        raise bad(
            "'response_format' must be an object: {'type': 'text' | 'json_object' | 'json_schema', ...}",
            "response_format",
            "invalid_type",
        )
    if fmt is not None:
        kind = fmt.get("type")
        if kind == "json_schema":
            js = fmt.get("json_schema")
            schema = js.get("schema") if isinstance(js, dict) else None
            if not isinstance(schema, (dict, bool)):
                raise bad(
                    "'response_format.json_schema.schema' must be a JSON Schema object",
                    "response_format.json_schema.schema",
                    "invalid_type",
                )
            found.append(("json_schema", schema, "response_format.json_schema.schema"))
        elif kind == "json_object":
            found.append(("json_object", None, "response_format"))
        elif kind not in (None, "text"):
            raise bad(
                f"'response_format.type' is {kind!r}; give text, json_object or json_schema", "response_format.type"
            )
    for name, kind in GUIDED.items():
        v = body.get(name)
        if v is None:
            continue
        ok = isinstance(v, (dict, str)) if kind == "json_schema" else isinstance(v, str) and v.strip()
        if not ok:
            want = "a JSON Schema (object or string)" if kind == "json_schema" else "a non-empty string"
            raise bad(f"'{name}' must be {want}", name, "invalid_type")
        found.append((kind, v, name))
    if len(found) > 1:
        raise bad(
            f"give one of response_format / guided_json / guided_regex / guided_grammar, not {len(found)}",
            found[1][2],
        )
    return found[0] if found else None


def _tools(body: dict, kind: str) -> tuple:
    """(tools or None, tool_choice, parallel_tool_calls), checked."""
    tools = body.get("tools")
    try:
        if tools is not None:
            if kind != "chat":
                raise ToolsError("'tools' is a chat completions parameter", "tools")
            tools = check_tools(tools)
        choice = check_choice(body.get("tool_choice"), tools)
    except ToolsError as exc:
        raise bad(str(exc), exc.param) from None
    return tools, choice, _flag(body, "parallel_tool_calls") if "parallel_tool_calls" in body else True


def _message(i: int, m) -> dict:
    param = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad(f"'{param}' must be an object with 'role' and 'content'", param, "invalid_type")
    role, content = m.get("role"), m.get("content")
    if not isinstance(role, str) or role not in ("system", "developer", "user", "assistant", "tool"):
        raise bad(f"'{param}.role' is {role!r}; give system, developer, user, assistant or tool", f"{param}.role")
    extra = {}
    if role == "assistant" and m.get("tool_calls"):
        extra["tool_calls"] = _tool_calls(param, m["tool_calls"])
        content = "" if content is None else content
    if role == "tool":
        if not isinstance(m.get("tool_call_id"), str):
            raise bad(f"'{param}.tool_call_id' must be the id of the call this answers", f"{param}.tool_call_id")
        extra["tool_call_id"] = m["tool_call_id"]
        if isinstance(m.get("name"), str):
            extra["name"] = m["name"]
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad(
                    f"'{param}.content' parts must be {{'type': 'text', 'text': ...}}; this model reads text only",
                    f"{param}.content",
                )
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise bad(f"'{param}.content' must be a string or a list of text parts", f"{param}.content", "invalid_type")
    return {"role": "system" if role == "developer" else role, "content": content, **extra}


def _tool_calls(param: str, calls) -> list:
    """An assistant message's earlier tool_calls, as OpenAI sends them back."""
    ok = isinstance(calls, list) and all(
        isinstance(c, dict)
        and isinstance(c.get("function"), dict)
        and isinstance(c["function"].get("name"), str)
        and isinstance(c["function"].get("arguments"), str)
        for c in calls
    )
    if not ok:
        raise bad(
            f"'{param}.tool_calls' must be a list of {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}",
            f"{param}.tool_calls",
        )
    return [{"id": c.get("id"), "type": "function", "function": dict(c["function"])} for c in calls]


def _prompt(v):
    """Completion prompt: text, one-element list of text, or token ids."""
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
        v = v[0]
    if isinstance(v, str):
        if not v:
            raise bad("'prompt' is empty", "prompt")
        return v
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        return list(v)
    if isinstance(v, list) and len(v) > 1:
        raise bad(f"'prompt' holds {len(v)} prompts; this server takes one per request", "prompt")
    raise bad("'prompt' must be a string or a list of token ids", "prompt", "invalid_type")


def parse(body, kind: str, model_id: str) -> Request:
    """Validate a chat ("chat") or completion ("completion") request body; APIError(400) on the first problem."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_type")
    model = body.get("model", model_id)
    if not isinstance(model, str):
        raise bad("'model' must be a string", "model", "invalid_type")
    if model != model_id:
        raise bad(
            f"model '{model}' is not served here; this server serves '{model_id}' (see GET /v1/models)",
            "model",
            "model_not_found",
        )
    messages = prompt = None
    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise bad(
                "'messages' must be a non-empty list",
                "messages",
                "invalid_type" if not isinstance(msgs, list) else "invalid_value",
            )
        messages = [_message(i, m) for i, m in enumerate(msgs)]
    else:
        if "prompt" not in body:
            raise bad("'prompt' is required", "prompt", "missing_required_parameter")
        prompt = _prompt(body["prompt"])
    _unsupported(body)
    logprobs, echo = _logprobs(body, kind)
    max_tokens = _integer(body, "max_completion_tokens", 1, None) if kind == "chat" else None
    max_tokens = _integer(body, "max_tokens", 0 if echo else 1, max_tokens)  # 0 with echo: score the prompt
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad(f"'seed' must be an integer, got {type(seed).__name__}", "seed", "invalid_type")
    sampling = Sampling(
        temperature=_number(body, "temperature", 0.0, 2.0, DEFAULTS.temperature),
        top_p=_number(body, "top_p", 0.0, 1.0, DEFAULTS.top_p, lo_open=True),
        top_k=_integer(body, "top_k", 0, DEFAULTS.top_k),
        repetition_penalty=_number(body, "repetition_penalty", 0.0, 10.0, DEFAULTS.repetition_penalty, lo_open=True),
        seed=seed if seed is None else seed % 2**63 if seed < 0 else seed,
        stop=_stop(body),
    )
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = _flag(opts or {}, "include_usage")
    structured = _structured(body)
    tools, choice, parallel = _tools(body, kind)
    if structured is not None and tools and choice != "none":
        raise bad(f"'{structured[2]}' cannot be combined with 'tools' (unless tool_choice is none)", structured[2])
    return Request(
        kind,
        model_id,
        messages,
        prompt,
        max_tokens,
        sampling,
        _flag(body, "stream"),
        include_usage,
        logprobs,
        echo,
        structured,
        tools,
        choice,
        parallel,
        _template_options(body, kind),
    )


RESERVED_TEMPLATE_VARS = ("messages", "add_generation_prompt", "bos_token", "eos_token")


def _template_options(body: dict, kind: str) -> dict | None:
    """`chat_template_kwargs` (as vLLM names it): the chat template's own variables, e.g. Qwen3's
    {"enable_thinking": false}; an object of at most 16 scalar values."""
    name = "chat_template_kwargs"
    v = body.get(name)
    if v is None:
        return None
    if kind != "chat":
        raise bad(f"'{name}' is a chat parameter", name)
    if not isinstance(v, dict) or len(v) > 16:
        raise bad(f"'{name}' must be an object of at most 16 entries", name, "invalid_type")
    for k, x in v.items():
        if k in RESERVED_TEMPLATE_VARS:
            raise bad(f"'{name}' may not set '{k}' (the server sets it)", name)
        if x is not None and not isinstance(x, (bool, int, float, str)):
            raise bad(f"'{name}.{k}' must be a boolean, number, string or null", name, "invalid_type")
    return v


def _logprobs(body: dict, kind: str) -> tuple[int | None, bool]:
    """(alternatives per token or None, echo). Chat: `logprobs` true + `top_logprobs` 0..20;
    completions: `logprobs` 0..5 alternatives + `echo`."""
    if kind == "chat":
        if body.get("echo") not in (None, False):
            raise bad("'echo' is a completions parameter; chat answers never repeat the messages", "echo")
        on = _flag(body, "logprobs")
        top = body.get("top_logprobs")
        if top is not None and not on:
            raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        if top is not None:
            _integer(body, "top_logprobs", 0, 0)
            if top > MAX_TOP_LOGPROBS:
                raise bad(f"'top_logprobs' is {top}; it must be in [0, {MAX_TOP_LOGPROBS}]", "top_logprobs")
        return (top or 0) if on else None, False
    n = body.get("logprobs")
    if n is not None:
        _integer(body, "logprobs", 0, 0)
        if n > MAX_COMPLETION_LOGPROBS:
            raise bad(f"'logprobs' is {n}; it must be in [0, {MAX_COMPLETION_LOGPROBS}]", "logprobs")
    return n, _flag(body, "echo")


# ----------------------------------------------------------------------------- responses
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def finish_reason(stop_reason: str, tool_calls: bool = False) -> str:
    """Runtime stop reason -> OpenAI's: end-of-sequence and stop strings are 'stop'; a finished
    answer that called tools is 'tool_calls'."""
    return "length" if stop_reason == "length" else "tool_calls" if tool_calls else "stop"


def chat_logprobs(entries: list, text_of) -> dict:
    """Chat's `choices[].logprobs`: {"content": [{token, logprob, bytes, top_logprobs}], "refusal"}.
    `entries`: runtime/logprobs.py TokenLogprob; `text_of(id)`: a token's text."""

    def item(t: int, lp: float) -> dict:
        s = text_of(t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    content = [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list, text_of, offset: int = 0) -> dict:
    """Completions' `choices[].logprobs`: parallel lists tokens / token_logprobs / top_logprobs
    ({text: logprob}) / text_offset; an echoed prompt's first token has null logprobs."""
    tokens, values, tops, offsets = [], [], [], []
    for e in entries:
        tok = text_of(e.token)
        tokens.append(tok)
        values.append(e.logprob)
        tops.append(None if e.logprob is None else {text_of(t): lp for t, lp in e.top})
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def response(
    req: Request,
    rid: str,
    created: int,
    text: str,
    finish: str,
    use: dict,
    logprobs: dict | None = None,
    tool_calls: list | None = None,
) -> dict:
    """The whole (non-streaming) answer; `logprobs`: chat_logprobs / completion_logprobs when asked for;
    `tool_calls`: the calls parsed from the answer (content is then the text before them, or null)."""
    if req.kind == "chat":
        message = {"role": "assistant", "content": text}
        if tool_calls:
            message = {"role": "assistant", "content": text or None, "tool_calls": tool_calls}
        choice = {
            "index": 0,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": finish,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        obj = "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": req.model,
        "system_fingerprint": None,
        "choices": [choice],
        "usage": use,
    }


def chunk(
    req: Request,
    rid: str,
    created: int,
    text: str | None = None,
    finish: str | None = None,
    use: dict | None = None,
    first: bool = False,
    usage_only: bool = False,
    logprobs: dict | None = None,
    tool_calls: list | None = None,
) -> dict:
    """One server-sent event's payload: a text delta (with its tokens' `logprobs` when asked for),
    a tool_calls delta (tool_call_deltas), the final chunk (finish_reason + usage), or a usage-only chunk."""
    if req.kind == "chat":
        delta = {} if finish is not None else {"content": text or ""}
        if first:
            delta = {"role": "assistant", "content": ""}
        if tool_calls is not None:
            delta = {"tool_calls": tool_calls}
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        obj = "text_completion"
    out = {
        "id": rid,
        "object": obj,
        "created": created,
        "model": req.model,
        "system_fingerprint": None,
        "choices": [] if usage_only else [choice],
    }
    if use is not None:
        out["usage"] = use
    return out


def models(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [model_card(model_id, created)]}


def model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "edgellm"}


def now() -> int:
    return int(time.time())


def tool_call_delta(kind: str, value) -> list:
    """A tools.ToolParser event as OpenAI streams it in `delta.tool_calls`: a call's head ("call":
    index, id, type, name, arguments "") or the next piece of its arguments ("arguments": (index, text))."""
    if kind == "call":
        return [value]
    index, text = value
    return [{"index": index, "function": {"arguments": text}}]
