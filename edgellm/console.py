"""Terminal output for the CLI layer only: rich console, progress bars, warnings, errors."""

from __future__ import annotations

import contextlib
import signal
import sys
import warnings

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from typer.core import TyperGroup

from .progress import EdgeLLMWarning


class CLIConsole(Console):
    """A rich console that stays readable in logs: when its stream is not a terminal (a pipe, a
    file, CI), tables print as Markdown and lines are never wrapped, instead of rich's fallback
    of 80 columns (which cut bench's column names to "vari…" and spread each row over 4 lines)."""

    def print(self, *objects, **kwargs):
        if not self.is_terminal:
            from rich.table import Table

            objects = tuple(markdown_table(o) if isinstance(o, Table) else o for o in objects)
            kwargs.setdefault("soft_wrap", True)
            kwargs.setdefault("highlight", False)
        super().print(*objects, **kwargs)


def _plain(cell) -> str:
    from rich.errors import MarkupError
    from rich.text import Text

    if isinstance(cell, Text):
        return cell.plain
    if isinstance(cell, str):
        try:
            return Text.from_markup(cell).plain
        except MarkupError:
            return cell
    return str(cell)


def markdown_table(table) -> str:
    """A rich Table as a GitHub Markdown table (its title, if any, as a line above it)."""
    from rich.markup import escape

    cols = table.columns

    def row(cells) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    lines = [f"**{_plain(table.title)}**", ""] if table.title else []
    lines.append(row([_plain(c.header) for c in cols]))
    lines.append("|" + "|".join("---:" if c.justify == "right" else "---" for c in cols) + "|")
    cells = [[_plain(x) for x in c.cells] for c in cols]
    lines += [row(r) for r in zip(*cells)]
    return escape("\n".join(lines))  # printed as text: brackets in cells are not markup


console = CLIConsole(stderr=True)  # progress and tables on stderr; generated text goes to stdout
out = CLIConsole()


class RichProgress:
    """`progress.track(...)` backed by a rich progress bar (see edgellm.progress)."""

    def track(self, iterable, description: str = "", total: int | None = None):
        columns = [
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
        ]
        if not console.is_terminal:  # a log (nohup, CI): a line at every tenth instead of a bar
            yield from _logged(iterable, description, total)
            return
        with Progress(*columns, console=console, transient=True) as bar:
            yield from bar.track(iterable, total=total, description=description)

    def status(self, message: str):
        return status(message)

    def note(self, message: str):
        """One line on stderr, terminal or not (per-layer progress in a log)."""
        console.print(message, soft_wrap=True, highlight=False)


PROGRESS = RichProgress()


def _logged(iterable, description: str, total: int | None):
    """Yield from `iterable`, printing "description: i/total (elapsed, eta)" at every tenth of a
    known total of at least 10 items (short loops and unknown totals print nothing)."""
    import time

    from .progress import duration

    if total is None:
        total = len(iterable) if hasattr(iterable, "__len__") else 0
    if total < 10:
        yield from iterable
        return
    t0, mark = time.perf_counter(), 1
    for i, item in enumerate(iterable, 1):
        yield item
        if i * 10 >= mark * total:
            mark = i * 10 // total + 1
            s = time.perf_counter() - t0
            console.print(
                f"{description}: {i}/{total} ({duration(s)} elapsed, eta {duration(s * (total - i) / i)})",
                soft_wrap=True,
                highlight=False,
            )


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


# ----------------------------------------------------------------------------- errors and signals
SIGNALLED: list[int] = []  # signals received while a command ran (SIGINT, SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup path (temporary outputs) runs."""


def _on_signal(signum, _frame):
    SIGNALLED.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def signals_as_interrupts():
    """SIGINT and SIGTERM both raise KeyboardInterrupt while a command runs (previous handlers restored)."""
    import threading

    from .outputs import COMPLETED

    SIGNALLED.clear()
    COMPLETED.clear()  # one command per invocation (tests invoke many in one process)
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def interrupted() -> None:
    """The one line after Ctrl-C or SIGTERM: whether an output was completed before it came."""
    from .outputs import COMPLETED

    signum = SIGNALLED[-1] if SIGNALLED else signal.SIGINT
    what = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
    if COMPLETED:
        fail(f"{what} after the output '{COMPLETED[-1]}' was written completely (it is ready to use)", 128 + signum)
    fail(f"{what}; nothing was written at the output path", 128 + signum)


def usage_line(exc) -> str:
    """A click usage error as one line: the command, what was wrong, where help is."""
    ctx = getattr(exc, "ctx", None)
    path = ctx.command_path if ctx is not None else "edgellm"
    msg = " ".join(str(exc.format_message()).split())
    return f"{path}: {msg} (see '{path} --help')"


class OneLineErrors(TyperGroup):
    """The root command group: usage errors (unknown option, bad value, missing argument) print
    one `error:` line and exit 2 instead of typer's usage box, and SIGTERM is handled like Ctrl-C."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            from typer._click import exceptions as click  # typer >= 0.20 vendors click
        except ImportError:
            from click import exceptions as click
        from typer import Abort

        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        with signals_as_interrupts():
            try:
                rv = super().main(*args, standalone_mode=False, **kwargs)
            except click.NoArgsIsHelpError as exc:  # bare `edgellm`: the help, as before
                print(exc.ctx.get_help())
                sys.exit(0)
            except click.UsageError as exc:
                fail(usage_line(exc), 2)
            except click.ClickException as exc:
                fail(" ".join(str(exc.format_message()).split()), 2)
            except Abort:
                interrupted()
        sys.exit(rv if isinstance(rv, int) else 0)
