"""Tokens to text pieces for one generation: incremental detokenization and stop strings.

The same rules as `Generator._generate` (generate.py), held as state instead of a loop, so that
the parallel server (slot_engine.py) can advance many generations one token at a time:
- the new tokens are decoded together with a few before them (TGI-style), so merges across the
  boundary (leading spaces, multi-byte characters) come out as the full decode would; O(1) per token;
- text that could start a stop string is held back until it cannot; a stop string ends the text
  before it.
"""

from __future__ import annotations

from .generate import _find_stop, _held_back


class TextOut:
    def __init__(self, tokenizer, stop=(), keep=()):
        self.tokenizer, self.stop, self.keep = tokenizer, tuple(stop), tuple(keep)  # keep: special ids shown
        self.out: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of `text` handed out
        self.prefix_at = self.read_at = 0

    def add(self, tok: int) -> tuple[str, bool]:
        """Append token `tok`: (the text that may be shown now, whether a stop string ended it)."""
        out = self.out
        out.append(tok)
        before = self.tokenizer.decode(out[self.prefix_at : self.read_at], self.keep)
        after = self.tokenizer.decode(out[self.prefix_at :], self.keep)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix_at, self.read_at = self.read_at, len(out)
        text = self.text
        cut = _find_stop(text, self.stop)
        if cut is not None:
            piece = text[self.emitted : cut] if cut > self.emitted else ""
            self.emitted = max(self.emitted, cut)
            return piece, True
        safe = len(text) - _held_back(text, self.stop)
        if safe > self.emitted and not text.endswith("\ufffd"):
            piece, self.emitted = text[self.emitted : safe], safe
            return piece, False
        return "", False

    def rest(self) -> str:
        """At the token budget: the text held back so far."""
        piece = self.text[self.emitted :]
        self.emitted = len(self.text)
        return piece
