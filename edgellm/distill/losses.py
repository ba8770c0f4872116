"""Distillation losses, as pure functions of logits / hidden states.

Defaults (LossConfig) follow Minitron (Sreenivas et al. 2024, "LLM Pruning and Distillation in
Practice"): logit-only distillation with forward KL(teacher || student), temperature 1, no
cross-entropy term — they found adding CE or intermediate-state losses did not help when the
student is initialised from the teacher. Reverse KL (mode-seeking, MiniLLM) and a CE mix are
options; the hidden-state loss (DistilBERT's cosine loss, applied to every kept layer) is
available when the student was made from the teacher's layers so the layer map is known.

All KL terms are multiplied by T² so gradient magnitudes do not shrink as T grows (Hinton 2015).
Every loss is a mean over token positions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum


class KLKind(str, Enum):
    forward = "forward"  # KL(p_teacher || q_student): mass-covering, Minitron's choice
    reverse = "reverse"  # KL(q_student || p_teacher): mode-seeking (MiniLLM)


@dataclass
class LossConfig:
    kind: KLKind = KLKind.forward
    temperature: float = 1.0  # Minitron: T=1; higher T softens both distributions
    ce_weight: float = 0.0  # loss = (1-ce_weight)*KD + ce_weight*CE; 1.0 = plain language-model training
    hidden_weight: float = 0.0  # + hidden_weight * mean(1 - cos(h_student, h_teacher)) over kept layers

    def __post_init__(self):
        from ..errors import EdgeLLMError

        self.kind = KLKind(self.kind)
        if self.temperature <= 0:
            raise EdgeLLMError(f"--temperature {self.temperature} must be > 0")
        if not 0.0 <= self.ce_weight <= 1.0:
            raise EdgeLLMError(f"--ce-weight {self.ce_weight} must be between 0 and 1")
        if self.hidden_weight < 0:
            raise EdgeLLMError(f"--hidden-weight {self.hidden_weight} must be >= 0")

    @property
    def needs_teacher(self) -> bool:
        return self.ce_weight < 1.0 or self.hidden_weight > 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kind"] = self.kind.value
        return d


def kl_loss(student_logits, teacher_logits, temperature: float = 1.0, kind: KLKind = KLKind.forward):
    """T² · KL between temperature-softened next-token distributions, mean over positions.

    student_logits, teacher_logits: (..., V). Computed in fp32 whatever the autocast dtype.
    """
    import torch.nn.functional as F

    V = student_logits.shape[-1]
    log_q = F.log_softmax(student_logits.float().reshape(-1, V) / temperature, dim=-1)  # (N, V) student
    log_p = F.log_softmax(teacher_logits.float().reshape(-1, V) / temperature, dim=-1)  # (N, V) teacher
    if KLKind(kind) is KLKind.forward:
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum")  # sum p (log p - log q)
    else:
        kl = F.kl_div(log_p, log_q, log_target=True, reduction="sum")  # sum q (log q - log p)
    return kl / log_q.shape[0] * temperature**2


def sparse_kl(student_logits, top_lp, top_ix, mask=None, temperature: float = 1.0):
    """T² · KL(teacher || student) with the teacher kept as its top-k log-probs plus one bucket for
    the rest of its mass (the exact KL between the two distributions coarsened to k + 1 outcomes),
    mean over the positions where `mask` is true.

    student_logits: (..., V); top_lp, top_ix: (..., K) the teacher's log-probs (at temperature 1)
    of its top-k tokens; mask: (...) bool. At T != 1 the teacher's top-k are re-softened among
    themselves (their share of the mass kept) before the comparison.
    """
    import torch
    import torch.nn.functional as F

    V, K = student_logits.shape[-1], top_lp.shape[-1]
    log_q = F.log_softmax(student_logits.float().reshape(-1, V) / temperature, dim=-1)  # (N, V) student
    ix = top_ix.reshape(-1, K)  # (N, K)
    lp = top_lp.float().reshape(-1, K)  # (N, K) teacher
    if temperature != 1.0:  # soften the top-k among themselves, keep their total mass
        mass = torch.logsumexp(lp, dim=-1, keepdim=True)  # (N, 1)
        lp = F.log_softmax(lp / temperature, dim=-1) + mass
    lq = log_q.gather(-1, ix)  # (N, K) student on the teacher's top-k
    p = lp.exp()
    rest_p = (1 - p.sum(-1)).clamp_min(1e-12)  # (N,)
    rest_lq = log_q.scatter(-1, ix, float("-inf")).logsumexp(-1).clamp_min(-1e4)  # (N,) log of the student's rest
    kl = (p * (lp - lq)).sum(-1)  # (N,)
    if K < V:  # the rest bucket (with k = V there is none: 1 - sum p is rounding error)
        kl = kl + rest_p * (rest_p.log() - rest_lq)
    if mask is not None:
        m = mask.reshape(-1).to(kl.dtype)
        return (kl * m).sum() / m.sum().clamp_min(1) * temperature**2
    return kl.mean() * temperature**2


def ce_loss(student_logits, input_ids):
    """Next-token cross-entropy on the sequence itself (positions 0..T-2 predict 1..T-1)."""
    import torch.nn.functional as F

    V = student_logits.shape[-1]
    return F.cross_entropy(student_logits[:, :-1].float().reshape(-1, V), input_ids[:, 1:].reshape(-1))


def hidden_loss(student_hidden, teacher_hidden, kept: list[int]):
    """Mean over the student's intermediate layers of (1 - cosine) to the teacher layer it came from.

    *_hidden are HF `hidden_states` tuples: [0] = embeddings, [i+1] = output of block i. The last
    block's entry is skipped (HF applies the final norm there in some families), so student block
    j < N-1 is matched to teacher block kept[j].
    """
    import torch.nn.functional as F

    pairs = [(student_hidden[j + 1], teacher_hidden[kept[j] + 1]) for j in range(len(kept) - 1)]
    if not pairs:
        return student_hidden[0].new_zeros(())
    losses = [(1 - F.cosine_similarity(s.float(), t.float(), dim=-1)).mean() for s, t in pairs]  # each (B, T) -> ()
    return sum(losses) / len(losses)


def distill_loss(cfg: LossConfig, input_ids, student_out, teacher_out=None, kept=None) -> tuple:
    """(total loss, {term: float}) for one micro-batch."""
    terms, total = {}, 0.0
    if cfg.ce_weight < 1.0:
        kd = kl_loss(student_out.logits, teacher_out.logits, cfg.temperature, cfg.kind)
        total = total + (1 - cfg.ce_weight) * kd
        terms["kd"] = kd.detach()
    if cfg.ce_weight > 0.0:
        ce = ce_loss(student_out.logits, input_ids)
        total = total + cfg.ce_weight * ce
        terms["ce"] = ce.detach()
    if cfg.hidden_weight > 0.0:
        h = hidden_loss(student_out.hidden_states, teacher_out.hidden_states, kept)
        total = total + cfg.hidden_weight * h
        terms["hidden"] = h.detach()
    return total, terms
