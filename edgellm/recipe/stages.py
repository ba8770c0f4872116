"""The commands a recipe stage can be: their options records, checks and runs (edgellm.pipeline).

A stage's options are checked against its workflow's options record (edgellm.pipeline): the
fields give the names, types and defaults, their metadata the CLI spelling, range and enum
choices, so there is no second list of options to keep in step with the commands. The recipe
supplies the arguments that chain the stages (the input model, the output folder, the distill
student, the bench variants); those keys are refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import enum
import functools
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..pipeline.bench import BenchOptions
from ..pipeline.distill import DistillOptions
from ..pipeline.draft import DraftOptions
from ..pipeline.evaluate import EvalOptions
from ..pipeline.export import ExportOptions
from ..pipeline.options import flags
from ..pipeline.prune import PruneOptions
from ..pipeline.quantize import QuantizeOptions

# stage name -> the options record of its workflow
COMMANDS = {
    "prune": PruneOptions,
    "distill": DistillOptions,
    "draft": DraftOptions,  # edgellm distill --draft-for: a draft for the recipe's input model
    "quantize": QuantizeOptions,
    "export": ExportOptions,
    "bench": BenchOptions,
    "eval": EvalOptions,
}

# The arguments of each stage besides its options record (the recipe fills them in).
ARGUMENTS = {
    "prune": ("model", "output", "force"),
    "distill": ("teacher", "output", "force"),
    "draft": ("target", "output", "force"),
    "quantize": ("model", "output", "force"),
    "export": ("model", "output", "force"),
    "bench": ("variants", "output", "force"),
    "eval": ("model", "as_json"),  # as_json: the command's --json; the stage writes eval.json
}

# Parameters the recipe fills in itself (by their Python names), with the reason shown to the user.
MANAGED = {
    "model": "the input is the previous stage's output (or the recipe's model)",
    "teacher": "the teacher is the recipe's input model",
    "variants": "bench measures the previous stage's output; add more variants with 'with:'",
    "output": "every stage writes OUT/NN-stage/",
    "force": "the recipe replaces a stage's output when it reruns it",
    "student": "the student is the previous stage's output",
    "resume": "the recipe resumes an interrupted distill stage by itself",
    "checkpoint_dir": "checkpoints live beside the stage's output (OUT/NN-distill.checkpoints)",
    "as_json": "the eval stage writes OUT/NN-eval/eval.json",
}

# Keys a stage may hold besides its command's options (handled by the recipe runner).
RECIPE_KEYS = {
    "bench": {
        "with": "extra variants measured in the same run (VARIANT[:BACKEND], paths relative to the working directory)"
    }
}


@dataclass
class Option:
    name: str  # Python field name
    key: str  # the spelling used in the recipe (the long option without dashes)
    kind: type  # bool, int, float, str, Path or an Enum class
    default: object
    min: float | None
    max: float | None


@functools.lru_cache(maxsize=None)
def signature(stage: str) -> tuple[dict[str, Option], list[str]]:
    """(settable options by recipe key and aliases, every parameter name) read from the options record."""
    out: dict[str, Option] = {}
    names = list(ARGUMENTS[stage])
    for f, flag, kind in flags(COMMANDS[stage]):
        names.append(f.name)
        if f.name in MANAGED:
            continue
        key = flag.flag[2:]
        opt = Option(name=f.name, key=key, kind=kind, default=f.default, min=flag.min, max=flag.max)
        for alias in {key, f.name, f.name.replace("_", "-"), key.replace("-", "_")}:
            out[alias] = opt
    return out, names


def options(stage: str) -> dict[str, Option]:
    return signature(stage)[0]


def option_keys(stage: str) -> list[str]:
    """The canonical keys, in the command's order (for messages and docs)."""
    seen, keys = set(), []
    for opt in options(stage).values():
        if opt.name not in seen:
            seen.add(opt.name)
            keys.append(opt.key)
    return keys


def convert(stage: str, key: str, value) -> tuple[str, object]:
    """(Python name, checked value) for one recipe option; raises ValueError with the reason."""
    opts = options(stage)
    if key not in opts:
        managed = next((m for m in MANAGED if key in (m, m.replace("_", "-")) and m in signature(stage)[1]), None)
        if managed:
            raise ValueError(f"'{key}' is set by the recipe ({MANAGED[managed]})")
        close = difflib.get_close_matches(key, option_keys(stage), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; {stage} takes: {', '.join(option_keys(stage))}"
        raise ValueError(f"unknown option '{key}'{hint}")
    opt = opts[key]
    if value is None:
        return opt.name, opt.default
    return opt.name, _checked(opt, key, value)


def _checked(opt: Option, key: str, value):
    kind = opt.kind
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        choices = [m.value for m in kind]
        if value not in choices:
            raise ValueError(f"'{key}' must be one of {', '.join(map(str, choices))} (got {value!r})")
        return kind(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"'{key}' is a switch: give true or false (got {value!r})")
        return value
    if kind in (int, float):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (kind is int and not isinstance(value, int))
        ):
            raise ValueError(f"'{key}' takes {'an integer' if kind is int else 'a number'} (got {value!r})")
        value = kind(value)
        if opt.min is not None and value < opt.min:
            raise ValueError(f"'{key}' must be >= {opt.min} (got {value})")
        if opt.max is not None and value > opt.max:
            raise ValueError(f"'{key}' must be <= {opt.max} (got {value})")
        return value
    if kind in (str, Path):
        if not isinstance(value, str):
            raise ValueError(f"'{key}' takes {'a path' if kind is Path else 'a string'} (got {value!r}; quote it)")
        return Path(value) if kind is Path else value
    raise ValueError(f"'{key}' cannot be set from a recipe (type {kind})")


def jsonable(value):
    """Option values as they go into the lock file (enums by value, paths as strings)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


@dataclass
class Hooks:
    """What the caller adds around every stage (the CLI: warnings shown, progress bars, summaries)."""

    progress: object = None  # edgellm.progress protocol
    train_progress: object = None  # the distill training loop's
    context: Callable[[], typing.ContextManager] = contextlib.nullcontext  # around each stage's work
    show: Callable[[str, dict, object, object], None] = lambda command, args, result, options: None


_IN_OPTIONS = {"distill": ("student", "resume"), "eval": ("reference",)}  # arguments that are option fields


def run_stage(stage: str, args: dict, values: dict, hooks: Hooks):
    """Run one stage's workflow with the recipe's arguments and option values (defaults for the rest)."""
    options = dataclasses.replace(COMMANDS[stage](**values), **{k: args[k] for k in _IN_OPTIONS.get(stage, ())})
    with hooks.context():
        result = _RUN[stage](args, options, hooks)
    hooks.show(stage, args, result, options)
    if stage == "bench":
        from ..pipeline.bench import check_some_ok

        check_some_ok(result)
    return result


def _prune(a, o, h):
    from ..pipeline.prune import run_prune

    return run_prune(a["model"], a["output"], o, progress=h.progress, force=a["force"])


def _distill(a, o, h):
    from ..pipeline.distill import run_distill

    return run_distill(
        a["teacher"], a["output"], o, progress=h.progress, train_progress=h.train_progress, force=a["force"]
    )


def _draft(a, o, h):
    from ..pipeline.draft import run_draft

    return run_draft(
        a["target"], a["output"], o, progress=h.progress, train_progress=h.train_progress, force=a["force"]
    )


def _quantize(a, o, h):
    from ..pipeline.quantize import run_quantize

    return run_quantize(a["model"], a["output"], o, progress=h.progress, force=a["force"])


def _export(a, o, h):
    from ..pipeline.export import run_export

    return run_export(a["model"], a["output"], o, progress=h.progress, force=a["force"])


def _bench(a, o, h):
    from ..pipeline.bench import plan_bench, run_bench

    return run_bench(plan_bench(a["variants"], a["output"], o, force=a["force"]))


def _eval(a, o, h):
    """`eval` as a stage: the eval workflow, written to OUT/NN-eval/eval.json."""
    from ..outputs import atomic_output_dir
    from ..pipeline.evaluate import run_eval

    result = run_eval(a["model"], o, progress=h.progress)
    with atomic_output_dir(a["output"], force=True) as tmp:
        (tmp / "eval.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    return result


_RUN = {
    "prune": _prune,
    "distill": _distill,
    "draft": _draft,
    "quantize": _quantize,
    "export": _export,
    "bench": _bench,
    "eval": _eval,
}
