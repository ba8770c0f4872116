"""The commands a recipe stage can be, and their options read from the real command signatures.

A stage's options are checked against the command function's own signature (the typer
`Annotated` options: names, types, ranges, enum choices), so there is no second list of options
to keep in step with the commands. The recipe supplies the arguments that chain the stages (the input
model, the output folder, the distill student, the bench variants); those keys are refused.
"""

from __future__ import annotations

import difflib
import enum
import functools
import importlib
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path

# stage name -> (module under edgellm.commands, function)
COMMANDS = {
    "prune": ("prune", "prune"),
    "distill": ("distill", "distill"),
    "quantize": ("quantize", "quantize"),
    "export": ("export", "export"),
    "bench": ("bench", "bench"),
    "eval": ("evaluate", "evaluate"),
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


def function(stage: str):
    module, name = COMMANDS[stage]
    return getattr(importlib.import_module(f"edgellm.commands.{module}"), name)


@dataclass
class Option:
    name: str  # Python parameter name
    key: str  # the spelling used in the recipe (the long option without dashes)
    kind: type  # bool, int, float, str, Path or an Enum class
    default: object
    min: float | None
    max: float | None
    help: str


def _decls(info) -> list[str]:
    """The option's declarations, e.g. ['--eval/--no-eval'] (typer keeps the first in `default` under Annotated)."""
    first = [info.default] if isinstance(info.default, str) and info.default.startswith("-") else []
    return [*first, *(info.param_decls or ())]


def _base(annotation):
    """The option's value type: Optional[X] -> X."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation


@functools.lru_cache(maxsize=None)
def signature(stage: str) -> tuple[dict[str, Option], list[str]]:
    """(settable options by recipe key and aliases, every parameter name) read from the command function."""
    from typer.models import OptionInfo

    fn = function(stage)
    hints = typing.get_type_hints(fn, include_extras=True)
    params = inspect.signature(fn).parameters
    out: dict[str, Option] = {}
    for name, param in params.items():
        hint = hints.get(name)
        info = next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, OptionInfo)), None)
        if info is None or name in MANAGED:
            continue
        longs = [d.split("/")[0][2:] for decl in _decls(info) for d in [decl] if d.startswith("--")]
        opt = Option(
            name=name,
            key=longs[0] if longs else name.replace("_", "-"),
            kind=_base(typing.get_args(hint)[0]),
            default=param.default,
            min=info.min,
            max=info.max,
            help=info.help or "",
        )
        for alias in {*longs, name, name.replace("_", "-"), *(k.replace("-", "_") for k in longs)}:
            out[alias] = opt
    return out, list(params)


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


def defaults(stage: str) -> dict:
    """Every parameter's default from the function signature (managed ones included)."""
    return {
        n: p.default
        for n, p in inspect.signature(function(stage)).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


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
    kind = opt.kind
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        choices = [m.value for m in kind]
        if value not in choices:
            raise ValueError(f"'{key}' must be one of {', '.join(map(str, choices))} (got {value!r})")
        return opt.name, kind(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"'{key}' is a switch: give true or false (got {value!r})")
        return opt.name, value
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
        return opt.name, value
    if kind in (str, Path):
        if not isinstance(value, str):
            raise ValueError(f"'{key}' takes {'a path' if kind is Path else 'a string'} (got {value!r}; quote it)")
        return opt.name, Path(value) if kind is Path else value
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


def invoke(stage: str, args: dict, params: dict) -> None:
    """Call the stage's command function with the recipe's arguments and option values (defaults for the rest)."""
    function(stage)(**{**defaults(stage), **args, **params})
