"""Speculative decoding: a cheap drafter proposes k tokens, the target checks them in one pass.

At batch 1 a decode step reads every weight once for one token. A verify pass runs the pending
token and k drafted ones through the target in one call (model.py FEW_TOKENS: each token through
the decode kernels, each weight block read once for all of them), so every accepted draft is a
token for (almost) the price of none. The drafters:

- `Lookup`: prompt lookup (n-gram drafting). The last n tokens of the context are looked up
  earlier in the context (prompt and text so far); the tokens that followed them are the draft.
  It pays on text that copies from its context (edits, summaries, answers from a document, code).
- `DraftModel`: a second, smaller export with the same tokenizer, decoded greedily.
- `LookupThenDraft` (`--lookup` with `--draft`): prompt lookup where the context has a copy to
  follow (free drafts), the draft model everywhere else.

A drafter has `propose(context, k, lookup)` (up to k tokens; `lookup` False while LookupPause
holds prompt lookup off) and `last`, which of "lookup" / "draft" made its latest proposal.

All of them propose deterministically (q is one token with probability 1), so the standard
rejection-sampling rule becomes: accept draft d with probability p(d), where p is the target's
distribution after temperature / top-k / top-p / repetition penalty; on a rejection draw from p
with d removed (renormalized). The accepted tokens are then distributed exactly as plain
sampling's. Greedy (temperature 0) accepts d only when it is the target's argmax, and the verify
pass computes the logits decode steps would, bit for bit: the output equals plain greedy
decoding token for token.

Rollback: the KV cache is indexed by position, so forgetting rejected drafts is `truncate`.

Adaptive k: grow by 2 after a round that accepted every draft (up to k_max), fall to the accepted
length + 1 after a partial one, halve after a round that accepted nothing. Lookup switches itself
off when it does not pay: after a round that accepted nothing it stops drafting for a pause
(MIN_PAUSE steps, doubling with each such round up to MAX_PAUSE); a round that accepted at least
half its drafts halves the next pause. On free generation (SmolLM2, no copying) a pause that
ended at the first accepted draft cost 7% of decode speed in failed verify passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import EdgeLLMError, UnsupportedError

K_MAX_LIMIT = 15  # drafts per verify pass: the pass (k + 1 tokens) must stay within model.FEW_TOKENS
MIN_PAUSE, MAX_PAUSE = 4, 64  # decode steps lookup waits before drafting again after a failed round


@dataclass
class SpecStats:
    """Speculation figures of one generation."""

    rounds: int = 0  # verify passes (a pending token + drafts through the target)
    drafted: int = 0  # drafted tokens checked
    accepted: int = 0  # drafted tokens accepted
    steps: int = 0  # plain decode steps (no draft)
    draft_s: float = 0.0  # time spent drafting (lookup search or the draft model)
    tested: list = field(default_factory=list)  # [i]: rounds that checked draft position i (all before it accepted)
    passed: list = field(default_factory=list)  # [i]: rounds that accepted draft position i

    def count(self, k: int, n: int) -> None:
        """One verify pass of k drafts that accepted the first n: the per-position tallies."""
        grow = max(0, min(k, n + 1) - len(self.tested))
        self.tested += [0] * grow
        self.passed += [0] * grow
        for i in range(min(k, n + 1)):  # position i is checked when drafts 0..i-1 were accepted
            self.tested[i] += 1
            self.passed[i] += i < n

    def merge(self, other: "SpecStats") -> None:
        """Add another generation's figures (a benchmark pools its runs)."""
        for name in ("rounds", "drafted", "accepted", "steps", "draft_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.tested, other.tested), (self.passed, other.passed)):
            mine += [0] * max(0, len(theirs) - len(mine))
            for i, v in enumerate(theirs):
                mine[i] += v

    @property
    def curve(self) -> list[float]:
        """Acceptance by draft position: P(draft i accepted | drafts before it accepted), i = 1, 2, ..."""
        return [p / t for p, t in zip(self.passed, self.tested) if t]

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def mean_accepted(self) -> float | None:
        """Drafted tokens accepted per verify pass."""
        return self.accepted / self.rounds if self.rounds else None

    def line(self) -> str:
        if not self.rounds:
            return f"speculation: no drafts ({self.steps} plain steps)"
        tokens = self.rounds * 1 + self.accepted + self.steps  # each target pass yields one token beyond its drafts
        return (
            f"speculation: {self.rounds} verify passes, {self.accepted}/{self.drafted} drafts accepted "
            f"({100 * self.acceptance:.0f}%), mean accepted length {self.mean_accepted:.2f}, "
            f"{self.steps} plain steps, {tokens / (self.rounds + self.steps):.2f} tokens per target pass"
        )


# ----------------------------------------------------------------------------- drafters
class Lookup:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the context's last
    n tokens (n from ngram_max down to ngram_min)."""

    name = last = "lookup"  # last: which drafter made the latest proposal (LookupPause reads it)

    def __init__(self, ngram_max: int = 4, ngram_min: int = 2):
        if not 1 <= ngram_min <= ngram_max:
            raise EdgeLLMError(f"lookup n-gram range [{ngram_min}, {ngram_max}] is invalid")
        self.ngram_max, self.ngram_min = ngram_max, ngram_min

    def propose(self, context: list[int], k: int, lookup: bool = True) -> list[int]:
        """Up to k drafted tokens; none while lookup is paused (`lookup` False)."""
        if not lookup:
            return []
        ctx = np.asarray(context, np.int64)  # (T,)
        T = ctx.size
        for n in range(min(self.ngram_max, T - 1), self.ngram_min - 1, -1):
            # starts s < T - n of earlier copies of the last n tokens
            cand = np.flatnonzero(ctx[: T - n] == ctx[T - n])
            for j in range(1, n):
                cand = cand[ctx[cand + j] == ctx[T - n + j]]
                if not cand.size:
                    break
            if cand.size:
                s = int(cand[-1]) + n  # the latest copy: what followed it
                return context[s : s + k]
        return []

    def sync(self, context: list[int]) -> None:
        pass


class DraftModel:
    """A smaller export with the target's tokenizer, decoded greedily; its KV cache follows the
    context (rolled back to the common prefix before each proposal). With `p_min` > 0 it stops
    drafting at the first token its own probability puts below p_min (a draft that is not sure
    rarely matches the target, and a rejected draft costs a verify pass more than a plain step)."""

    name = last = "draft"

    def __init__(self, model, p_min: float = 0.0):
        if not 0.0 <= p_min < 1.0:
            raise EdgeLLMError(f"--draft-p-min {p_min} is out of range; give a probability in [0, 1)")
        self.model, self.p_min = model, p_min
        self.cached: list[int] = []  # tokens in the draft's KV cache

    def _feed(self, ids: list[int]) -> np.ndarray:
        logits = self.model.forward(np.array(ids, np.int64))
        self.cached += ids
        return logits

    def propose(self, context: list[int], k: int, lookup: bool = True) -> list[int]:
        m = self.model
        if len(context) + k > m.n_ctx:
            return []
        common = 0
        top = min(len(self.cached), len(context) - 1)  # recompute at least the last token
        while common < top and self.cached[common] == context[common]:
            common += 1
        m.truncate(common)
        del self.cached[common:]
        logits = self._feed(context[common:])
        out: list[int] = []
        while True:
            tok = int(np.argmax(logits))
            if self.p_min and _top_prob(logits, tok) < self.p_min:
                return out
            out.append(tok)
            if len(out) == k:
                return out
            logits = self._feed([tok])

    def sync(self, context: list[int]) -> None:
        pass


def _top_prob(logits: np.ndarray, top: int) -> float:
    """softmax(logits)[top] for the argmax `top`: exp in float32 (every exponent <= 0, no overflow),
    summed in float64. Not logprobs.log_softmax: its float64 vector cost 300 us per drafted token
    over a 49k vocabulary, half a 4-layer draft's step; this costs 33 us."""
    return 1.0 / float(np.exp(logits - logits[top]).sum(dtype=np.float64))


class LookupThenDraft:
    """Prompt lookup first (its drafts cost a slice of the context, not a model step); where the
    context has no copy of its last n-gram, or while lookup is paused (LookupPause, as for lookup
    alone), the draft model proposes."""

    name = "lookup+draft"

    def __init__(self, lookup: Lookup, draft: DraftModel):
        self.lookup, self.draft = lookup, draft
        self.last = "draft"  # which drafter made the latest proposal
        self.used = {"lookup": 0, "draft": 0}  # proposals made by each

    def propose(self, context: list[int], k: int, lookup: bool = True) -> list[int]:
        out = self.lookup.propose(context, k, lookup)
        self.last = "lookup" if out else "draft"
        out = out or self.draft.propose(context, k)
        if out:
            self.used[self.last] += 1
        return out

    def sync(self, context: list[int]) -> None:
        pass


class LookupPause:
    """Lookup switches itself off where it does not pay: after a lookup round that accepted nothing
    it waits `left` decode steps (MIN_PAUSE, doubling with each such round up to MAX_PAUSE); a
    lookup round that accepted at least half its drafts halves the next wait. Rounds of a draft
    model leave it alone. One per generation (Speculator.tokens)."""

    def __init__(self):
        self.left = self.length = 0

    def step(self) -> bool:
        """Called once per decode step: may lookup propose at this one?"""
        allowed = self.left == 0
        if self.left:
            self.left -= 1
        return allowed

    def after(self, drafter: str, drafted: int, accepted: int) -> None:
        """After a verify pass of `drafter`'s ("lookup" or "draft") drafts."""
        if drafter != "lookup":
            return
        if accepted == 0:  # the verify pass bought nothing: pause, longer each time
            self.length = min(MAX_PAUSE, max(MIN_PAUSE, 2 * self.length))
            self.left = self.length
        elif 2 * accepted >= drafted:  # a good round: pause less after the next failure
            self.length //= 2


def check_draft(target, draft, target_dir: Path, draft_dir: Path) -> None:
    """A draft must share the target's tokenizer and vocabulary and be smaller than it."""
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise EdgeLLMError(
            f"the draft '{draft_dir}' has a vocabulary of {dv} tokens, the target {tv}; give a draft "
            "with the target's tokenizer (edgellm distill --draft-for)"
        )
    a, b = Path(target_dir) / "tokenizer.json", Path(draft_dir) / "tokenizer.json"
    if not b.is_file():
        raise EdgeLLMError(f"the draft '{draft_dir}' has no tokenizer.json; export it with its tokenizer")
    if _vocab(a) != _vocab(b):
        raise EdgeLLMError(
            f"the draft '{draft_dir}' has a different tokenizer from the target '{target_dir}'; "
            "give a draft with the target's tokenizer (edgellm distill --draft-for)"
        )
    tb, db = _bytes_per_token(target), _bytes_per_token(draft)
    if db >= tb:
        raise EdgeLLMError(
            f"the draft '{draft_dir}' reads {db / 1e6:.1f} MB per token, not less than the target's "
            f"{tb / 1e6:.1f} MB; a draft must be smaller than its target"
        )


def _vocab(path: Path) -> dict:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception as exc:  # noqa: BLE001 - a damaged tokenizer.json
        raise EdgeLLMError(f"cannot read '{path}': {str(exc).splitlines()[0][:200] if str(exc) else exc}") from None


def _bytes_per_token(model) -> int:
    w = getattr(model, "weights", None)
    if w is not None and getattr(w, "bytes_per_token", None):
        return int(w.bytes_per_token)
    c = model.config
    return c.num_layers * c.hidden_size * (c.hidden_size + c.intermediate_size)


# ----------------------------------------------------------------------------- the acceptance rule
def probs(logits: np.ndarray, p, seen: np.ndarray | None) -> np.ndarray:
    """The distribution (V,) float64 that generate.sample draws from under Sampling p (p.temperature > 0)."""
    x = logits.astype(np.float64)
    if p.repetition_penalty != 1.0 and seen is not None and seen.size:
        ids = np.unique(seen)
        v = x[ids]
        x[ids] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    keep = np.ones(x.size, bool)
    if 0 < p.top_k < x.size:
        keep = x >= np.partition(x, -p.top_k)[-p.top_k]
    z = np.where(keep, x / p.temperature, -np.inf)
    q = np.exp(z - z.max())
    q /= q.sum()
    if p.top_p < 1.0:
        order = np.argsort(-q, kind="stable")
        cut = np.searchsorted(np.cumsum(q[order]), p.top_p) + 1  # smallest prefix with mass >= top_p
        drop = order[cut:]
        q[drop] = 0.0
        q /= q.sum()
    return q


def accept(q: np.ndarray, draft: int, rng: np.random.Generator) -> tuple[bool, int]:
    """The rejection-sampling rule for a deterministic draft: (True, draft) with probability
    q[draft]; else (False, a token drawn from q without the draft, renormalized)."""
    if rng.random() < q[draft]:
        return True, draft
    r = q.copy()
    r[draft] = 0.0
    s = r.sum()
    if s <= 0:  # q was all on the draft: accepted above (rng.random() < 1)
        return True, draft
    return False, int(rng.choice(r.size, p=r / s))


# ----------------------------------------------------------------------------- the decode loop
class Speculator:
    """Drives the target with a drafter. `tokens` replaces the plain loop's sample-then-step."""

    def __init__(self, drafter, k_max: int = 8, k_start: int = 4):
        if not 1 <= k_max <= K_MAX_LIMIT:
            raise EdgeLLMError(f"--draft-max {k_max} is out of range; give an integer in [1, {K_MAX_LIMIT}]")
        self.drafter, self.k_max = drafter, k_max
        self.k_start = min(k_start, k_max)
        self.stats = SpecStats()

    def tokens(self, gen, logits, p, rng, context: list[int], budget: int):
        """Yield (token, logits it came from) like the plain loop. `context` is the caller's
        list (prompt + accepted tokens; the caller appends each yielded token before asking for
        the next one); gen.cached follows the target's KV cache."""
        from .generate import _DAMAGED, _numeric_damage, _step, sample

        m = gen.model
        self.stats = st = SpecStats()
        greedy = p.temperature == 0
        k, pause = self.k_start, LookupPause()
        seen = lambda extra: (  # noqa: E731 - the ids the repetition penalty sees
            np.array(context + extra, np.int64) if p.repetition_penalty != 1.0 else None
        )
        tok = sample(logits, p, rng, seen([]))
        produced = 1
        yield tok, logits
        while True:
            room = min(budget - produced - 1, m.n_ctx - m.pos - 1, k)  # drafts that can still be used
            drafts: list[int] = []
            lookup = pause.step()
            if room > 0:
                t0 = time.perf_counter()
                drafts = self.drafter.propose(context, room, lookup)
                st.draft_s += time.perf_counter() - t0
            if not drafts:
                logits = _step(m, np.array([tok], np.int64))
                gen.cached.append(tok)
                st.steps += 1
                tok = sample(logits, p, rng, seen([]))
                produced += 1
                yield tok, logits
                continue
            base = m.pos  # the pending token goes here, the drafts after it
            with _numeric_damage():
                rows = m.forward(np.array([tok] + drafts, np.int64), all_logits=True)  # (1 + k, V)
            if not np.isfinite(rows).all():
                raise EdgeLLMError(_DAMAGED)
            gen.cached.append(tok)
            n, nxt = 0, None
            for i, d in enumerate(drafts):
                if greedy:
                    t = sample(rows[i], p, rng, seen(drafts[:i]))
                    ok = t == d
                else:
                    ok, t = accept(probs(rows[i], p, seen(drafts[:i])), d, rng)
                if not ok:
                    nxt = t
                    break
                n += 1
            if nxt is None:  # every draft accepted: the bonus token from the last row
                nxt = sample(rows[n], p, rng, seen(drafts))
            m.truncate(base + 1 + n)  # roll back the rejected drafts
            if m.pos != base + 1 + n:  # a sliding layer's ring keeps window + 127 rows: k <= 15 always fits
                raise EdgeLLMError(f"speculation: the KV cache could not roll back to {base + 1 + n} tokens")
            gen.cached += drafts[:n]
            st.rounds += 1
            st.drafted += len(drafts)
            st.accepted += n
            st.count(len(drafts), n)
            if n == len(drafts):
                k = min(self.k_max, k + 2)
            elif n:
                k = max(1, n + 1)
            else:
                k = max(1, k // 2)
            pause.after(self.drafter.last, len(drafts), n)
            for i in range(n):
                yield drafts[i], rows[i]
            produced += n + 1
            tok = nxt
            yield tok, rows[n]


def check_options(
    lookup: bool, draft, k_max: int, backend: str = "numba", device: str = "cpu", p_min: float = 0.0
) -> None:
    """The speculation options before anything loads: one-line errors."""
    if not 0.0 <= p_min < 1.0:
        raise EdgeLLMError(f"--draft-p-min {p_min} is out of range; give a probability in [0, 1)")
    if p_min and draft is None:
        raise EdgeLLMError("--draft-p-min applies to a draft model; give --draft DIR too")
    if not 1 <= k_max <= K_MAX_LIMIT:
        raise EdgeLLMError(f"--draft-max {k_max} is out of range; give an integer in [1, {K_MAX_LIMIT}]")
    what = "--lookup" if lookup and draft is None else "--draft"
    if device != "cpu":
        raise UnsupportedError(
            f"{what} with --device {device} is not supported yet; speculative decoding runs on "
            "the numba CPU runtime (--device cpu)"
        )
    if backend != "numba":
        raise UnsupportedError(
            f"{what} is not supported on the {backend} backend; it runs on the numba CPU runtime (--backend numba)"
        )
    if draft is not None and not (Path(draft) / "model.onnx").is_file():
        raise EdgeLLMError(
            f"the draft '{draft}' is not an export directory (no model.onnx); give a directory "
            "written by 'edgellm export'"
        )


def attach(
    gen,
    lookup: bool = False,
    draft: str | Path | None = None,
    k_max: int = 8,
    target_dir=None,
    draft_model=None,
    p_min: float = 0.0,
) -> Speculator | None:
    """Turn on speculation for Generator `gen`: prompt lookup, or the draft export `draft`
    (opened on the numba CPU runtime with the target's context, unless `draft_model` is given).
    Both: prompt lookup where it finds a copy, the draft elsewhere (LookupThenDraft).
    Returns the Speculator (also `gen.speculator`); neither option: None."""
    if not lookup and draft is None and draft_model is None:
        gen.speculator = None
        return None
    m = gen.model
    cuda = m.backend == "numba-cuda"
    backend, device = "numba" if cuda else m.backend, "cuda" if cuda else "cpu"
    check_options(lookup, draft, k_max, backend, device, p_min if draft_model is None else 0.0)  # DraftModel checks it
    if lookup and draft is None and draft_model is None:
        drafter = Lookup()
    else:
        if draft_model is None:
            from .model import NumbaModel

            draft_model = NumbaModel(draft, n_ctx=m.n_ctx, threads=m.threads, kernels="auto")
            draft_model.warmup()
        check_draft(m, draft_model, target_dir or m.export.path, draft or draft_model.export.path)
        drafter = DraftModel(draft_model, p_min=p_min)
        if lookup:
            drafter = LookupThenDraft(Lookup(), drafter)
    gen.speculator = Speculator(drafter, k_max=k_max)
    return gen.speculator
