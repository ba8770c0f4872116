"""Constrained decoding: a per-step token mask from a grammar, applied to the logits before sampling.

    grammar = compile_grammar(gen.tokenizer, vocab_size, gen.eos_ids, "json_schema", schema)
    c = grammar.start()             # one per generation (or per batched slot)
    c.mask(logits)                  # (V,) disallowed tokens -> -inf, in place
    c.advance(token)                # the token the sampler picked
    c.done                          # the grammar is complete and admits nothing more

The grammar engine is llguidance (the library llama.cpp and vLLM use): no dependencies of its
own, a wheel for x86-64 and aarch64, and a tokenizer built straight from tokenizer.json (no
transformers). Chosen over xgrammar by measurement (benchmarks/scripts/constrain_mask.py,
NOTES-grammar.md): xgrammar imports torch and transformers, which the device install lacks.

Grammar kinds: `json_schema` (a JSON Schema: OpenAI's response_format json_schema, tool
arguments), `json_object` (any JSON object), `regex`, `grammar` (Lark, or llama.cpp's GBNF,
which llguidance converts). JSON may hold whitespace only as one space or a newline plus up to
20 spaces/tabs between tokens (llama.cpp's rule), so a weak model cannot pad forever.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import EdgeLLMError

KINDS = ("json_schema", "json_object", "regex", "grammar")
JSON_WHITESPACE = r"(\x20|\x0A[\x20\x09]{0,20})?"  # between JSON tokens: nothing, a space, or newline + indent


class ConstraintError(EdgeLLMError):
    """A grammar that does not compile, or one that allows no token at some step."""


def _llguidance():
    from .deps import require

    return require("llguidance", "structured output (a JSON schema, regex or grammar)")


def _ll_tokenizer(tokenizer, vocab_size: int, eos_ids):
    """llguidance's view of the vocabulary (token bytes from tokenizer.json), built once per
    Tokenizer (about 0.3 s for SmolLM2's 49k tokens) and kept on it."""
    key = (vocab_size, tuple(sorted(eos_ids)))
    cached = getattr(tokenizer, "_llg", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    llg = _llguidance()
    text = tokenizer.path.read_text(encoding="utf-8")
    try:
        tok = llg.LLTokenizer(text, n_vocab=vocab_size, eos_token=sorted(eos_ids) or None)
    except Exception as exc:  # noqa: BLE001 - a tokenizer llguidance cannot read
        raise ConstraintError(f"'{tokenizer.path}' cannot be used for structured output: {exc}") from None
    tokenizer._llg = (key, tok)
    return tok


def grammar_text(kind: str, spec) -> str:
    """llguidance's grammar for `spec` of `kind` (not yet checked against a tokenizer)."""
    llg = _llguidance()
    if kind == "json_schema":
        try:
            return llg.LLMatcher.grammar_from_json_schema(spec, overrides={"whitespace_pattern": JSON_WHITESPACE})
        except (ValueError, TypeError) as exc:
            raise ConstraintError(f"the JSON schema is not a JSON object: {exc}") from None
    if kind == "json_object":
        return grammar_text("json_schema", {"type": "object"})
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(spec)
    if kind == "grammar":
        try:
            return llg.grammar_from("grammar", spec)  # Lark, or GBNF (converted to Lark)
        except ValueError as exc:
            raise ConstraintError(str(exc).splitlines()[0]) from None
    raise ConstraintError(f"unknown grammar kind {kind!r}; choose {', '.join(KINDS)}")


@dataclass(frozen=True)
class Grammar:
    """A grammar checked against one tokenizer; `start()` gives a fresh per-generation state."""

    kind: str
    text: str  # llguidance's grammar
    tokenizer: object  # llguidance.LLTokenizer
    vocab_size: int

    def start(self) -> "Constraint":
        return Constraint(self)


def compile_grammar(tokenizer, vocab_size: int, eos_ids, kind: str, spec) -> Grammar:
    """Compile `spec` for `tokenizer` (runtime/generate.py Tokenizer); ConstraintError with the
    library's reason when it cannot, or when the grammar admits no first token."""
    llg = _llguidance()
    text = grammar_text(kind, spec)
    tok = _ll_tokenizer(tokenizer, vocab_size, eos_ids)
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(text, tok)
    if is_error:
        raise ConstraintError(_first_line(messages[0] if messages else "invalid grammar"))
    g = Grammar(kind, text, tok, vocab_size)
    g.start().allowed()  # a grammar that allows nothing at all fails here, before any model step
    return g


class Constraint:
    """One generation's grammar state: mask the logits, advance by the sampled token."""

    def __init__(self, grammar: Grammar):
        llg = _llguidance()
        self.grammar = grammar
        self.matcher = llg.LLMatcher(grammar.tokenizer, grammar.text, log_level=0)
        if self.matcher.is_error():
            raise ConstraintError(_first_line(self.matcher.get_error()))
        self.tokens: list[int] = []
        self._bits = np.full((grammar.vocab_size + 31) // 32, -1, np.int32)  # one bit per token

    def allowed(self) -> np.ndarray:
        """(V,) bool: the tokens the grammar allows next. ConstraintError when none is allowed."""
        m = self.matcher
        m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        ok = np.unpackbits(self._bits.view(np.uint8), count=self.grammar.vocab_size, bitorder="little").view(bool)
        if m.is_error() or not ok.any():
            raise ConstraintError(f"the grammar allows no token {self._where()}")
        return ok

    def mask(self, logits: np.ndarray) -> None:
        """Set the logits (V,) of every token the grammar disallows to -inf, in place."""
        ok = self.allowed()
        n = min(logits.shape[-1], ok.size)
        np.copyto(logits[:n], -np.inf, where=~ok[:n])
        logits[n:] = -np.inf

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise ConstraintError(f"token {token} breaks the grammar {self._where()}")
        self.tokens.append(int(token))

    @property
    def done(self) -> bool:
        """The grammar is complete and admits no more text (only end-of-sequence)."""
        return self.matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        return self.matcher.is_accepting()

    def _where(self) -> str:
        if not self.tokens:
            return "at the start of the output"
        text = self.grammar.tokenizer.decode_str(self.tokens)
        shown = text if len(text) <= 80 else "..." + text[-77:]
        return f"after {len(self.tokens)} tokens of output, at the end of {shown!r}"


def _first_line(msg: str) -> str:
    lines = [s for s in str(msg).strip().splitlines() if s.strip()]
    return lines[0][:300] if lines else "invalid grammar"
