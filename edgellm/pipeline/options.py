"""Options records: a dataclass field per option, its command-line spelling in the field metadata.

`option(default, "--group-size", min=1)` is a dataclass field whose metadata says how the CLI
spells it and which range it takes; the recipe reads this to check a stage's options (names,
types, ranges, enum choices), so the options are listed once, here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass


@dataclass(frozen=True)
class Flag:
    """How an option is spelled on the command line and the range it takes."""

    flag: str  # the long option, e.g. "--group-size" (a switch: its positive form, "--eval")
    min: float | None = None
    max: float | None = None


def option(default, flag: str, *, min: float | None = None, max: float | None = None):
    """A dataclass field with its CLI spelling (and range) in the metadata."""
    return dataclasses.field(default=default, metadata={"cli": Flag(flag, min, max)})


def value_type(annotation):
    """An option's value type: Optional[X] / X | None -> X (bool, int, float, str, Path or an Enum)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return args[0] if union and len(args) == 1 else annotation


def flags(cls) -> list[tuple[dataclasses.Field, Flag, type]]:
    """(field, its Flag, its value type) for every option of an options record, in order."""
    hints = typing.get_type_hints(cls)
    return [(f, f.metadata["cli"], value_type(hints[f.name])) for f in dataclasses.fields(cls) if "cli" in f.metadata]
