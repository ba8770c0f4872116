"""The distillation training loop: AdamW, linear warm-up + cosine decay, gradient accumulation,
gradient clipping, bf16 autocast where the device supports it, seeded, resumable, DDP/FSDP.

One optimizer step = `grad_accum` micro-steps of `batch_size` sequences on each of the W ranks,
so the effective batch is batch_size · grad_accum · W sequences of seq_len tokens. The schedule,
the data order and the checkpoint are all functions of the step number, which is what makes a
resumed run retrace an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass

from ..errors import EdgeLLMError
from ..progress import NULL
from .distributed import Dist, unwrap, wrap
from .losses import LossConfig, distill_loss


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 8  # sequences per micro-step per rank
    grad_accum: int = 1  # micro-steps per optimizer step
    seq_len: int = 256
    lr: float = 3e-4  # peak; a student initialised from the teacher needs no large LR (Minitron: 1e-4..3e-4)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = -1  # -1: 5% of the steps (at least 1)
    weight_decay: float = 0.01  # on matrices only, never on norms / biases
    clip: float = 1.0  # max global gradient norm; 0 disables
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast on CUDA devices that support it, else fp32
    checkpoint_every: int = 50  # steps; 0 disables checkpoints

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "seq_len"):
            if getattr(self, name) < 1:
                raise EdgeLLMError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.lr <= 0:
            raise EdgeLLMError(f"--lr {self.lr} must be > 0")
        if self.warmup_steps < 0:
            self.warmup_steps = max(1, self.steps // 20)
        if self.precision not in ("auto", "fp32", "bf16"):
            raise EdgeLLMError(f"--precision {self.precision!r} must be auto, fp32 or bf16")

    def to_dict(self) -> dict:
        return asdict(self)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for 0-based optimizer step `step`: linear warm-up, then cosine to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def resolve_precision(precision: str, device: str) -> str:
    import torch

    if precision == "auto":
        return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise EdgeLLMError("--precision bf16: this GPU does not support bfloat16; use --precision fp32")
    return precision


def _optimizer(model, cfg: TrainConfig):
    import torch

    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def _rng_state(d: Dist, device: str) -> dict:
    import torch

    states = {f"cpu.rank{r}": s for r, s in enumerate(d.gather_bytes(torch.get_rng_state()))}
    if device == "cuda":
        cuda = torch.cuda.get_rng_state().to("cuda")
        states.update({f"cuda.rank{r}": s.cpu() for r, s in enumerate(d.gather_bytes(cuda))})
    return states


def _set_rng_state(rng: dict, d: Dist, device: str) -> None:
    import torch

    key = f"cpu.rank{d.rank}"
    if key not in rng:
        raise EdgeLLMError("the checkpoint was written by a run with a different number of processes")
    torch.set_rng_state(rng[key])
    if device == "cuda" and f"cuda.rank{d.rank}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda.rank{d.rank}"])


def _full_state(model, opt):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, [opt], options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _restore(model, opt, saved: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model,
        [opt],
        model_state_dict=saved["model"],
        optim_state_dict=saved["optimizer"],
        options=StateDictOptions(full_state_dict=True),
    )


def train(
    student,
    teacher,
    data,
    cfg: TrainConfig,
    loss_cfg: LossConfig,
    *,
    device: str = "cpu",
    kept=None,
    ckpt=None,
    resume: dict | None = None,
    d: Dist | None = None,
    fsdp: bool = False,
    progress=NULL,
) -> dict:
    """Distil `teacher` into `student`. Returns (trained student as a plain module, summary).

    `ckpt` is a CheckpointDir (rank 0 writes it), `resume` what `ckpt.load()` returned. Progress
    objects with an `update(**metrics)` method get loss / tokens/s after every step.
    """
    import torch

    d = d or Dist()
    precision = resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed + d.rank)
    student.to(device).train()
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
    model = wrap(student, d, device, fsdp)
    opt = _optimizer(model, cfg)
    start, prev_time = 0, 0.0
    if resume is not None:
        _restore(model, opt, resume)
        _set_rng_state(resume["rng"], d, device)
        start, prev_time = resume["step"], float(resume["state"].get("train_time_s", 0.0))

    autocast = lambda: torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")  # noqa: E731
    need_hidden = loss_cfg.hidden_weight > 0
    tokens_per_step = cfg.batch_size * cfg.grad_accum * d.world * cfg.seq_len
    update = getattr(progress, "update", None)
    t_start, row, curve = time.perf_counter(), {}, []

    for step in progress.track(range(start, cfg.steps), "distilling", total=cfg.steps - start):  # the hot loop
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum, term_sums = 0.0, {}
        for micro in range(cfg.grad_accum):
            x = data.batch(
                step, micro, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, rank=d.rank, world=d.world
            ).to(device)  # (B, T)
            last = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                t_out = None
                if loss_cfg.needs_teacher:
                    with torch.no_grad(), autocast():
                        t_out = teacher(input_ids=x, use_cache=False, output_hidden_states=need_hidden)
                with autocast():
                    s_out = model(input_ids=x, use_cache=False, output_hidden_states=need_hidden)
                loss, terms = distill_loss(loss_cfg, x, s_out, t_out, kept)
                (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach()) / cfg.grad_accum
            for k, v in terms.items():
                term_sums[k] = term_sums.get(k, 0.0) + float(v) / cfg.grad_accum
        if cfg.clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        else:
            gnorm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
        opt.step()
        opt.zero_grad(set_to_none=True)

        dt = time.perf_counter() - t0
        row = {
            "step": step + 1,
            "loss": d.mean(loss_sum, device),
            **{k: d.mean(v, device) for k, v in term_sums.items()},
            "lr": lr,
            "grad_norm": gnorm,
            "tokens": (step + 1) * tokens_per_step,
            "step_s": round(dt, 4),
            "tokens_per_s": round(tokens_per_step / dt, 1),
        }
        if not math.isfinite(row["loss"]):
            raise EdgeLLMError(f"the loss became {row['loss']} at step {step + 1}; lower --lr or use --precision fp32")
        curve.append(row)
        if d.main and ckpt is not None:
            ckpt.append_log(row)
        if update is not None:
            update(loss=row["loss"], tokens_per_s=row["tokens_per_s"], lr=lr)
        done = step + 1
        if ckpt is not None and cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            _checkpoint(ckpt, model, opt, d, device, done, prev_time + time.perf_counter() - t_start)

    student = _plain_student(model, student, fsdp and d.active)
    if student is not None:
        student.eval()
    return student, {
        "steps": cfg.steps,
        "resumed_from": start,
        "tokens": cfg.steps * tokens_per_step,
        "precision": precision,
        "train_time_s": round(prev_time + time.perf_counter() - t_start, 2),
        "final_loss": row.get("loss"),
        "curve": curve,
    }


def _plain_student(model, student, sharded: bool):
    """The trained student as an ordinary module (FSDP shards gathered into a fresh copy)."""
    if not sharded:
        return unwrap(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not full:  # cpu_offload gathers onto rank 0 only; other ranks have nothing to return
        return None
    plain = AutoModelForCausalLM.from_config(student.config, dtype=next(iter(full.values())).dtype)
    missing, unexpected = plain.load_state_dict(full, strict=False)
    if unexpected or [k for k in missing if k in plain.state_dict() and k not in ("lm_head.weight",)]:
        raise RuntimeError(
            f"FSDP state does not map onto the student: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    return plain


def _checkpoint(ckpt, model, opt, d: Dist, device: str, step: int, train_time: float) -> None:
    """All ranks take part (FSDP gathers shards); rank 0 writes; a write failure stops every rank."""
    import torch

    model_state, optim_state = _full_state(model, opt)
    rng = _rng_state(d, device)
    error = None
    if d.main:
        try:
            ckpt.save(step, model_state, optim_state, rng, {"train_time_s": round(train_time, 3), "world": d.world})
        except EdgeLLMError as exc:
            error = exc
    if d.active:
        import torch.distributed as dist

        flag = torch.tensor([0 if error is None else 1], device=device)
        dist.broadcast(flag, 0)
        if flag.item() and error is None:
            raise EdgeLLMError("rank 0 could not write the checkpoint; see its error")
    if error is not None:
        raise error
