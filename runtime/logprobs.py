"""Token log-probabilities for `serve`'s `logprobs` (and `echo`): the model's own distribution.

The values are log_softmax of the raw logits a token was chosen from (before temperature, top-k,
top-p or repetition penalty), as OpenAI and vLLM report them, so a client that scores text
(lm-evaluation-harness) gets the model's likelihood whatever sampling settings it sends.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float | None  # None: a prompt's first token (nothing predicts it)
    top: tuple[tuple[int, float], ...]  # the k most likely tokens at this position, most likely first


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(..., V) float64 log-probabilities (in float64: sums of many of them stay exact enough)."""
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def entry(token: int, logits: np.ndarray, k: int) -> TokenLogprob:
    """`token`'s log-probability under `logits` (V,) and the `k` most likely tokens there."""
    lp = log_softmax(logits)
    top = ()
    if k:
        top = np.argpartition(-lp, min(k, lp.size - 1))[:k]  # O(V), not a sort of the vocabulary
        top = top[np.argsort(-lp[top], kind="stable")]
    return TokenLogprob(int(token), float(lp[token]), tuple((int(t), float(lp[t])) for t in top))


def prompt_entries(ids: list[int], logits: np.ndarray, k: int) -> list[TokenLogprob]:
    """Per prompt token: no logprob for the first (nothing predicts it), then each token under
    the logits of the position before it (`logits` (len(ids), V), as Generator.score returns)."""
    return [TokenLogprob(int(ids[0]), None, ())] + [entry(t, logits[i], k) for i, t in enumerate(ids[1:])]
