"""What a server request's structured output and tools become for the generator.

`plan(gen, req)` checks `response_format` / `guided_*` and `tools` / `tool_choice` against the
loaded model (its tokenizer, its chat template) and returns the grammar to decode under, the
tools to show the chat template, the tool-call format to parse the answer with, and the special
tokens whose text must stay in the output. Every problem is an APIError(400) naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import tools as T
from .constrain import ConstraintError, Grammar, compile_grammar
from .errors import EdgeLLMError
from .openai_schema import APIError, Request, bad


@dataclass
class Plan:
    grammar: Grammar | None = None
    field: str | None = None  # the request field the grammar came from (for a dead end's 400)
    fmt: T.ToolFormat | None = None  # parse tool calls out of the answer in this format
    tools: list | None = None  # shown to the chat template
    keep_special: tuple = ()


def special_ids(tokenizer, texts) -> dict:
    """{text: id} of the texts that are special tokens of `tokenizer` (decode skips those)."""
    added = tokenizer.tok.get_added_tokens_decoder()
    out = {}
    for t in texts:
        i = tokenizer.token_id(t)
        if i is not None and i in added and added[i].special:
            out[t] = i
    return out


def plan(gen, req: Request) -> Plan:
    p = Plan()
    vocab, eos = gen.model.config.vocab_size, gen.eos_ids
    if req.tools and req.tool_choice != "none":
        try:
            p.fmt = T.detect(gen.tokenizer.chat_template)
        except T.ToolsError as exc:
            raise bad(str(exc), "tools", "unsupported_parameter") from None
        p.tools = req.tools
        special = special_ids(gen.tokenizer, T.markers_of(p.fmt))
        p.keep_special = tuple(special.values())
        # required, or a named function: the call is generated under this grammar; under auto it is
        # compiled all the same, so parameters that are no JSON Schema are a 400 whatever tool_choice is
        only = None if req.tool_choice in ("required", "auto") else req.tool_choice
        lark = T.call_grammar(req.tools, p.fmt, only, req.parallel_tool_calls, special)
        grammar = _compile(gen, vocab, eos, "grammar", lark, "tools")
        if req.tool_choice != "auto":
            p.grammar, p.field = grammar, "tools"
    if req.structured is not None:
        kind, spec, field = req.structured
        p.grammar = _compile(gen, vocab, eos, kind, spec, field)
        p.field = field
    return p


def _compile(gen, vocab, eos, kind, spec, field) -> Grammar:
    try:
        return compile_grammar(gen.tokenizer, vocab, eos, kind, spec)
    except ConstraintError as exc:
        raise bad(f"'{field}' cannot be used: {exc}", field, "invalid_grammar") from None
    except EdgeLLMError as exc:  # the llguidance extra is missing
        raise APIError(400, str(exc), field, "unsupported_parameter") from None
