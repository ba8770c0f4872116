"""`edgellm compress RECIPE.yaml`: run a recipe's stages (prune, distill, quantize, export, bench,
eval) in order into one output folder, with a lock file, skip-on-rerun and a final report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer


def compress(
    recipe: Annotated[
        Path,
        typer.Argument(
            help="Recipe file (YAML): the input model and the stages, see docs/RECIPES.md.", show_default=False
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Output folder: OUT/NN-stage/ per stage, recipe.lock.json, report.md/.json/.html. "
            "Rerunning into the same folder skips unchanged stages.",
            show_default=False,
        ),
    ],
    model: Annotated[
        Optional[str], typer.Option("--model", "-m", help="Input model, instead of the recipe's 'model:'.")
    ] = None,
    report: Annotated[
        bool, typer.Option("--report/--no-report", help="Measure every stage's output and write OUT/report.*.")
    ] = True,
    check: Annotated[
        bool,
        typer.Option("--check", help="Only check the recipe (every problem at once) and print the plan; run nothing."),
    ] = False,
    compare: Annotated[
        Optional[List[Path]],
        typer.Option(
            "--compare",
            help="Add another compress run's outputs (its OUT folder) to the report, e.g. a quantize-only baseline.",
        ),
    ] = None,
):
    """Run a compression recipe: named stages in order, each one edgellm command with its options.

    The recipe is checked whole before any work starts. Each stage writes OUT/NN-stage/;
    OUT/recipe.lock.json records each stage's inputs, options, code version and output hash, so a
    rerun skips every stage whose inputs and options are unchanged and restarts at the first
    changed or failed one (an interrupted distill stage resumes from its checkpoint).

    Example: edgellm compress recipes/smollm2-pi.yaml -o smollm2-pi/
    """
    from ..console import console
    from ..recipe import spec

    r = spec.read_recipe(recipe, model=model)
    _check_model(r.model)
    output = Path(output)
    _check_output(output, compare or [])
    # missing parents of the output are created when the first stage runs (runner.run_recipe), as -o does
    # for every other command; --check creates nothing

    if not check and any(s.command != "bench" for s in r.stages):  # one error line before the plan, not after it
        from .._deps import require

        for module in ("torch", "transformers"):
            require(module, "'edgellm compress'")
        from ..console import quiet_transformers

        quiet_transformers()
    _print_plan(recipe, r, output)
    if check:
        console.print("recipe is valid; nothing was run (--check)")
        return
    results = _run_stages(r, output)
    ran = sum(1 for x in results if x.status == "ran")
    console.print(f"stages: {ran} ran, {len(r.stages) - ran} skipped (unchanged)")
    if report:
        _report(recipe, r, output, compare or [])


def _check_output(output: Path, compare: list[Path]) -> None:
    from ..errors import EdgeLLMError

    if output.exists() and not output.is_dir():
        raise EdgeLLMError(f"output '{output}' exists and is not a folder; choose another path")
    if output.is_dir() and any(output.iterdir()) and not (output / "recipe.lock.json").is_file():
        raise EdgeLLMError(
            f"output '{output}' is a non-empty folder that no recipe wrote (no recipe.lock.json); choose another path"
        )
    for other in compare:
        if not (Path(other) / "report.json").is_file():
            raise EdgeLLMError(
                f"--compare '{other}' has no report.json; give the output folder of another 'edgellm compress' run"
            )


def _print_plan(recipe: Path, r, output: Path) -> None:
    from ..console import console

    n = len(r.stages)
    console.print(f"recipe {recipe}: {n} stage{'s' if n > 1 else ''} on {r.model} -> {output}/")
    for s in r.stages:
        opts = ", ".join(f"{k}={v}" for k, v in s.keys.items()) or "defaults"
        console.print(
            f"  {s.dirname:<16} {s.command:<9} {opts}"
            + (f"; with {', '.join(s.extra['with'])}" if s.extra.get("with") else ""),
            highlight=False,
            soft_wrap=True,
        )


def _run_stages(r, output: Path):
    """Every stage, each announced as it is skipped, run, resumed, done or failed; SIGTERM like Ctrl-C."""
    import signal

    from ..console import console
    from ..recipe import runner

    n = len(r.stages)

    def on_event(stage, what, detail):
        tag = {
            "skip": "[dim]skip[/]",
            "run": "[bold]run[/]",
            "resume": "[bold]resume[/]",
            "done": "[green]done[/]",
            "failed": "[red]failed[/]",
        }[what]
        console.print(f"[{stage.index + 1}/{n}] {stage.dirname}: {tag} ({detail})", highlight=False)

    def _terminate(signum, frame):  # `kill PID` stops a stage like Ctrl-C: temporary outputs removed, lock says so
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return runner.run_recipe(r, output, on_event, _hooks())
    except KeyboardInterrupt:
        from ..console import fail

        fail(
            f"interrupted; the finished stages' outputs in '{output}' are kept and recipe.lock.json marks the stage "
            "that stopped: rerun the same command to continue there",
            130,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)


def _report(recipe: Path, r, output: Path, compare: list[Path]) -> None:
    """Measure every stage's output, write OUT/report.*, print the table."""
    from rich.table import Table

    from ..console import PROGRESS, console, out, show_warnings
    from ..recipe import report as rep

    with show_warnings():
        data = rep.measure(r, output, PROGRESS, lambda what: console.print(f"report: {what}", highlight=False), compare)
    rep.write(data, output)
    table = Table(title=f"{recipe.name} on {r.model}: every stage's output")
    for h in rep.HEADERS:
        table.add_column(h, justify="left" if h == "output" else "right")
    for row in rep.rows_text(data, spread=False):
        table.add_row(*row)
    out.print(table)
    console.print(f"wrote {output}/report.md, report.json, report.html and recipe.lock.json")


def _hooks():
    """Each stage as its command shows it: warnings, progress bars, the command's summary."""
    from ..console import PROGRESS, console, show_warnings
    from ..recipe.stages import Hooks
    from .distill import TrainBar

    return Hooks(
        progress=PROGRESS, train_progress=TrainBar(console, PROGRESS), context=show_warnings, show=_show_result
    )


def _show_result(command: str, args: dict, result, options) -> None:
    from . import bench, distill, export, prune, quantize

    if command == "bench":
        bench.show_result(result, options)
    elif command == "draft":
        from .draft import show

        show(result, options)
    elif command == "distill":
        if result.main:
            distill.show_result(result, args["teacher"], options)
    elif command in ("prune", "quantize", "export"):
        {"prune": prune, "quantize": quantize, "export": export}[command].show_result(result, args["model"], options)
    # eval: the stage writes eval.json and prints nothing, as before


def _check_model(spec: str) -> None:
    """The input model exists (a cheap look before any stage starts; the stages load it)."""
    from ..errors import EdgeLLMError
    from ..modelio import BUILTIN_MODELS, resolve_spec

    path = Path(resolve_spec(spec)) if spec in BUILTIN_MODELS else Path(spec)
    looks_local = spec in BUILTIN_MODELS or spec.startswith((".", "/", "~")) or path.suffix == ".gguf" or path.exists()
    if looks_local and not path.exists():
        raise EdgeLLMError(
            f"input model '{spec}' does not exist; give a model directory, a .gguf file or builtin:smollm2"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        raise EdgeLLMError(
            f"input model '{spec}' is not a model: expected a Hugging Face model directory with config.json"
        )
