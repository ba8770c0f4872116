"""`edgellm distill`: train a smaller student on the teacher's logits (resumable, multi-process)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import CtxOpt, DataOpt, EvalTokensOpt, ForceOpt, ModelArg, OutOpt


class Loss(str, Enum):
    forward = "forward"
    reverse = "reverse"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


def distill(
    teacher: ModelArg,
    output: OutOpt,
    student: Annotated[
        Optional[str],
        typer.Option(
            "--student", help="Student model directory (e.g. a pruned model). Default: made from the teacher's layers."
        ),
    ] = None,
    student_layers: Annotated[
        Optional[int],
        typer.Option(
            "--student-layers",
            help="Make the student from N of the teacher's layers, evenly spread, first and last kept (default: half).",
            min=1,
        ),
    ] = None,
    loss: Annotated[
        Loss,
        typer.Option(
            "--loss", help="forward: KL(teacher||student) (Minitron's default); reverse: KL(student||teacher)."
        ),
    ] = Loss.forward,
    temperature: Annotated[
        float, typer.Option("--temperature", help="Softmax temperature for the KL term (scaled by T²).")
    ] = 1.0,
    ce_weight: Annotated[
        float,
        typer.Option("--ce-weight", help="Mix in next-token cross-entropy: (1-w)·KL + w·CE; 1 = plain LM training."),
    ] = 0.0,
    hidden_weight: Annotated[
        float,
        typer.Option(
            "--hidden-weight",
            help="Add w·(1-cos) between kept layers' hidden states and the teacher's (needs --student-layers).",
        ),
    ] = 0.0,
    data: DataOpt = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per packed training sequence.", min=8)] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per micro-step per process.", min=1)] = 8,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-steps per optimizer step.", min=1)] = 1,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.", min=1)] = 200,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW).")] = 3e-4,
    warmup_steps: Annotated[
        int, typer.Option("--warmup-steps", help="Linear warm-up steps before the cosine decay (-1: 5% of --steps).")
    ] = -1,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay on matrices.")] = 0.01,
    clip: Annotated[float, typer.Option("--clip", help="Max gradient norm (0: no clipping).", min=0.0)] = 1.0,
    precision: Annotated[
        Precision, typer.Option("--precision", help="auto: bf16 autocast where the GPU supports it, else fp32.")
    ] = Precision.auto,
    device: Annotated[Device, typer.Option("--device", help="cpu or cuda.")] = Device.cpu,
    fsdp: Annotated[
        bool, typer.Option("--fsdp", help="Shard the student with FSDP under torchrun (instead of DDP).")
    ] = False,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", help="Checkpoint every N steps (0: never).", min=0)
    ] = 50,
    checkpoint_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--checkpoint-dir",
            help="Checkpoint folder (default: OUTPUT.checkpoints beside the output; removed on success).",
        ),
    ] = None,
    resume: Annotated[
        Optional[Path], typer.Option("--resume", help="Continue the run whose checkpoint folder this is.")
    ] = None,
    evaluate: Annotated[
        bool, typer.Option("--eval/--no-eval", help="Measure teacher / initial / distilled student perplexity.")
    ] = True,
    eval_tokens: EvalTokensOpt = 4096,
    ctx: CtxOpt = 512,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the data order (and anything random).")] = 0,
    force: ForceOpt = False,
):
    """Distil a teacher into a smaller student trained on the teacher's logits.

    Resumable (--resume CHECKPOINT_DIR continues exactly), multi-process with torchrun (DDP, or
    --fsdp). Writes a Hugging Face model directory with edgellm.json (teacher, data, steps,
    perplexities) and distill_log.jsonl (the loss curve).

    Example: edgellm distill smollm2/ --student-layers 15 --steps 500 -o smollm2-15l/
    """
    from ..distill.distributed import setup, teardown
    from ..errors import EdgeLLMError

    _check_options(
        temperature, ce_weight, hidden_weight, lr, weight_decay, clip, warmup_steps, steps, seed, resume, checkpoint_dir
    )
    if device is Device.cuda:
        import torch

        if not torch.cuda.is_available():
            raise EdgeLLMError("--device cuda: no CUDA device is available; use --device cpu")
    d = setup(device.value)
    ok = False
    try:
        _run(
            d,
            **{k: v for k, v in locals().items() if k not in ("d", "ok", "setup", "teardown", "EdgeLLMError", "torch")},
        )
        ok = True
    finally:
        teardown(d, ok)  # a failed rank must not wait at a barrier for ranks that may never come


def _check_options(
    temperature, ce_weight, hidden_weight, lr, weight_decay, clip, warmup_steps, steps, seed, resume, checkpoint_dir
):
    """Every numeric option's range, before anything is loaded."""
    from ..errors import EdgeLLMError
    from .common import check_range

    for name, value, lo, lo_open in (
        ("--temperature", temperature, 0.0, True),
        ("--hidden-weight", hidden_weight, 0.0, False),
        ("--lr", lr, 0.0, True),
        ("--weight-decay", weight_decay, 0.0, False),
        ("--clip", clip, 0.0, False),
        ("--warmup-steps", warmup_steps, -1, False),
        ("--seed", seed, 0, False),
    ):
        check_range(name, value, lo, lo_open=lo_open)
    check_range("--ce-weight", ce_weight, 0.0, 1.0)
    for name, path in (("--resume", resume), ("--checkpoint-dir", checkpoint_dir)):
        if path is not None and path.exists() and not path.is_dir():
            raise EdgeLLMError(f"{name} '{path}' is a file, not a folder")


def _run(
    d,
    *,
    teacher,
    output,
    student,
    student_layers,
    loss,
    temperature,
    ce_weight,
    hidden_weight,
    data,
    seq_len,
    batch_size,
    grad_accum,
    steps,
    lr,
    warmup_steps,
    weight_decay,
    clip,
    precision,
    device,
    fsdp,
    checkpoint_every,
    checkpoint_dir,
    resume,
    evaluate,
    eval_tokens,
    ctx,
    seed,
    force,
):
    import json
    import shutil
    import time

    from ..console import PROGRESS, console, show_warnings
    from ..data import BUILTIN, split_tokens
    from ..distill.checkpoint import CheckpointDir, model_identity
    from ..distill.data import PackedData
    from ..distill.losses import LossConfig
    from ..distill.student import check_pair, num_layers, student_from_teacher
    from ..distill.train import TrainConfig, train
    from ..errors import EdgeLLMError
    from ..evaluate import evaluate as measure
    from ..modelio import count_parameters, save_model
    from ..outputs import atomic_output_dir, check_output_dir
    from ..progress import NULL
    from ..record import add_step
    from .common import check_context, data_tokens, dir_size, human_bytes, load

    if student is not None and student_layers is not None:
        raise EdgeLLMError("give either --student or --student-layers, not both")
    if hidden_weight > 0 and student is not None:
        raise EdgeLLMError("--hidden-weight needs the layer map of --student-layers; it cannot be used with --student")
    loss_cfg = LossConfig(kind=loss.value, temperature=temperature, ce_weight=ce_weight, hidden_weight=hidden_weight)
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        seq_len=seq_len,
        lr=lr,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        clip=clip,
        seed=seed,
        precision=precision.value,
        checkpoint_every=checkpoint_every,
    )
    inputs = [teacher, student, data, resume, checkpoint_dir]
    check_output_dir(output, force, inputs)
    ckpt = CheckpointDir(resume or checkpoint_dir or output.with_name(output.name + ".checkpoints"))
    progress = _TrainBar(console, PROGRESS) if d.main else NULL

    with show_warnings():
        t_loaded = load(teacher, "loading teacher")
        if t_loaded.record.get("quantization"):
            raise EdgeLLMError(f"teacher '{teacher}' is quantized; distil from the unquantized model")
        tok = t_loaded.tokenizer
        check_context(t_loaded.model, "--seq-len", seq_len)
        check_context(t_loaded.model, "--ctx", ctx)
        if student is not None:
            s_loaded = load(student, "loading student")
            student_model, kept, student_desc = s_loaded.model, None, {"model": model_identity(student)}
            check_pair(t_loaded.model, student_model, tok, s_loaded.tokenizer)
        else:
            n = student_layers if student_layers is not None else max(1, num_layers(t_loaded.model.config) // 2)
            student_model, kept = student_from_teacher(t_loaded.model, n)
            student_desc = {"from_teacher_layers": kept}
            check_pair(t_loaded.model, student_model, tok)

        ids = data_tokens(tok, data)
        train_ids, eval_ids = split_tokens(ids, "calib"), split_tokens(ids, "eval")
        packed = PackedData(train_ids, seq_len, seed)
        fields = {
            "teacher": model_identity(teacher),
            "student": student_desc,
            "data": {"spec": data or BUILTIN, "tokens": int(len(train_ids)), "sha": packed.fingerprint()},
            "train": {k: v for k, v in cfg.to_dict().items() if k != "checkpoint_every"},
            "loss": loss_cfg.to_dict(),
            "world": d.world,
            "fsdp": bool(fsdp and d.active),
            "device": device.value,
        }
        if cfg.checkpoint_every or resume is not None:
            ckpt.check(fields, resume=resume is not None, force=force)
            d.barrier()
            if resume is None and d.main:
                ckpt.claim(fields)
            d.barrier()
            saved = ckpt.load() if resume is not None else None
            if resume is not None and d.main:
                ckpt.truncate_log(saved["step"] if saved else 0)
        else:
            ckpt, saved = None, None

        quality = {}
        if evaluate and d.main:
            quality["teacher"] = measure(
                t_loaded.model, eval_ids, ctx=ctx, stride=ctx, max_tokens=eval_tokens, progress=PROGRESS
            ).to_dict()
            quality["initial_student"] = measure(
                student_model,
                eval_ids,
                reference=t_loaded.model,
                ctx=ctx,
                stride=ctx,
                max_tokens=eval_tokens,
                progress=PROGRESS,
            ).to_dict()
        d.barrier()
        t0 = time.perf_counter()
        trained, summary = train(
            student_model,
            t_loaded.model if loss_cfg.needs_teacher else None,
            packed,
            cfg,
            loss_cfg,
            device=device.value,
            kept=kept,
            ckpt=ckpt,
            resume=saved,
            d=d,
            fsdp=fsdp,
            progress=progress,
        )
        seconds = time.perf_counter() - t0
        curve = summary.pop("curve")
        if d.main:
            trained.to("cpu")
            t_loaded.model.to("cpu")
            if evaluate:
                quality["student"] = measure(
                    trained,
                    eval_ids,
                    reference=t_loaded.model,
                    ctx=ctx,
                    stride=ctx,
                    max_tokens=eval_tokens,
                    progress=PROGRESS,
                ).to_dict()
            n_t, n_s = count_parameters(t_loaded.model), count_parameters(trained)
            record = add_step(
                t_loaded.record,
                "distill",
                teacher=str(teacher),
                student=student_desc,
                params={
                    **cfg.to_dict(),
                    "loss": loss_cfg.to_dict(),
                    "world": d.world,
                    "fsdp": bool(fsdp and d.active),
                    "device": device.value,
                },
                data={
                    "spec": data or BUILTIN,
                    "train_tokens": int(len(train_ids)),
                    "eval_tokens": int(len(eval_ids)),
                    "seq_len": seq_len,
                    "seed": seed,
                },
                steps=steps,
                training={**summary, "this_run_s": round(seconds, 2)},
                parameters={"teacher": n_t, "student": n_s},
                quality=quality or None,
            )
            with atomic_output_dir(output, force, inputs) as tmp:
                save_model(trained, tok, tmp, record)
                if ckpt is not None:  # the whole curve, including the steps before a resume
                    shutil.copyfile(ckpt.log_path, tmp / "distill_log.jsonl")
                else:
                    (tmp / "distill_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
            if ckpt is not None:
                shutil.rmtree(ckpt.path, ignore_errors=True)
        d.barrier()

    if not d.main:
        return
    console.print(
        f"wrote {output} ({human_bytes(dir_size(output))}; student {n_s:,} parameters, teacher {n_t:,}) "
        f"after {steps} steps ({summary['tokens']:,} tokens) in {seconds:.1f} s"
    )
    if evaluate:
        console.print(
            f"perplexity on {quality['student']['tokens']} held-out tokens: teacher "
            f"{quality['teacher']['perplexity']:.3f}, initial student {quality['initial_student']['perplexity']:.3f}, "
            f"distilled student {quality['student']['perplexity']:.3f}; KL to the teacher "
            f"{quality['initial_student']['kl']:.4f} -> {quality['student']['kl']:.4f} nats/token, top-1 agreement "
            f"{quality['initial_student']['top1']:.1%} -> {quality['student']['top1']:.1%}"
        )


class _TrainBar:
    """A progress bar for the training loop with loss, tokens/s and ETA (other phases: the usual bar).

    When stderr is not a terminal (a background job), prints a line about every 5% instead.
    """

    def __init__(self, console, fallback):
        self.console, self.fallback = console, fallback
        self.bar = self.task = None
        self.total = self.done = 0

    def track(self, iterable, description: str = "", total: int | None = None):
        if description != "distilling":
            yield from self.fallback.track(iterable, description, total)
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.total, self.done = total or 0, 0
        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, console=self.console, disable=not self.console.is_terminal) as bar:
            self.bar, self.task = bar, bar.add_task(description, total=total, loss="-", tps="-")
            for item in iterable:
                yield item
                self.done += 1
                bar.advance(self.task)

    def update(self, loss: float, tokens_per_s: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, loss=f"{loss:.4f}", tps=f"{tokens_per_s:,.0f}")
        if not self.console.is_terminal and self.total and (self.done + 1) % max(1, self.total // 20) == 0:
            self.console.print(
                f"step {self.done + 1}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s",
                highlight=False,
            )
