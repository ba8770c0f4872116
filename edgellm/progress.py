"""Progress reporting without printing from library code.

Library functions take a `progress` object and call `progress.track(iterable, description,
total)`, and `progress.status(message)` around a step without a count, and `progress.note(line)` for a
line that stays (also in a log); the CLI passes a rich
progress bar and spinner, tests and the Python API pass nothing.
Warnings go through `warnings.warn(..., EdgeLLMWarning)`; the CLI shows them.
"""

from __future__ import annotations

import contextlib


class EdgeLLMWarning(UserWarning):
    """Something the user should know (e.g. a calibration set smaller than asked)."""


class NullProgress:
    def track(self, iterable, description: str = "", total: int | None = None):
        return iterable

    def status(self, message: str):
        """A spinner with `message` while a step without a count runs (here: nothing)."""
        return contextlib.nullcontext()

    def note(self, message: str):
        """A line of progress (per layer: its time, the ETA, peak memory); here: nothing."""


NULL = NullProgress()


def duration(s: float) -> str:
    """Seconds as 1h02m or 3m05s (an ETA in a progress line)."""
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
