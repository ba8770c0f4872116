"""Tool calls: each chat template family's tool-call text, as data, one parser and one grammar.

The model sees the tools through its own chat template (the `tools` variable of Qwen2/Qwen3,
Llama 3.x, SmolLM3, Mistral, Phi-4-mini, Granite templates) and answers a call in its family's
text format; `ToolParser` turns that text back into OpenAI `tool_calls` (streaming too), and
`call_grammar` is the Lark grammar (for runtime/constrain.py) that forces a well-formed call when
`tool_choice` is `required` or names a function. A template that never reads `tools` cannot
show them to the model: `detect` refuses it.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass

from .constrain import JSON_WHITESPACE
from .errors import EdgeLLMError


class ToolsError(EdgeLLMError):
    """A request's tools that cannot be used; `param` names the field (for the server's 400)."""

    def __init__(self, message: str, param: str = "tools"):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolFormat:
    """How one family's model writes tool calls."""

    name: str
    families: str  # which templates write it (documentation)
    markers: tuple  # any of these in the chat template's text selects this format
    open: str  # text before a call (per_call) or before all calls
    close: str  # text after a call (per_call) or after all calls ("" = none)
    per_call: bool  # each call wrapped in open ... close (else one wrapper around all of them)
    array: bool  # the calls are one JSON array (else one JSON object per call)
    args_key: str = "arguments"  # the key of the arguments object ("parameters": Llama 3.x)
    sep: str = "\n"  # between calls
    id_chars: int = 0  # tool call ids must be exactly this many letters/digits (Mistral: 9); 0 = call_...


FORMATS = (
    ToolFormat(
        "hermes", "Qwen2/2.5, Qwen3, SmolLM3, Hermes", ("<tool_call>",), "<tool_call>\n", "\n</tool_call>", True, False
    ),
    ToolFormat(
        "mistral", "Mistral 7B v0.3, Nemo, Small", ("[TOOL_CALLS]",), "[TOOL_CALLS]", "", False, True, id_chars=9
    ),
    ToolFormat("phi4", "Phi-4-mini", ("<|/tool_call|>", "<|tool|>"), "<|tool_call|>", "<|/tool_call|>", False, True),
    ToolFormat("granite", "Granite 3.x", ("<|tool_call|>",), "<|tool_call|>", "", False, True),
    ToolFormat(
        "llama3_json",
        "Llama 3.1/3.2/3.3 (JSON tool calling)",
        ("<|python_tag|>", "Given the following functions"),
        "",
        "",
        False,
        False,
        args_key="parameters",
        sep="; ",
    ),
)


def template_takes_tools(template: str) -> bool:
    """Whether the Jinja chat template reads a `tools` variable."""
    from jinja2 import meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        return "tools" in meta.find_undeclared_variables(ImmutableSandboxedEnvironment().parse(template))
    except Exception:  # noqa: BLE001 - a template jinja cannot parse: it fails later with its own error
        return False


def detect(template: str | None) -> ToolFormat:
    """The tool-call format of a chat template; ToolsError when it does not take tools."""
    if not template or not template_takes_tools(template):
        raise ToolsError(
            "this model's chat template does not support tools (it never reads 'tools'); families whose "
            "templates do: " + "; ".join(f.families for f in FORMATS)
        )
    for f in FORMATS:
        if any(m in template for m in f.markers):
            return f
    raise ToolsError(
        "this model's chat template takes tools but writes calls in a format edgellm does not know; known: "
        + ", ".join(f"{f.name} ({f.families})" for f in FORMATS)
    )


# ----------------------------------------------------------------------------- request side
def check_tools(tools) -> list[dict]:
    """OpenAI `tools` -> the list as given; ToolsError naming `tools[i]...` when malformed."""
    if not isinstance(tools, list) or not tools:
        raise ToolsError("'tools' must be a non-empty list of {'type': 'function', 'function': {...}}", "tools")
    names = set()
    for i, t in enumerate(tools):
        p = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise ToolsError(f"'{p}' must be {{'type': 'function', 'function': {{'name': ..., ...}}}}", p)
        fn = t["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 or not set(name) <= _NAME_CHARS:
            raise ToolsError(
                f"'{p}.function.name' must be 1-64 letters, digits, '_' or '-'; got {name!r}", f"{p}.function.name"
            )
        if name in names:
            raise ToolsError(f"'{p}.function.name' {name!r} is given twice", f"{p}.function.name")
        names.add(name)
        if "description" in fn and not isinstance(fn["description"], str):
            raise ToolsError(f"'{p}.function.description' must be a string", f"{p}.function.description")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ToolsError(f"'{p}.function.parameters' must be a JSON Schema object", f"{p}.function.parameters")
    return tools


_NAME_CHARS = set(string.ascii_letters + string.digits + "_-")


def check_choice(choice, tools: list | None):
    """`tool_choice` -> "auto" | "none" | "required" | a function name; ToolsError when invalid."""
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise ToolsError(
                f"'tool_choice' is {choice!r}; give auto, none, required or a named function", "tool_choice"
            )
        if choice == "required" and not tools:
            raise ToolsError("'tool_choice' is required but no 'tools' are given", "tool_choice")
        return choice
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise ToolsError(
            "'tool_choice' must be a string or {'type': 'function', 'function': {'name': ...}}", "tool_choice"
        )
    known = [t["function"]["name"] for t in tools or ()]
    if name not in known:
        raise ToolsError(
            f"'tool_choice' names function {name!r}, which is not in 'tools' ({', '.join(known) or 'none given'})",
            "tool_choice",
        )
    return name


def call_schema(tools: list, fmt: ToolFormat, only: str | None = None) -> dict:
    """JSON Schema of one call object of `fmt` for the given tools (or only the named one)."""
    options = []
    for t in tools:
        fn = t["function"]
        if only is not None and fn["name"] != only:
            continue
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn["name"]}, fmt.args_key: params},
                "required": ["name", fmt.args_key],
                "additionalProperties": False,
            }
        )
    return options[0] if len(options) == 1 else {"anyOf": options}


def call_grammar(tools: list, fmt: ToolFormat, only: str | None, parallel: bool, special: dict) -> str:
    """Lark grammar (llguidance) of the calls the model must write under `required` / a named
    function. `special`: marker text -> token id for markers that are special tokens of this
    tokenizer (written as <[id]>, since their text is not spelled by ordinary tokens)."""

    def lit(text: str) -> str:
        core = text.strip()
        if core not in special:
            return json.dumps(text) if text else ""
        i = text.find(core)
        before, after = text[:i], text[i + len(core) :]
        parts = (json.dumps(before) if before else "", f"<[{special[core]}]>", json.dumps(after) if after else "")
        return " ".join(x for x in parts if x)

    one = dict(call_schema(tools, fmt, only), **{"x-guidance": {"whitespace_pattern": JSON_WHITESPACE}})
    if fmt.array:
        schema = {"type": "array", "items": one, "minItems": 1, "x-guidance": one["x-guidance"]}
        if not parallel:
            schema["maxItems"] = 1
        body = f"%json {json.dumps(schema)}"
        return f"start: {lit(fmt.open)} {body} {lit(fmt.close)}\n"
    call = f"{lit(fmt.open)} %json {json.dumps(one)} {lit(fmt.close)}".strip()
    many = f" ({json.dumps(fmt.sep)} call)*" if parallel else ""
    return f"start: call{many}\ncall: {call}\n"


def markers_of(fmt: ToolFormat) -> tuple:
    return tuple(
        m for m in (fmt.open.strip(), fmt.close.strip(), "<|python_tag|>" if fmt.name == "llama3_json" else "") if m
    )


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages -> what chat templates read: an assistant's tool_calls with `arguments`
    as an object (templates write it with `tojson`), tool results as role "tool"."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c["function"])
                try:
                    fn["arguments"] = (
                        json.loads(fn["arguments"]) if isinstance(fn["arguments"], str) else fn["arguments"]
                    )
                except ValueError:
                    pass
                calls.append({"id": c.get("id"), "type": "function", "function": fn, **fn})
            m["tool_calls"] = calls
        out.append(m)
    return out


# ----------------------------------------------------------------------------- output side
def new_call_id(fmt: ToolFormat) -> str:
    if fmt.id_chars:
        alphabet = string.ascii_letters + string.digits
        return "".join(secrets.choice(alphabet) for _ in range(fmt.id_chars))
    return "call_" + secrets.token_hex(12)


def openai_call(obj, fmt: ToolFormat) -> dict | None:
    """One parsed call object -> OpenAI's {id, type, function: {name, arguments}}; None if not a call."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(fmt.args_key, obj.get("arguments", obj.get("parameters", {})))
    return {
        "id": new_call_id(fmt),
        "type": "function",
        "function": {
            "name": obj["name"],
            "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False),
        },
    }


def _json_values(text: str) -> list | None:
    """The JSON values in `text` (separated by whitespace, ',' or ';'), or None if any part is not JSON."""
    dec, i, out = json.JSONDecoder(), 0, []
    while True:
        while i < len(text) and text[i] in " \t\r\n,;":
            i += 1
        if i >= len(text):
            return out
        try:
            v, i = dec.raw_decode(text, i)
        except ValueError:
            return None
        out.append(v)


class ToolParser:
    """Model text in (piece by piece), ("content", text) and ("call", openai_call) events out.

    Text before a call is content, streamed as it comes except for a tail that could be the
    start of a call marker (held back, as stop strings are). Once a call starts the rest is
    buffered; each call is emitted when its closing marker arrives (Hermes) or at the end."""

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.buf = ""  # text not yet emitted
        self.in_calls = False
        self.seen_text = False  # content other than whitespace was emitted (Llama: a call must come first)
        self.calls = 0

    def feed(self, piece: str) -> list:
        self.buf += piece
        return self._scan(final=False)

    def finish(self) -> list:
        return self._scan(final=True)

    def _scan(self, final: bool) -> list:
        f, ev = self.fmt, []
        while True:
            if not self.in_calls:
                start = self._find_open()
                if start is None:
                    keep = 0 if final else self._held_back()
                    if len(self.buf) > keep:
                        self._content(ev, self.buf[: len(self.buf) - keep])
                        self.buf = self.buf[len(self.buf) - keep :]
                    return ev
                self._content(ev, self.buf[:start])
                self.buf = self.buf[start:]
                self.in_calls = True
            # in calls: the buffer starts at an open marker (or the JSON itself when there is none)
            if f.per_call and f.close:
                end = self.buf.find(f.close.strip())
                if end < 0 and not final:
                    return ev
                body = self.buf[len(f.open.strip()) : end if end >= 0 else len(self.buf)]
                rest = self.buf[end + len(f.close.strip()) :] if end >= 0 else ""
                if not self._calls(ev, body, raw=self.buf[: end + len(f.close.strip())] if end >= 0 else self.buf):
                    return ev
                self.buf, self.in_calls = rest.lstrip(), False
                if not self.buf:
                    return ev
                continue
            if not final:
                return ev
            body = self.buf[len(f.open.strip()) :] if f.open.strip() else self.buf
            if f.name == "llama3_json" and body.startswith("<|python_tag|>"):
                body = body[len("<|python_tag|>") :]
            if f.close.strip() and f.close.strip() in body:
                body = body[: body.find(f.close.strip())]
            self._calls(ev, body, raw=self.buf)
            self.buf = ""
            return ev

    def _calls(self, ev: list, body: str, raw: str) -> bool:
        values = _json_values(body.strip())
        items = values[0] if self.fmt.array and values and len(values) == 1 and isinstance(values[0], list) else values
        calls = [openai_call(v, self.fmt) for v in items] if items else None
        if not calls or any(c is None for c in calls):
            self._content(ev, raw)  # not a call after all: the text as it is
            self.buf, self.in_calls = "", False
            return False
        for c in calls:
            ev.append(("call", c))
            self.calls += 1
        return True

    def _content(self, ev: list, text: str):
        if text and (text.strip() or not self.calls):  # whitespace between or after calls is not content
            ev.append(("content", text))
            self.seen_text = self.seen_text or bool(text.strip())

    def _find_open(self, text: str | None = None) -> int | None:
        text = self.buf if text is None else text
        f = self.fmt
        if f.open.strip():
            i = text.find(f.open.strip())
            return i if i >= 0 else None
        # Llama 3.x: a call is the whole answer, a JSON object (optionally after <|python_tag|>)
        if self.seen_text or self.calls:
            return None
        s = text.lstrip()
        if s.startswith("{") or s.startswith("<|python_tag|>"):
            return len(text) - len(s)
        return None

    def _held_back(self) -> int:
        f, text = self.fmt, self.buf
        if not f.open.strip():  # Llama: hold everything while the answer is only whitespace or a tag prefix
            s = text.lstrip()
            if not self.seen_text and not self.calls and (not s or "<|python_tag|>".startswith(s)):
                return len(text)
            return 0
        m = f.open.strip()
        for k in range(min(len(m) - 1, len(text)), 0, -1):
            if text.endswith(m[:k]):
                return k
        return 0
