"""Benchmark variants, each in its own process: pp/tg tokens/s, TTFT, load time, peak RSS, energy
per token (measured or estimated) and quality, written as report.json/.md/.html."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable

from ..errors import EdgeLLMError
from .common import check_range
from .options import option


class Target(str, Enum):
    host = "host"
    laptop = "laptop"
    rpi4 = "rpi4"
    rpi5 = "rpi5"


@dataclass
class BenchOptions:
    prompt_tokens: int | None = option(None, "--prompt-tokens", min=1)  # None: 512 (quick: 64)
    gen_tokens: int | None = option(None, "--gen-tokens", min=1)  # None: 128 (quick: 16)
    reps: int | None = option(None, "--reps", min=1)  # None: 5 (quick: 2), after one warm-up
    threads: int = option(0, "--threads", min=0)  # 0: all usable CPUs
    data: str | None = option(None, "--data")  # None: the built-in corpus
    eval_tokens: int | None = option(None, "--eval-tokens", min=16)  # None: 2048 (quick: 256)
    ctx: int | None = option(None, "--ctx", min=8)  # None: 512 (quick: 128); stride = ctx
    quality: bool = option(True, "--quality")  # perplexity, KL and top-1 against the first variant
    target: Target = option(Target.host, "--target")  # energy (and decode estimate) for this device
    quick: bool = option(False, "--quick")  # a short smoke run
    timeout: float | None = option(None, "--timeout", min=1)  # seconds per variant


@dataclass
class BenchPlan:
    """Checked variants and settings: nothing measured yet."""

    variants: list  # benchmarks.variants.Variant
    settings: object  # benchmarks.run.Settings
    output: Path
    inputs: list
    force: bool


@dataclass
class BenchResult:
    output: Path
    report: dict  # as written to report.json
    rows: list[dict]  # one per variant: label, status ("ok" or why not), error, figures
    settings: object  # benchmarks.run.Settings

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] != "ok"]


def plan_bench(variants: list[str], output: Path, options: BenchOptions, force: bool = False) -> BenchPlan:
    """Check everything that can be checked before any variant runs."""
    from edgellm.benchmarks.run import Settings
    from edgellm.benchmarks.variants import parse_all

    from .._deps import require
    from ..outputs import check_output_dir

    o = options
    require("matplotlib", "'edgellm bench' (the plots of report.html)")  # before any work, not at the end
    check_range("--timeout", o.timeout, 0.0, lo_open=True)
    parsed = parse_all(variants)
    drafts = [v.speculate for v in parsed if v.speculate not in (None, "lookup")]  # EXPORT+DRAFT: an input too
    inputs = [v.path for v in parsed] + drafts + [o.data]
    check_output_dir(output, force, inputs, protect_exports=True)  # before any work; never into an export directory
    probe_writable(output)
    base = Settings.quick() if o.quick else Settings()
    chosen = dict(
        prompt_tokens=o.prompt_tokens, gen_tokens=o.gen_tokens, reps=o.reps, eval_tokens=o.eval_tokens, ctx=o.ctx
    )
    kw = {k: v for k, v in chosen.items() if v is not None}
    if "ctx" in kw:
        kw["stride"] = kw["ctx"]
    fixed = {"threads": o.threads, "data": o.data, "quality": o.quality, "target": Target(o.target).value}
    settings = Settings(**{**base.__dict__, **kw, **fixed, "timeout_s": o.timeout})
    if o.data is not None and o.quality:
        from ..data import load_text

        load_text(o.data)  # a bad --data fails here, not inside every worker
    return BenchPlan(parsed, settings, Path(output), inputs, force)


def run_bench(plan: BenchPlan, on_event: Callable[[int, str, str], None] | None = None) -> BenchResult:
    """Run every variant (`on_event(index, label, phase)` as each goes) and write the report whole."""
    from edgellm.benchmarks import report as rep
    from edgellm.benchmarks.run import build_report, run_variants

    from ..outputs import atomic_output_dir

    rows = run_variants(plan.variants, plan.settings, on_event or (lambda i, label, phase: None))
    report = build_report(plan.variants, plan.settings, rows)
    try:
        with atomic_output_dir(plan.output, plan.force, plan.inputs, protect_exports=True) as tmp:
            rep.write(report, tmp)
    except OSError as exc:
        raise EdgeLLMError(
            f"cannot write the report to '{plan.output}' ({exc.strerror or exc}); nothing was written there"
        ) from None
    return BenchResult(plan.output, report, rows, plan.settings)


def check_some_ok(result: BenchResult) -> None:
    """A bench where every variant failed is an error (after its report is written and shown)."""
    if len(result.failed) == len(result.rows):
        raise EdgeLLMError(f"every variant failed (the report in '{result.output}' says why)")


def probe_writable(output: Path) -> None:
    """Create and remove a temporary sibling of `output`: fails early where writing will fail."""
    import shutil
    import tempfile

    from ..outputs import existing_ancestor

    try:
        shutil.rmtree(tempfile.mkdtemp(prefix=f".{output.name}.probe-", dir=existing_ancestor(output)))
    except OSError as exc:
        raise EdgeLLMError(
            f"cannot write to '{existing_ancestor(output)}' ({exc.strerror or exc}); choose a writable output path"
        ) from None
