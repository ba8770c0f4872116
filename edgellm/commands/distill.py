"""`edgellm distill`: train a smaller student on the teacher's logits (resumable, multi-process)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..distill.draft import DraftInit, PromptStyle
from ..pipeline.distill import Device, DistillOptions, DistillResult, Loss, Precision
from .common import CtxOpt, DataOpt, EvalTokensOpt, ForceOpt, dir_size, human_bytes
from .draft import draft_mode


def distill(
    context: typer.Context,
    teacher: Annotated[
        Optional[str],
        typer.Argument(
            help="Teacher model: a Hugging Face directory, a hub id (online), a .gguf file, or builtin:smollm2 "
            "(omit it with --draft-for).",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output", "--out", "-o", help="Output directory (written whole at the end).", show_default=False
        ),
    ] = None,
    draft_for: Annotated[
        Optional[str],
        typer.Option(
            "--draft-for",
            help="Train a draft for speculative decoding (run --draft) for this TARGET model instead: a few of its "
            "layers, its tokenizer/embeddings/head, trained on its own greedy continuations. Draft defaults: "
            "--steps 300 --batch-size 16 --lr 1e-3.",
            show_default=False,
        ),
    ] = None,
    draft_layers: Annotated[
        int, typer.Option("--draft-layers", help="[--draft-for] Decoder layers of the draft.", min=1)
    ] = 2,
    draft_init: Annotated[
        DraftInit,
        typer.Option(
            "--draft-init",
            help="[--draft-for] Start the draft's layers from the target's first N (measured best), its layers "
            "evenly spread (first and last kept), or random.",
        ),
    ] = DraftInit.first,
    prompts: Annotated[
        int, typer.Option("--prompts", help="[--draft-for] Prompts the target continues (1/8 held out).", min=2)
    ] = 512,
    prompt_style: Annotated[
        PromptStyle,
        typer.Option(
            "--prompt-style",
            help="[--draft-for] What the target answers: 'tasks' puts each window of data in a request (summarize, "
            "rewrite, answer from it, continue, ...), as a chat model is used; 'continue' gives the bare window; "
            "'auto': tasks when the target has a chat template.",
        ),
    ] = PromptStyle.auto,
    prompt_tokens: Annotated[
        int,
        typer.Option(
            "--prompt-tokens",
            help="[--draft-for] Data tokens per prompt (in the chat template if it has one; with --prompt-style "
            "tasks, plus the request, and windows lengthened so every prompt has the same length).",
            min=1,
        ),
    ] = 32,
    gen_tokens: Annotated[
        int, typer.Option("--gen-tokens", help="[--draft-for] Greedy tokens the target writes per prompt.", min=1)
    ] = 64,
    kl_top_k: Annotated[
        int,
        typer.Option(
            "--kl-top-k", help="[--draft-for] Target log-probs kept per position (the rest: one bucket).", min=1
        ),
    ] = 64,
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
    max_memory: Annotated[
        Optional[str],
        typer.Option(
            "--max-memory",
            help="Memory budget on the CPU, e.g. 6GB (default: 75% of the available RAM); checked before loading.",
        ),
    ] = None,
    force: ForceOpt = False,
):
    """Distil a teacher into a smaller student trained on the teacher's logits, or (--draft-for TARGET)
    a draft model for speculative decoding.

    Resumable (--resume CHECKPOINT_DIR continues exactly), multi-process with torchrun (DDP, or
    --fsdp). Writes a Hugging Face model directory with edgellm.json (teacher, data, steps,
    perplexities) and distill_log.jsonl (the loss curve).

    With --draft-for TARGET: a draft of --draft-layers layers trained on KL to the target's log-probs
    over the target's own greedy continuations of --prompts prompts; it prints the draft's agreement
    with the target on held-out continuations (the expected greedy acceptance rate per drafted token).
    Quantize and export it, then `edgellm run TARGET-EXPORT --draft DRAFT-EXPORT`.

    Example: edgellm distill smollm2/ --student-layers 15 --steps 500 -o smollm2-15l/

    Example: edgellm distill --draft-for smollm2/ --draft-layers 2 -o smollm2-draft/
    """
    from ..console import PROGRESS, console, quiet_transformers, show_warnings
    from ..errors import EdgeLLMError
    from ..pipeline.distill import check_options, run_distill

    if output is None:
        raise EdgeLLMError("give the output directory with -o/--output")
    if draft_for is not None or teacher is None:
        draft_mode(context, teacher, output, draft_for, locals(), force)
        return
    draft_mode(context, None, output, None, locals(), force, check_only=True)  # draft options without --draft-for

    options = DistillOptions(
        student=student,
        student_layers=student_layers,
        loss=loss,
        temperature=temperature,
        ce_weight=ce_weight,
        hidden_weight=hidden_weight,
        data=data,
        seq_len=seq_len,
        batch_size=batch_size,
        grad_accum=grad_accum,
        steps=steps,
        lr=lr,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        clip=clip,
        precision=precision,
        device=device,
        fsdp=fsdp,
        checkpoint_every=checkpoint_every,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        evaluate=evaluate,
        eval_tokens=eval_tokens,
        ctx=ctx,
        seed=seed,
        max_memory=max_memory,
    )
    check_options(options)  # before anything is loaded
    with show_warnings():
        quiet_transformers()
        result = run_distill(
            teacher, output, options, progress=PROGRESS, train_progress=TrainBar(console, PROGRESS), force=force
        )
    if result.main:
        show_result(result, teacher, options)


def show_result(result: DistillResult, teacher: str, o: DistillOptions) -> None:
    """Sizes, steps and time; teacher / initial / distilled perplexity, KL and top-1 agreement."""
    from ..console import console

    n_t, n_s = result.parameters["teacher"], result.parameters["student"]
    console.print(
        f"wrote {result.output} ({human_bytes(dir_size(result.output))}; student {n_s:,} parameters, teacher "
        f"{n_t:,}) after {result.steps} steps ({result.tokens:,} tokens) in {result.seconds:.1f} s"
    )
    if o.evaluate:
        quality = result.quality
        console.print(
            f"perplexity on {quality['student']['tokens']} held-out tokens: teacher "
            f"{quality['teacher']['perplexity']:.3f}, initial student {quality['initial_student']['perplexity']:.3f}, "
            f"distilled student {quality['student']['perplexity']:.3f}; KL to the teacher "
            f"{quality['initial_student']['kl']:.4f} -> {quality['student']['kl']:.4f} nats/token, top-1 agreement "
            f"{quality['initial_student']['top1']:.1%} -> {quality['student']['top1']:.1%}"
        )


class TrainBar:
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
