"""`edgellm bench`: speed, memory, energy and quality of variants, side by side with the peers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..pipeline.bench import BenchOptions, BenchResult, Target
from .common import DataOpt, ForceOpt


def bench(
    variants: Annotated[
        List[str],
        typer.Argument(
            help="VARIANT[:BACKEND]: an export directory (numba | onnxruntime | ort-genai), a model directory (torch) "
            "or a .gguf file (llama.cpp | torch). The first one is the quality reference. EXPORT+lookup, "
            "EXPORT+DRAFT_EXPORT or EXPORT+DRAFT_EXPORT+lookup (numba) also times speculative decoding against "
            "plain greedy on copy tasks and free generation: acceptance, mean accepted length, speed-up.",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Report directory: report.json, report.md, report.html (written whole at the end).",
            show_default=False,
        ),
    ],
    prompt_tokens: Annotated[
        Optional[int],
        typer.Option(
            "--prompt-tokens", "-p", help="pp: prompt tokens per repetition (default 512; --quick 64).", min=1
        ),
    ] = None,
    gen_tokens: Annotated[
        Optional[int],
        typer.Option(
            "--gen-tokens", "-n", help="tg: generated tokens per repetition (default 128; --quick 16).", min=1
        ),
    ] = None,
    reps: Annotated[
        Optional[int],
        typer.Option(
            "--reps", "-r", help="Repetitions (median and spread) after one warm-up (default 5; --quick 2).", min=1
        ),
    ] = None,
    threads: Annotated[
        int, typer.Option("--threads", "-t", help="Threads for every engine (0: all usable CPUs).", min=0)
    ] = 0,
    data: DataOpt = None,
    eval_tokens: Annotated[
        Optional[int],
        typer.Option("--eval-tokens", help="Evaluation tokens for perplexity/KL (default 2048; --quick 256).", min=16),
    ] = None,
    ctx: Annotated[
        Optional[int],
        typer.Option("--ctx", help="Perplexity context (stride = ctx) (default 512; --quick 128).", min=8),
    ] = None,
    quality: Annotated[
        bool, typer.Option("--quality/--no-quality", help="Measure perplexity, KL and top-1 against the first variant.")
    ] = True,
    target: Annotated[
        Target,
        typer.Option(
            "--target",
            help="Energy for: host (this machine: RAPL/NVML where readable, else a labelled generic estimate), or a "
            "device (laptop, rpi4, rpi5) whose decode time is also estimated from its memory bandwidth and cores.",
        ),
    ] = Target.host,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="Short smoke run (small pp/tg, 2 reps, little quality data): seconds per variant."
        ),
    ] = False,
    timeout: Annotated[
        Optional[float],
        typer.Option("--timeout", help="Seconds per variant before it is stopped and marked failed.", min=1),
    ] = None,
    force: ForceOpt = False,
):
    """Benchmark variants, each in its own process: pp/tg tokens/s, TTFT, load time, peak RSS,
    energy per token (measured or estimated) and quality, as report.json/.md/.html.

    Example: edgellm bench q4-onnx/ q4-onnx/:onnxruntime smol.Q4_0.gguf -o bench/ --quick

    Example: edgellm bench q4-onnx/ q4-onnx/+lookup q4-onnx/+draft-onnx/ -o bench-spec/
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from ..console import console
    from ..pipeline.bench import check_some_ok, plan_bench, run_bench

    options = BenchOptions(
        prompt_tokens=prompt_tokens,
        gen_tokens=gen_tokens,
        reps=reps,
        threads=threads,
        data=data,
        eval_tokens=eval_tokens,
        ctx=ctx,
        quality=quality,
        target=target,
        quick=quick,
        timeout=timeout,
    )
    plan = plan_bench(variants, output, options, force=force)
    n = len(plan.variants)
    columns = [
        SpinnerColumn(),
        TextColumn("[bold]{task.fields[label]}"),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:
        tasks = {}

        def on_event(i, label, phase):
            if i not in tasks:
                tasks[i] = bar.add_task(phase, label=f"[{i + 1}/{n}] {label}", total=None)
            bar.update(tasks[i], description=phase)
            if phase in ("done", "failed"):
                bar.update(
                    tasks[i], total=1, completed=1, description="[green]done" if phase == "done" else "[red]failed"
                )

        result = run_bench(plan, on_event)
    show_result(result, options)
    check_some_ok(result)


def show_result(result: BenchResult, o: BenchOptions) -> None:
    """The report's table (medians; the spread is in report.md) and the variants that failed."""
    from rich.table import Table
    from rich.text import Text

    from edgellm.benchmarks import report as rep

    from ..console import console, out

    target = Target(o.target)
    st = result.settings
    table = Table(
        title=f"edgellm bench ({'quick, ' if o.quick else ''}{st.resolved_threads()} threads, energy: "
        f"{target.value}; medians, spread in report.md)",
        caption=f"pp: a {st.prompt_tokens}-token prompt from an empty cache; tg: {st.gen_tokens} greedy decode steps "
        "after a 1-token prefill",
    )
    hide = ("backend", "load cold / warm", "KL") + (
        () if target is not Target.host else (rep.HEADERS[rep.DEVICE_COLUMN],)
    )
    if not any(r.get("speculation") for r in result.report["variants"]):
        hide += (rep.HEADERS[rep.SPEC_COLUMN],)
    keep = [i for i, h in enumerate(rep.HEADERS) if h not in hide]
    for i in keep:
        h = rep.HEADERS[i]
        label = f"{target.value} tg tok/s (est. memory / compute bound)" if i == rep.DEVICE_COLUMN else h
        table.add_column(label, justify="left" if h in ("variant", "status") else "right")
    for r in rep.table_rows(result.report, spread=False):
        cells = [r[i] if i != len(r) - 1 else r[i].split(":")[0] for i in keep]
        table.add_row(*(Text(c) for c in cells), style=None if r[-1] == "ok" else "red")
    out.print(table)
    for r in result.failed:
        console.print(f"[yellow]warning:[/] {r['label']} failed: {r['error']}")
    console.print(f"wrote {result.output}/report.json, report.md, report.html")
