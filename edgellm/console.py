"""Terminal output for the CLI layer only: rich console, progress bars, warnings, errors."""

from __future__ import annotations

import contextlib
import sys
import warnings

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .progress import EdgeLLMWarning

console = Console(stderr=True)  # progress and tables on stderr; generated text goes to stdout
out = Console()


class RichProgress:
    """`progress.track(...)` backed by a rich progress bar (see edgellm.progress)."""

    def track(self, iterable, description: str = "", total: int | None = None):
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
        with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
            yield from bar.track(iterable, total=total, description=description)


PROGRESS = RichProgress()


@contextlib.contextmanager
def status(message: str):
    with console.status(message):
        yield


@contextlib.contextmanager
def show_warnings():
    """Print EdgeLLMWarnings as one yellow line each (and silence library noise)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", EdgeLLMWarning)
        try:
            yield
        finally:
            for w in caught:
                if issubclass(w.category, EdgeLLMWarning):
                    from rich.markup import escape

                    console.print(f"[yellow]warning:[/] {escape(str(w.message))}", highlight=False)


def fail(message: str, code: int = 2):
    from rich.markup import escape

    console.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # keeps 'edgellm[peers]'

    sys.exit(code)


def quiet_transformers() -> None:
    """transformers' own logging and progress bars would drown edgellm's output."""
    import transformers.utils.logging as tlog

    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
