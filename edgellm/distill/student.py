"""The student: given as a model directory (e.g. a pruned model), or made from the teacher by
keeping a subset of its decoder layers (DistilBERT-style initialisation).

Layer choice: N layers spread evenly over the teacher's L, always keeping the first and the last
(`keep_layers(30, 15)` = 0, 2, ..., 14, 17, 19, ..., 29: every 2nd layer, shifted by one halfway
so that the last is kept; `keep_layers(4, 2)` = 0, 3). The first and last blocks are the ones
whose removal hurts most (ShortGPT, Minitron depth pruning); "every k-th layer" is exactly the
case L = k·(N-1)+1. Embeddings, final norm and lm_head are
copied as they are.
"""

from __future__ import annotations

import copy

from ..arch import family_of
from ..errors import EdgeLLMError


def keep_layers(n_teacher: int, n_student: int) -> list[int]:
    """Indices of the teacher layers the student keeps, evenly spread, first and last included."""
    if not 1 <= n_student < n_teacher:
        raise EdgeLLMError(
            f"--student-layers {n_student} must be between 1 and {n_teacher - 1}: the student must be "
            f"smaller than the teacher, which has {n_teacher} layers"
        )
    if n_student == 1:
        return [n_teacher - 1]
    return sorted({round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)})


def num_layers(config) -> int:
    return int(config.num_hidden_layers)


def student_from_teacher(teacher, n_layers: int, kept: list[int] | None = None):
    """A new model with `n_layers` of the teacher's decoder layers (weights copied, not shared):
    `kept` (default: keep_layers, evenly spread).

    Returns (student, kept) where kept[j] is the teacher layer student layer j came from.
    """
    import torch
    from transformers import AutoModelForCausalLM

    tcfg = teacher.config
    kept = keep_layers(num_layers(tcfg), n_layers) if kept is None else list(kept)
    cfg = copy.deepcopy(tcfg)
    cfg.num_hidden_layers = n_layers  # GPT-2 maps this to n_layer
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == num_layers(tcfg):
        cfg.layer_types = [layer_types[i] for i in kept]
    dtype = next(teacher.parameters()).dtype
    student = AutoModelForCausalLM.from_config(cfg, dtype=dtype)

    prefix = family_of(tcfg).layers + "."
    new_of_old = {old: new for new, old in enumerate(kept)}
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(prefix):
            idx, rest = key[len(prefix) :].split(".", 1)
            if int(idx) not in new_of_old:
                continue
            key = f"{prefix}{new_of_old[int(idx)]}.{rest}"
        state[key] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    persistent = set(student.state_dict())
    missing = [k for k in missing if k in persistent]
    if missing or unexpected:  # a bug in the key mapping, not a user error
        raise RuntimeError(
            f"student weights do not map onto the teacher's: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    with torch.no_grad():  # the copies are independent of the teacher
        for p in student.parameters():
            p.data = p.data.clone()
    student.eval()
    return student, kept


def check_pair(teacher, student, teacher_tok, student_tok=None) -> None:
    """Refuse a student that cannot be distilled from this teacher (vocabulary) or is not smaller."""
    from ..modelio import count_parameters

    tv, sv = teacher.config.vocab_size, student.config.vocab_size
    if tv != sv:
        raise EdgeLLMError(
            f"the student's vocabulary ({sv} tokens) does not match the teacher's ({tv}); "
            "distillation compares next-token distributions, so both must use the same tokenizer"
        )
    if student_tok is not None and student_tok.get_vocab() != teacher_tok.get_vocab():
        raise EdgeLLMError(
            "the student's tokenizer differs from the teacher's (same size, different tokens); "
            "distillation needs both models to use the same tokenizer"
        )
    nt, ns = count_parameters(teacher), count_parameters(student)
    if ns > nt:
        raise EdgeLLMError(
            f"the student ({ns:,} parameters) is larger than the teacher ({nt:,}); "
            "give a smaller student (e.g. --student-layers N)"
        )
