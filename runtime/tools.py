"""Tool calls: each chat template family's tool-call text, as data, one parser and one grammar.

The model sees the tools through its own chat template (the `tools` variable of Qwen2/Qwen3,
Llama 3.x, SmolLM3, Mistral, Phi-4-mini, Granite templates) and answers a call in its family's
text format; `ToolParser` turns that text back into OpenAI `tool_calls` (streamed as OpenAI does:
a call's name as soon as it is written, then its arguments piece by piece), and
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


def _string_end(text: str, i: int) -> int:
    """Index just past the JSON string that opens at text[i] ('"'), or -1 if it is not closed yet."""
    j = i + 1
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == '"':
            return j + 1
        j += 1
    return -1


def _loads(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


_SEP = " \t\r\n,;"  # between calls
_WS = " \t\r\n"


class ToolParser:
    """Model text in (piece by piece), events out, in the order OpenAI streams them:

    - ("content", text): text that is not a call, streamed as it comes except for a tail that could
      be the start of a call marker (held back, as stop strings are);
    - ("call", {index, id, type, function: {name, arguments: ""}}): a call, as soon as its name is known;
    - ("arguments", (index, text)): the next piece of that call's `arguments`, as the model writes it.

    Inside a call block (from its open marker) a small JSON scanner follows the calls: one object,
    or an array of them, per block; each object's `name` string and its arguments value (`arguments`,
    or `parameters` for Llama 3.x), whose raw text is passed through piece by piece. Nothing of the
    markup (markers, brackets, the `name` key) becomes content. A block that turns out not to hold a
    call before any call of it was announced is content after all, as written."""

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.buf = ""  # content: text not yet emitted; in a call block: the block's text from its marker
        self.in_calls = False
        self.seen_text = False  # content other than whitespace was emitted (Llama: a call must come first)
        self.calls = 0  # calls announced so far (the next call's index)

    def feed(self, piece: str) -> list:
        self.buf += piece
        return self._scan(final=False)

    def finish(self) -> list:
        return self._scan(final=True)

    @staticmethod
    def collect(fmt: ToolFormat, text: str) -> tuple[str, list]:
        """A whole answer -> (its content, its OpenAI tool_calls): the streamed events put together."""
        p = ToolParser(fmt)
        content, calls = [], []
        for kind, v in p.feed(text) + p.finish():
            if kind == "content":
                content.append(v)
            elif kind == "call":
                calls.append({"id": v["id"], "type": "function", "function": dict(v["function"])})
            else:
                calls[v[0]]["function"]["arguments"] += v[1]
        return "".join(content), calls

    # ------------------------------------------------------------------ content
    def _scan(self, final: bool) -> list:
        ev: list = []
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
                self._open_block()
            if not self._scan_calls(ev, final):
                return ev  # waiting for more text (or finished)

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

    # ------------------------------------------------------------------ call blocks
    def _open_block(self):
        """self.buf starts at a call block's open marker (or, Llama 3.x, its JSON / <|python_tag|>)."""
        m = self.fmt.open.strip() or ("<|python_tag|>" if self.buf.startswith("<|python_tag|>") else "")
        self.in_calls, self.pos, self.st = True, len(m), "between"
        self.in_array, self.block_calls = False, 0

    def _new_object(self):
        self.key = None
        self.name = None  # the call's name once read
        self.index = None  # the call's index once announced
        self.args_from = self.args_to = -1  # the arguments value's span in buf (args_to -1: not ended)
        self.args_str = False  # arguments written as a JSON string: sent decoded, in one piece
        self.args_sent = 0  # buf position up to which the arguments were sent
        self.v_from, self.v_depth, self.v_instr = 0, 0, False

    def _scan_calls(self, ev: list, final: bool) -> bool:
        """Read the block from self.pos; True when the block ended (self.buf is then content again)."""
        while True:
            r = self._step(ev, final)
            if r is not None:
                return r

    def _step(self, ev: list, final: bool) -> bool | None:
        """One move of the block's scanner: None to go on, True (block ended), False (wait for text)."""
        b, close, st = self.buf, self.fmt.close.strip(), self.st
        j = self.pos
        if st in ("between", "key", "colon", "value", "after"):
            skip = _SEP if st == "between" else _WS
            while j < len(b) and b[j] in skip:
                j += 1
            self.pos = j
        if j >= len(b) and st != "value_in":
            return self._end_block(ev, j) if final else False
        c = b[j] if j < len(b) else ""
        if st == "skip":  # the rest of a broken block, up to its close marker
            k = b.find(close, j)
            if k < 0:
                self.pos = len(b)
                return None
            return self._end_block(ev, k + len(close))
        if st == "between":
            if close and not self.in_array:
                if b.startswith(close, j):
                    return self._end_block(ev, j + len(close))
                if close.startswith(b[j:]) and not final:
                    return False
            if c == "[" and not self.in_array:
                self.in_array, self.pos = True, j + 1
            elif c == "]" and self.in_array:
                self.in_array, self.pos = False, j + 1
            elif c == "{":
                self._new_object()
                self.st, self.pos = "key", j + 1
            else:
                return self._broken(ev, j)
        elif st == "key":
            if c == "}":
                return None if self._end_object(ev, j + 1) else self._broken(ev, j + 1)
            if c != '"':
                return self._broken(ev, j)
            end = _string_end(b, j)
            if end < 0:
                return self._end_block(ev, len(b)) if final else False
            self.key, self.st, self.pos = _loads(b[j:end]), "colon", end
        elif st == "colon":
            if c != ":":
                return self._broken(ev, j)
            self.st, self.pos = "value", j + 1
        elif st == "value":
            return self._value(ev, b, j, final)
        elif st == "value_in":
            end = self._value_end(b, final)
            if end < 0:
                self._send_args(ev, self.pos)
                return self._end_block(ev, len(b)) if final else False
            if self.v_kind == "args":
                self.args_to = end
                self._send_args(ev, end)
            self.st, self.pos = "after", end
        elif st == "after":
            if c == ",":
                self.st, self.pos = "key", j + 1
            elif c == "}":
                return None if self._end_object(ev, j + 1) else self._broken(ev, j + 1)
            else:
                return self._broken(ev, j)
        return None

    def _value(self, ev: list, b: str, j: int, final: bool) -> bool | None:
        """A value starts at j: the call's name (read whole, then the call is announced), its
        arguments (scanned and sent as they come) or another key's (skipped)."""
        c = b[j]
        if self.key == "name" and self.name is None:
            if c != '"':
                return self._broken(ev, j)
            end = _string_end(b, j)
            if end < 0:
                return self._end_block(ev, len(b)) if final else False
            self.name = _loads(b[j:end])
            if not isinstance(self.name, str):
                self.name = None
                return self._broken(ev, j)
            self._announce(ev)
            self.st, self.pos = "after", end
            return None
        if self.key in (self.fmt.args_key, "arguments", "parameters") and self.args_from < 0:
            self.args_from, self.args_sent, self.args_str = j, j, c == '"'
            self.v_kind = "args"
        else:
            self.v_kind = "skip"
        self.v_from, self.v_depth, self.v_instr, self.v_esc = j, 0, False, False
        self.st = "value_in"
        return None

    def _value_end(self, b: str, final: bool) -> int:
        """Scan the value opened at self.v_from from self.pos; its end index, or -1 (not ended yet)."""
        j = self.pos
        first = b[self.v_from]
        while j < len(b):
            c = b[j]
            if self.v_instr:
                if self.v_esc:
                    self.v_esc = False
                elif c == "\\":
                    self.v_esc = True
                elif c == '"':
                    self.v_instr = False
                    if self.v_depth == 0:
                        return j + 1
            elif c == '"':
                self.v_instr = True
            elif c in "{[":
                self.v_depth += 1
            elif c in "}]":
                if self.v_depth == 0:  # a scalar's end (the object's own bracket)
                    return j
                self.v_depth -= 1
                if self.v_depth == 0:
                    return j + 1
            elif self.v_depth == 0 and first not in '{["' and c in ",\t\r\n ":
                return j
            j += 1
        self.pos = j
        return len(b) if final and first not in '{["' else -1

    def _announce(self, ev: list):
        """The call's name is known: announce it, with the arguments read so far."""
        self.index = self.calls
        self.calls += 1
        self.block_calls += 1
        fn = {"name": self.name, "arguments": ""}
        ev.append(("call", {"index": self.index, "id": new_call_id(self.fmt), "type": "function", "function": fn}))
        if self.args_from >= 0:
            self._send_args(ev, self.args_to if self.args_to >= 0 else self.pos)

    def _send_args(self, ev: list, upto: int):
        if self.index is None or self.args_from < 0 or upto <= self.args_sent:
            return
        raw = self.buf[self.args_sent : upto]
        if self.args_str:  # a JSON string holding the arguments: its text, once it is whole
            if self.args_to < 0:
                return
            try:
                raw = json.loads(self.buf[self.args_from : self.args_to])
            except ValueError:
                pass
        self.args_sent = upto
        if raw:
            ev.append(("arguments", (self.index, raw)))

    def _end_object(self, ev: list, end: int) -> bool:
        """A call object closed at end; False when it was not a call (no name)."""
        if self.name is None or not isinstance(self.name, str):
            return False
        if self.args_from < 0:
            ev.append(("arguments", (self.index, "{}")))
        self.st, self.pos = "between", end
        return True

    def _broken(self, ev: list, j: int) -> bool | None:
        """Text at j is not part of a call. Before any call of the block: the block is content as
        written. After one: the calls stand; the rest of the block is dropped up to its close
        marker, or (no close marker) is content again. True when the block ended (None: scan on)."""
        if self.block_calls == 0:
            return self._end_block(ev, j)
        if self.fmt.close.strip():
            self.st, self.pos = "skip", j
            return None
        return self._end_block(ev, j)

    def _end_block(self, ev: list, j: int) -> bool:
        """The block ends at j; text after it is content again. A block that announced no call is
        content as written (not a call after all); a call cut off keeps the arguments sent."""
        if self.block_calls == 0:
            self._content(ev, self.buf[:j])
        self.buf, self.in_calls = self.buf[j:], False
        return True
