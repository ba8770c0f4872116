"""Distil a teacher into a smaller student trained on the teacher's logits (resumable, multi-process).

Under torchrun every process calls `run_distill`; the main one measures, writes the output and
returns the figures, the others return a result with `main=False`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from ..errors import EdgeLLMError
from .common import check_context, check_range, data_tokens, load_spec
from .options import option


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


@dataclass
class DistillOptions:
    student: str | None = option(None, "--student")  # None: made from the teacher's layers
    student_layers: int | None = option(None, "--student-layers", min=1)  # None: half the teacher's
    loss: Loss = option(Loss.forward, "--loss")  # KL(teacher||student), Minitron's default
    temperature: float = option(1.0, "--temperature")
    ce_weight: float = option(0.0, "--ce-weight")  # (1-w)·KL + w·CE
    hidden_weight: float = option(0.0, "--hidden-weight")  # w·(1-cos) of kept layers' hidden states
    data: str | None = option(None, "--data")  # None: the built-in corpus
    seq_len: int = option(256, "--seq-len", min=8)
    batch_size: int = option(8, "--batch-size", min=1)  # per micro-step per process
    grad_accum: int = option(1, "--grad-accum", min=1)
    steps: int = option(200, "--steps", min=1)
    lr: float = option(3e-4, "--lr")  # AdamW peak
    warmup_steps: int = option(-1, "--warmup-steps")  # -1: 5% of steps
    weight_decay: float = option(0.01, "--weight-decay")
    clip: float = option(1.0, "--clip", min=0.0)  # max gradient norm; 0: none
    precision: Precision = option(Precision.auto, "--precision")  # auto: bf16 where the GPU supports it
    device: Device = option(Device.cpu, "--device")
    fsdp: bool = option(False, "--fsdp")  # under torchrun: FSDP instead of DDP
    checkpoint_every: int = option(50, "--checkpoint-every", min=0)  # 0: never
    checkpoint_dir: Path | None = option(None, "--checkpoint-dir")  # None: OUTPUT.checkpoints
    resume: Path | None = option(None, "--resume")  # the checkpoint folder of the run to continue
    evaluate: bool = option(True, "--eval")  # teacher / initial / distilled student perplexity
    eval_tokens: int = option(4096, "--eval-tokens", min=64)
    ctx: int = option(512, "--ctx", min=8)
    seed: int = option(0, "--seed")
    max_memory: str | None = option(None, "--max-memory")  # e.g. 6GB; None: a safe fraction of available RAM


@dataclass
class DistillResult:
    output: Path
    main: bool  # False on the other processes of a torchrun job (nothing below is filled in)
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0  # this run's training (after a resume: since the resume)
    parameters: dict = field(default_factory=dict)  # teacher, student
    quality: dict = field(default_factory=dict)  # teacher, initial_student, student (Quality.to_dict())


def check_training_ranges(o) -> None:
    """The ranges of the training options a student and a draft share (`o`: their options)."""
    for name, value, lo, lo_open in (
        ("--temperature", o.temperature, 0.0, True),
        ("--lr", o.lr, 0.0, True),
        ("--weight-decay", o.weight_decay, 0.0, False),
        ("--clip", o.clip, 0.0, False),
        ("--warmup-steps", o.warmup_steps, -1, False),
        ("--seed", o.seed, 0, False),
    ):
        check_range(name, value, lo, lo_open=lo_open)


def check_options(o: DistillOptions) -> None:
    """Every numeric option's range and the option combinations, before anything is loaded."""
    check_training_ranges(o)
    check_range("--hidden-weight", o.hidden_weight, 0.0)
    check_range("--ce-weight", o.ce_weight, 0.0, 1.0)
    for name, path in (("--resume", o.resume), ("--checkpoint-dir", o.checkpoint_dir)):
        if path is not None and Path(path).exists() and not Path(path).is_dir():
            raise EdgeLLMError(f"{name} '{path}' is a file, not a folder")
    if Device(o.device) is Device.cuda:
        import torch

        if not torch.cuda.is_available():
            raise EdgeLLMError("--device cuda: no CUDA device is available; use --device cpu")


def run_distill(
    teacher: str, output: Path, options: DistillOptions, progress=None, train_progress=None, force: bool = False
) -> DistillResult:
    """Distil `teacher` into the model directory `output`; `train_progress` shows the training loop."""
    from ..distill.distributed import setup, teardown

    check_options(options)
    _check_fits(teacher, options)
    d = setup(Device(options.device).value)
    ok = False
    try:
        result = _distill(d, teacher, Path(output), options, progress, train_progress, force)
        ok = True
        return result
    finally:
        teardown(d, ok)  # a failed rank must not wait at a barrier for ranks that may never come


def _configs(o: DistillOptions):
    """(LossConfig, TrainConfig) of the options."""
    from ..distill.losses import LossConfig
    from ..distill.train import TrainConfig

    if o.student is not None and o.student_layers is not None:
        raise EdgeLLMError("give either --student or --student-layers, not both")
    if o.hidden_weight > 0 and o.student is not None:
        raise EdgeLLMError("--hidden-weight needs the layer map of --student-layers; it cannot be used with --student")
    loss = LossConfig(
        kind=Loss(o.loss).value, temperature=o.temperature, ce_weight=o.ce_weight, hidden_weight=o.hidden_weight
    )
    train = TrainConfig(
        steps=o.steps,
        batch_size=o.batch_size,
        grad_accum=o.grad_accum,
        seq_len=o.seq_len,
        lr=o.lr,
        warmup_steps=o.warmup_steps,
        weight_decay=o.weight_decay,
        clip=o.clip,
        seed=o.seed,
        precision=Precision(o.precision).value,
        checkpoint_every=o.checkpoint_every,
    )
    return loss, train


@dataclass
class _Pair:
    """The loaded teacher and the student to train (and where the student came from)."""

    teacher: object  # modelio.Loaded
    student: object  # the student torch module
    kept: list | None  # the teacher's layers the student keeps (made from the teacher), else None
    desc: dict  # the student, as recorded in edgellm.json


def _load_pair(teacher: str, o: DistillOptions, progress) -> _Pair:
    from ..distill.checkpoint import model_identity
    from ..distill.student import check_pair, num_layers, student_from_teacher

    t_loaded = load_spec(teacher, "loading teacher", progress=progress)
    if t_loaded.record.get("quantization"):
        raise EdgeLLMError(f"teacher '{teacher}' is quantized; distil from the unquantized model")
    tok = t_loaded.tokenizer
    check_context(t_loaded.model, "--seq-len", o.seq_len)
    check_context(t_loaded.model, "--ctx", o.ctx)
    if o.student is not None:
        s_loaded = load_spec(o.student, "loading student", progress=progress)
        check_pair(t_loaded.model, s_loaded.model, tok, s_loaded.tokenizer)
        return _Pair(t_loaded, s_loaded.model, None, {"model": model_identity(o.student)})
    n = o.student_layers if o.student_layers is not None else max(1, num_layers(t_loaded.model.config) // 2)
    student, kept = student_from_teacher(t_loaded.model, n)
    check_pair(t_loaded.model, student, tok)
    return _Pair(t_loaded, student, kept, {"from_teacher_layers": kept})


def _run_params(d, o: DistillOptions) -> dict:
    return {"world": d.world, "fsdp": bool(o.fsdp and d.active), "device": Device(o.device).value}


def _checkpoints(d, o: DistillOptions, output: Path, fields: dict, force: bool):
    """(CheckpointDir, the saved state to resume from) or (None, None) without checkpoints."""
    from ..distill.checkpoint import CheckpointDir

    if not (o.checkpoint_every or o.resume is not None):
        return None, None
    ckpt = CheckpointDir(o.resume or o.checkpoint_dir or output.with_name(output.name + ".checkpoints"))
    ckpt.check(fields, resume=o.resume is not None, force=force)
    d.barrier()
    if o.resume is None and d.main:
        ckpt.claim(fields)
    d.barrier()
    saved = ckpt.load() if o.resume is not None else None
    if o.resume is not None and d.main:
        ckpt.truncate_log(saved["step"] if saved else 0)
    return ckpt, saved


def _measure(model, eval_ids, o: DistillOptions, progress, reference=None) -> dict:
    from ..evaluate import evaluate as measure

    return measure(
        model, eval_ids, reference=reference, ctx=o.ctx, stride=o.ctx, max_tokens=o.eval_tokens, progress=progress
    ).to_dict()


def _distill(d, teacher: str, output: Path, o: DistillOptions, progress, train_progress, force) -> DistillResult:
    import time

    from ..data import BUILTIN, split_tokens
    from ..distill.checkpoint import model_identity
    from ..distill.data import PackedData
    from ..distill.train import train
    from ..outputs import check_output_dir
    from ..progress import NULL

    progress = progress or NULL
    loss_cfg, cfg = _configs(o)
    inputs = [teacher, o.student, o.data, o.resume, o.checkpoint_dir]
    check_output_dir(output, force, inputs)
    pair = _load_pair(teacher, o, progress)
    ids = data_tokens(pair.teacher.tokenizer, o.data)
    train_ids, eval_ids = split_tokens(ids, "calib"), split_tokens(ids, "eval")
    packed = PackedData(train_ids, o.seq_len, o.seed)
    fields = {
        "teacher": model_identity(teacher),
        "student": pair.desc,
        "data": {"spec": o.data or BUILTIN, "tokens": int(len(train_ids)), "sha": packed.fingerprint()},
        "train": {k: v for k, v in cfg.to_dict().items() if k != "checkpoint_every"},
        "loss": loss_cfg.to_dict(),
        **_run_params(d, o),
    }
    ckpt, saved = _checkpoints(d, o, output, fields, force)
    quality = {}
    if o.evaluate and d.main:
        quality["teacher"] = _measure(pair.teacher.model, eval_ids, o, progress)
        quality["initial_student"] = _measure(pair.student, eval_ids, o, progress, pair.teacher.model)
    d.barrier()
    t0 = time.perf_counter()
    trained, summary = train(
        pair.student,
        pair.teacher.model if loss_cfg.needs_teacher else None,
        packed,
        cfg,
        loss_cfg,
        device=Device(o.device).value,
        kept=pair.kept,
        ckpt=ckpt,
        resume=saved,
        d=d,
        fsdp=o.fsdp,
        progress=(train_progress or NULL) if d.main else NULL,
    )
    seconds = time.perf_counter() - t0
    result = DistillResult(output, d.main, o.steps, summary["tokens"], seconds, quality=quality)
    if d.main:
        trained.to("cpu")
        pair.teacher.model.to("cpu")
        if o.evaluate:
            quality["student"] = _measure(trained, eval_ids, o, progress, pair.teacher.model)
        run = _Run(pair, trained, summary, train_ids, eval_ids, {**cfg.to_dict(), "loss": loss_cfg.to_dict()})
        result.parameters = _save(d, teacher, output, o, run, result, ckpt, inputs, force)
    d.barrier()
    return result


@dataclass
class _Run:
    """What one training run made, for the output's edgellm.json."""

    pair: _Pair
    trained: object
    summary: dict  # train()'s summary (its "curve" included)
    train_ids: object
    eval_ids: object
    params: dict  # TrainConfig and LossConfig as recorded


def _save(d, teacher: str, output: Path, o, run: _Run, result: DistillResult, ckpt, inputs, force) -> dict:
    """Write the student with its edgellm.json and loss curve; returns the parameter counts."""
    import json
    import shutil

    from ..data import BUILTIN
    from ..modelio import count_parameters, save_model
    from ..outputs import atomic_output_dir
    from ..record import add_step

    curve = run.summary.pop("curve")
    counts = {"teacher": count_parameters(run.pair.teacher.model), "student": count_parameters(run.trained)}
    record = add_step(
        run.pair.teacher.record,
        "distill",
        teacher=str(teacher),
        student=run.pair.desc,
        params={**run.params, **_run_params(d, o)},
        data={
            "spec": o.data or BUILTIN,
            "train_tokens": int(len(run.train_ids)),
            "eval_tokens": int(len(run.eval_ids)),
            "seq_len": o.seq_len,
            "seed": o.seed,
        },
        steps=o.steps,
        training={**run.summary, "this_run_s": round(result.seconds, 2)},
        parameters=counts,
        quality=result.quality or None,
    )
    with atomic_output_dir(output, force, inputs) as tmp:
        save_model(run.trained, run.pair.teacher.tokenizer, tmp, record)
        if ckpt is not None:  # the whole curve, including the steps before a resume
            shutil.copyfile(ckpt.log_path, tmp / "distill_log.jsonl")
        else:
            (tmp / "distill_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
    if ckpt is not None:
        shutil.rmtree(ckpt.path, ignore_errors=True)
    return counts


def _check_fits(teacher: str, o: DistillOptions) -> None:
    """Distillation is not streamed: on the CPU it holds the teacher in fp32 and a student with its
    gradients and Adam moments (4 copies); refused before loading when that cannot fit."""
    import math

    from ..checkpoint import Checkpoint
    from ..memory import budget, human, rss
    from ..modelio import resolve_spec

    limit, how = budget(o.max_memory)
    path = Path(resolve_spec(teacher))
    if Device(o.device) != Device.cpu or not path.is_dir():
        return
    params = sum(math.prod(s) for _, _, s in Checkpoint(path).entries.values())
    need = rss() + 4 * params + 4 * 4 * params // 2  # the student: about half the teacher by default
    if need > limit:
        raise EdgeLLMError(
            f"distilling loads the teacher and trains a student in memory (not streamed), about {human(need)}, over "
            f"the budget of {human(limit)} ({how}); raise --max-memory or distil a smaller teacher"
        )
