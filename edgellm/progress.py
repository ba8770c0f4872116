"""Progress reporting without printing from library code.

Library functions take a `progress` object and call `progress.track(iterable, description,
total)`; the CLI passes a rich progress bar, tests and the Python API pass nothing.
Warnings go through `warnings.warn(..., EdgeLLMWarning)`; the CLI shows them.
"""

from __future__ import annotations


class EdgeLLMWarning(UserWarning):
    """Something the user should know (e.g. a calibration set smaller than asked)."""


class NullProgress:
    def track(self, iterable, description: str = "", total: int | None = None):
        return iterable


NULL = NullProgress()
