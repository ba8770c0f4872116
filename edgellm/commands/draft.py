"""`edgellm distill --draft-for TARGET`: the draft half of the distill command (options, output).

The distill command's options that a draft shares (steps, lr, data, ...) take the draft's defaults
(pipeline/draft.py DraftOptions) unless given on the command line; options only a student uses are
refused with --draft-for, and the draft's own options without it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import EdgeLLMError

DRAFT_ONLY = (
    "draft_layers",
    "draft_init",
    "prompts",
    "prompt_style",
    "prompt_tokens",
    "gen_tokens",
    "kl_top_k",
)
DRAFT_FLAGS = ("draft_for", *DRAFT_ONLY)  # the distill command's options that are a draft's alone
STUDENT_ONLY = (
    "student",
    "student_layers",
    "loss",
    "ce_weight",
    "hidden_weight",
    "seq_len",
    "grad_accum",
    "precision",
    "fsdp",
    "checkpoint_every",
    "checkpoint_dir",
    "resume",
    "eval_tokens",
    "ctx",
    "max_memory",
)


def _given(ctx) -> set[str]:
    """The parameters set on the command line (not left at their defaults) of the running command."""
    if ctx is None:  # called as a plain function
        return set()
    sources = {p.name: ctx.get_parameter_source(p.name) for p in ctx.command.params if p.name}
    return {name for name, src in sources.items() if src is not None and src.name != "DEFAULT"}


def _flag(name: str) -> str:
    return "--" + {"evaluate": "eval"}.get(name, name).replace("_", "-")


def draft_mode(ctx, teacher, output: Path, draft_for, values: dict, force: bool, check_only: bool = False) -> None:
    """Run `distill --draft-for` (or, check_only: refuse draft options given without it). `ctx`: the
    typer context (which options were given on the command line)."""
    given = _given(ctx)
    if check_only:
        stray = [n for n in DRAFT_ONLY if n in given]
        if stray:
            raise EdgeLLMError(f"{_flag(stray[0])} is a draft option; it needs --draft-for TARGET")
        return
    if draft_for is None:
        raise EdgeLLMError("give the TEACHER model to distil from, or --draft-for TARGET to train a draft for it")
    if teacher is not None:
        raise EdgeLLMError(
            f"give either a TEACHER ('{teacher}') or --draft-for TARGET, not both: the target is the draft's teacher"
        )
    stray = [n for n in STUDENT_ONLY if n in given]
    if stray:
        hint = " (use --draft-layers)" if stray[0] == "student_layers" else ""
        raise EdgeLLMError(f"{_flag(stray[0])} does not apply with --draft-for{hint}")
    from ..pipeline.draft import DraftOptions, check_options

    fields = {f.name for f in dataclasses.fields(DraftOptions)}
    options = DraftOptions(**{k: values[k] for k in fields if k in DRAFT_ONLY or k in given})
    check_options(options)  # before anything is loaded
    from ..console import PROGRESS, console, quiet_transformers, show_warnings
    from ..pipeline.draft import run_draft
    from .distill import TrainBar

    with show_warnings():
        quiet_transformers()
        result = run_draft(
            draft_for, output, options, progress=PROGRESS, train_progress=TrainBar(console, PROGRESS), force=force
        )
    show(result, options)


def show(result, o) -> None:
    """Sizes, data, time; the held-out agreement with the target before and after training."""
    from ..console import console
    from .common import dir_size, human_bytes

    n = result.parameters
    d = result.data
    console.print(
        f"wrote {result.output} ({human_bytes(dir_size(result.output))}; draft {n['draft']:,} parameters of which "
        f"{n['trained']:,} trained, target {n['target']:,}; layers {result.kept} of {result.target_layers}, "
        f"init {o.draft_init.value}) after {o.steps} steps on {d['train_tokens']:,} target tokens "
        f"({d['prompts']} prompts, {d['prompt_style']}{' in its chat template' if d['chat_template'] else ''}, "
        f"generated in "
        f"{d['generate_s']:.1f} s) in {result.seconds:.1f} s"
    )
    if result.quality:
        a, b = result.quality["initial"], result.quality["draft"]
        console.print(
            f"on {b['tokens']} held-out target tokens: agreement with the target's greedy token (expected "
            f"acceptance per drafted token) {a['agreement']:.1%} -> {b['agreement']:.1%}; KL to the target "
            f"{a['kl']:.4f} -> {b['kl']:.4f} nats/token"
        )
