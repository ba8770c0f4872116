"""Quality measurement: perplexity, and KL divergence / top-1 agreement against a reference.

Protocol (fixed, so numbers are comparable across runs and variants):
- the evaluation split of the data (last 10% of the token stream, see data.py), at most
  `max_tokens` tokens of it;
- windows of `ctx` tokens starting every `stride` tokens; the first window scores all its
  predictions, later windows only their last `stride` (so each token is scored once, with at
  least ctx - stride tokens of context when stride < ctx);
- perplexity = exp(mean negative log-likelihood over scored tokens);
- KL(P_ref || P_model) of the next-token distributions, averaged over the same tokens;
  top-1 agreement = share of those tokens where both models' argmax is the same.
Deterministic: no sampling, fp32 maths, fixed windows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .progress import NULL

DEFAULT_CTX = 512
DEFAULT_STRIDE = 512
DEFAULT_MAX_TOKENS = 16384


@dataclass
class Quality:
    perplexity: float
    tokens: int
    ctx: int
    stride: int
    kl: float | None = None  # mean KL(ref || model), nats/token
    top1: float | None = None  # share of tokens where argmax agrees with the reference

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def windows(n_tokens: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position inside the window) for the sliding-window protocol."""
    if stride > ctx:
        raise ValueError(f"stride {stride} must not exceed ctx {ctx}")
    out, start = [], 0
    while start + 1 < n_tokens:
        end = min(start + ctx, n_tokens)
        first = 0 if start == 0 else ctx - stride
        if first < end - start - 1:
            out.append((start, end, first))
        if end == n_tokens:
            break
        start += stride
    return out


def _logits(model, ids):
    import torch

    with torch.inference_mode():
        return model(input_ids=ids.unsqueeze(0), use_cache=False).logits[0].float()  # (T, V)


def evaluate(
    model,
    ids,
    *,
    reference=None,
    ctx: int = DEFAULT_CTX,
    stride: int = DEFAULT_STRIDE,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    progress=NULL,
    reference_cache: dict | None = None,
) -> Quality:
    """Score `model` on token stream `ids` (1-D); with `reference`, also KL and top-1 agreement.

    `reference_cache` (a dict) keeps the reference's log-probabilities per window, so comparing
    many variants against one reference runs the reference once.
    """
    import torch.nn.functional as F

    if max_tokens:
        ids = ids[:max_tokens]
    wins = windows(len(ids), ctx, stride)
    if not wins:
        from .errors import EdgeLLMError

        raise EdgeLLMError(f"the evaluation data has {len(ids)} tokens, too few to score; give more text")
    nll, kl, agree, count = 0.0, 0.0, 0, 0
    for start, end, first in progress.track(wins, "evaluating", total=len(wins)):
        x = ids[start:end]
        logits = _logits(model, x)[first:-1]  # predictions for x[first+1:]
        target = x[first + 1 :]
        logp = F.log_softmax(logits, dim=-1)
        nll += -logp.gather(-1, target.unsqueeze(-1)).sum().item()
        count += target.numel()
        if reference is not None:
            key = (start, end)
            if reference_cache is not None and key in reference_cache:
                ref_logp = reference_cache[key]
            else:
                ref_logp = F.log_softmax(_logits(reference, x)[first:-1], dim=-1)
                if reference_cache is not None:
                    reference_cache[key] = ref_logp
            kl += (ref_logp.exp() * (ref_logp - logp)).sum().item()
            agree += (ref_logp.argmax(-1) == logits.argmax(-1)).sum().item()
    q = Quality(perplexity=math.exp(nll / count), tokens=count, ctx=ctx, stride=stride)
    if reference is not None:
        q.kl, q.top1 = kl / count, agree / count
    return q
