"""A draft model for speculative decoding, distilled from the target it will draft for.

What makes a draft good is different from what makes a student good: the runtime accepts a
drafted token when it equals the target's next token *on the target's own text* (greedy), so the
draft is trained where it will be used:

1. `draft_from_target`: a few of the target's decoder layers (or fresh ones), with the target's
   tokenizer, embeddings, final norm and head copied (tied if the target ties them). The
   embeddings and head are frozen: the draft keeps the target's token geometry, and the
   optimizer holds no state for the largest matrices.
2. `continuations`: prompts cut from the data (wrapped in the chat template when the target has
   one; with `PromptStyle.tasks` each window sits inside a request: summarize, rewrite, answer
   from it, ...), continued greedily by the target with its KV cache. Each generated position keeps the
   target's top-k log-probabilities (the rest of the mass as one bucket), so training needs no
   second pass through the target.
3. `train_draft`: KL(target || draft) on the continuation positions (`losses.sparse_kl`), AdamW
   with train.py's warm-up + cosine schedule.
4. `agreement`: on held-out continuations, how often the draft's argmax is the target's. On the
   target's greedy text this is the probability that a greedy verify pass accepts a drafted token
   (each draft is proposed after a context the target wrote), i.e. the expected acceptance rate.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from dataclasses import dataclass
from enum import Enum

from ..arch import family_of
from ..errors import EdgeLLMError
from ..progress import NULL
from .losses import sparse_kl
from .student import keep_layers, num_layers, student_from_teacher

GEN_BATCH = 64  # prompts per generation batch: decode steps reuse each weight for this many rows


class DraftInit(str, Enum):
    # Measured on SmolLM2-135M, 2-layer drafts before training, on the target's own greedy text: first
    # (layers 0, 1) KL 15.3 nats/token, top-1 3.0%; spread (0, 29) KL 55.0, 0.0%; random KL 48.4, 1.8%.
    # On a tiny 4-layer target (1-layer drafts, 100 steps): first 86.6%, random 77.9%, spread 75.9%.
    first = "first"  # the target's first N layers: the default
    spread = "spread"  # the target's layers spread evenly, first and last kept (keep_layers)
    random = "random"  # fresh layers (the config's initializer); embeddings/head still the target's


class PromptStyle(str, Enum):
    # What the target is asked to answer. A draft is accepted where it was trained: on SmolLM2-135M-
    # Instruct a 4-layer draft trained on bare windows agreed 45.8% with the target on held-out windows
    # but 19% on the target's answers to requests (type hints); trained on requests, 28% (RESULTS §39).
    auto = "auto"  # tasks when the target has a chat template, continue otherwise
    tasks = "tasks"  # each data window inside a request (TASK_TEMPLATES), as a chat model is used
    continue_ = "continue"  # the bare window in the user turn: the model continues the text


# (before, after) a window of data: requests of the kinds speculation pays on (the answer copies from
# the prompt) and one it does not (free writing), so the draft learns both.
TASK_TEMPLATES = (
    ("Summarize this text in a few sentences.\n\n", ""),
    (
        "Rewrite the following clearly, keeping its meaning. Keep any code, adding type hints to Python functions.\n\n",
        "",
    ),
    ("", "\n\nUsing the text above, answer: what does it describe, and how is it used?"),
    ("", "\n\nList the main points of the text above."),
    ("Explain this to a beginner, quoting the parts that matter.\n\n", ""),
    ("Continue this text.\n\n", ""),
    ("Write a short story inspired by this text.\n\n", ""),
)


def init_layers(n_target: int, n_draft: int, init: DraftInit) -> list[int]:
    """Which target layers the draft starts from (for `random`: the slots, weights replaced)."""
    if not 1 <= n_draft < n_target:
        raise EdgeLLMError(
            f"--draft-layers {n_draft} must be between 1 and {n_target - 1}: a draft must have fewer layers "
            f"than its target, which has {n_target}"
        )
    if DraftInit(init) is DraftInit.first:
        return list(range(n_draft))
    return keep_layers(n_target, n_draft)


def draft_from_target(target, n_layers: int, init: DraftInit = DraftInit.first, seed: int = 0):
    """(draft module, kept target layers, names of the frozen parameters)."""
    import torch
    from transformers import AutoModelForCausalLM

    kept = init_layers(num_layers(target.config), n_layers, init)
    draft, kept = student_from_teacher(target, n_layers, kept=kept)
    if DraftInit(init) is DraftInit.random:
        torch.manual_seed(seed)
        fresh = AutoModelForCausalLM.from_config(copy.deepcopy(draft.config), dtype=next(draft.parameters()).dtype)
        path = family_of(draft.config).layers
        draft.get_submodule(path).load_state_dict(fresh.get_submodule(path).state_dict())
        del fresh
    for module in (draft.get_input_embeddings(), draft.get_output_embeddings()):
        if module is not None:
            module.requires_grad_(False)
    frozen = sorted(n for n, p in draft.named_parameters(remove_duplicate=False) if not p.requires_grad)
    return draft, kept, frozen


# ----------------------------------------------------------------------------- the target's text
@dataclass
class Continuations:
    """Prompts and the target's greedy continuations, with its top-k log-probs at each generated position."""

    ids: object  # (N, P + G) long: prompt then continuation
    prompt_len: int  # P
    top_lp: object  # (N, G, K) float32: the target's log-probs of its top-k tokens (descending)
    top_ix: object  # (N, G, K) int64: those tokens (top_ix[..., 0] is the greedy token)
    mask: object  # (N, G) bool: up to and including the first end-of-sequence token
    chat: bool  # prompts wrapped in the target's chat template

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def take(self, idx):
        return Continuations(
            self.ids[idx], self.prompt_len, self.top_lp[idx], self.top_ix[idx], self.mask[idx], self.chat
        )

    def to(self, device):
        t = [x.to(device) for x in (self.ids, self.top_lp, self.top_ix, self.mask)]
        return Continuations(t[0], self.prompt_len, t[1], t[2], t[3], self.chat)

    @property
    def tokens(self) -> int:
        """Generated positions trained on (after each row's end of sequence: not counted)."""
        return int(self.mask.sum())


def _ids(tokenizer, text: str) -> list[int]:
    """The token ids of a piece of text, no special tokens added ([] for "")."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def chat_frame(tokenizer) -> tuple[list[int], list[int]] | None:
    """(ids before, ids after) a user message in the tokenizer's chat template, with the assistant
    turn opened; None without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    mark = "\u2063MSG\u2063"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": mark}], add_generation_prompt=True, tokenize=False
        )
    except Exception:  # noqa: BLE001 - a template that needs more than one user message: plain prompts
        return None
    if text.count(mark) != 1:
        return None
    before, after = text.split(mark)
    return _ids(tokenizer, before), _ids(tokenizer, after)


def prompts(tokenizer, ids, n: int, prompt_tokens: int, seed: int, chat: bool = True, style=PromptStyle.continue_):
    """(n, P) prompts: windows of `prompt_tokens` tokens of `ids` at seeded random places, wrapped
    in the chat template's user turn when the tokenizer has one (and `chat`). With `style` tasks
    each window sits in one of TASK_TEMPLATES (in turn), lengthened so that every prompt has the
    same number of tokens (batches of equal length). Returns (prompts, chat, style used)."""
    import torch

    frame = chat_frame(tokenizer) if chat else None
    style = PromptStyle(style)
    if style is PromptStyle.auto:
        style = PromptStyle.tasks if frame is not None else PromptStyle.continue_
    parts = (
        [(_ids(tokenizer, a), _ids(tokenizer, b)) for a, b in TASK_TEMPLATES]
        if style is PromptStyle.tasks
        else [([], [])]
    )
    longest = max(len(a) + len(b) for a, b in parts)
    total = prompt_tokens + longest  # every prompt's tokens before the chat frame
    if len(ids) < total + 1:
        raise EdgeLLMError(
            f"the data has {len(ids)} tokens, fewer than one prompt of --prompt-tokens {prompt_tokens}"
            + (f" plus a request of up to {longest}" if longest else "")
            + "; give more text with --data or fewer --prompt-tokens"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - total, (n,), generator=g).tolist()
    rows = []
    for i, s in enumerate(starts):
        a, b = parts[i % len(parts)]
        window = ids[s : s + total - len(a) - len(b)]
        rows.append(torch.cat([torch.tensor(a, dtype=torch.long), window, torch.tensor(b, dtype=torch.long)]))
    rows = torch.stack(rows)  # (n, total)
    if frame is None:
        return rows, False, style
    before, after = (torch.tensor(x, dtype=torch.long).expand(n, len(x)) for x in frame)
    return torch.cat([before, rows, after], dim=1), True, style  # (n, P): every prompt the same length


def continuations(
    target, prompt_ids, gen_tokens: int, *, top_k: int, batch_size: int, eos_ids=(), chat=False, progress=NULL
) -> Continuations:
    """Greedy continuations of every prompt by the target (KV cache, batches of equal-length prompts)."""
    import torch

    n, P = prompt_ids.shape
    V = target.config.vocab_size
    K = min(top_k, V)
    ids = torch.empty(n, P + gen_tokens, dtype=torch.long)
    top_lp = torch.empty(n, gen_tokens, K, dtype=torch.float32)
    top_ix = torch.empty(n, gen_tokens, K, dtype=torch.long)
    batches = range(0, n, batch_size)
    # transformers 5.x renamed past_key_values to cache (the old name warns): whichever forward takes
    kw = "cache" if "cache" in inspect.signature(target.forward).parameters else "past_key_values"
    with torch.no_grad():
        for b0 in progress.track(batches, "target continuations", total=len(batches)):
            x = prompt_ids[b0 : b0 + batch_size]  # (B, P)
            out = target(input_ids=x, use_cache=True, logits_to_keep=1)
            past, cols = getattr(out, kw), [x]
            for t in range(gen_tokens):  # the target's greedy decode
                lp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V)
                v, i = lp.topk(K, dim=-1)  # (B, K), descending: i[:, 0] is the greedy token
                top_lp[b0 : b0 + len(x), t], top_ix[b0 : b0 + len(x), t] = v, i
                nxt = i[:, :1]  # (B, 1)
                cols.append(nxt)
                if t + 1 < gen_tokens:
                    out = target(input_ids=nxt, use_cache=True, logits_to_keep=1, **{kw: past})
                    past = getattr(out, kw)
            ids[b0 : b0 + len(x)] = torch.cat(cols, dim=1)
    gen = ids[:, P:]  # (n, G)
    is_eos = torch.zeros_like(gen, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= gen == e
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first end of sequence
    return Continuations(ids, P, top_lp, top_ix, ~after_eos, chat)


# ----------------------------------------------------------------------------- training and measuring
def _rows(draft, data: Continuations):
    """The draft's logits at the generated positions: (B, G, V)."""
    import torch

    P, G = data.prompt_len, data.top_lp.shape[1]
    keep = torch.arange(P - 1, P - 1 + G)  # position P-1+j predicts continuation token j
    return draft(input_ids=data.ids, use_cache=False, logits_to_keep=keep).logits


def agreement(draft, data: Continuations, temperature: float = 1.0, batch_size: int = 16) -> dict:
    """Top-1 agreement with the target (= expected greedy acceptance per drafted token) and the
    KL (nats/token) on `data`'s generated positions."""
    import torch

    agree = kl = n = 0.0
    was = draft.training
    draft.eval()
    with torch.no_grad():
        for b0 in range(0, len(data), batch_size):
            part = data.take(slice(b0, b0 + batch_size))
            logits = _rows(draft, part)  # (B, G, V)
            m = part.mask
            agree += float(((logits.argmax(-1) == part.top_ix[..., 0]) & m).sum())
            kl += float(sparse_kl(logits, part.top_lp, part.top_ix, m, temperature)) * float(m.sum())
            n += float(m.sum())
    draft.train(was)
    return {"agreement": agree / max(n, 1), "kl": kl / max(n, 1), "tokens": int(n)}


def train_draft(draft, data: Continuations, cfg, temperature: float = 1.0, device: str = "cpu", progress=NULL) -> dict:
    """Train the draft's unfrozen parameters on KL(target || draft) over `data`. `cfg` is a
    train.TrainConfig (steps, batch size, lr schedule, decay, clip, seed). Returns a summary with the curve."""
    import torch

    from .train import _optimizer, lr_at

    torch.manual_seed(cfg.seed)
    draft.to(device).train()
    opt = _optimizer(draft, cfg)
    params = [p for p in draft.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(cfg.seed)
    order, pos, curve = torch.randperm(len(data), generator=g), 0, []
    update = getattr(progress, "update", None)
    t_start = time.perf_counter()
    for step in progress.track(range(cfg.steps), "distilling", total=cfg.steps):  # the hot loop
        t0 = time.perf_counter()
        if pos + cfg.batch_size > len(order):  # a new epoch, a new order
            order, pos = torch.randperm(len(data), generator=g), 0
        idx = order[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        part = data.take(idx)
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        part = part.to(device)
        logits = _rows(draft, part)  # (B, G, V)
        loss = sparse_kl(logits, part.top_lp, part.top_ix, part.mask, temperature)
        loss.backward()
        if cfg.clip > 0:
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip))
        else:
            gnorm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        tokens = int(part.mask.sum())
        row = {
            "step": step + 1,
            "loss": float(loss.detach()),
            "lr": lr,
            "grad_norm": gnorm,
            "step_s": round(dt, 4),
            "tokens_per_s": round(tokens / dt, 1),
        }
        if not math.isfinite(row["loss"]):
            raise EdgeLLMError(f"the loss became {row['loss']} at step {step + 1}; lower --lr")
        curve.append(row)
        if update is not None:
            update(loss=row["loss"], tokens_per_s=row["tokens_per_s"], lr=lr)
    draft.to("cpu").eval()
    return {
        "steps": cfg.steps,
        "train_time_s": round(time.perf_counter() - t_start, 2),
        "final_loss": curve[-1]["loss"] if curve else None,
        "curve": curve,
    }
