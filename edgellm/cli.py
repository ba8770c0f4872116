"""The `edgellm` command line. One module per command under edgellm/commands/, registered here
explicitly (COMMANDS below: name -> function, one hop to each command's code). Errors caused by
input print one line and exit with code 2; a missing optional dependency names its extra."""

from __future__ import annotations

import functools
import inspect

import typer

from . import __version__
from .commands.bench import bench
from .commands.compress import compress
from .commands.distill import distill
from .commands.evaluate import evaluate
from .commands.export import export
from .commands.info import info
from .commands.prune import prune
from .commands.quantize import quantize
from .commands.run import run
from .commands.serve import serve
from .commands.warmup import warmup
from .console import OneLineErrors
from .errors import EdgeLLMError

app = typer.Typer(
    name="edgellm",
    help="Make a trained transformer LM small and fast for laptops and Raspberry Pis: "
    "distill, prune, quantize, export to ONNX, run on a torch-free runtime, and bench it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=OneLineErrors,  # usage errors: one `error:` line, exit 2; SIGTERM like Ctrl-C
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"traceback": False}


def _guarded(name: str, fn):
    """Turn EdgeLLMError into a one-line error with exit code 2, a missing optional dependency
    into one naming its extra (exit 2), and bugs into one line (exit 1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ._deps import missing_extra_message
        from .console import SIGNALLED, fail, interrupted

        try:
            return fn(*args, **kwargs)
        except EdgeLLMError as exc:
            if SIGNALLED:  # e.g. Ctrl-C inside an import, reported as a missing package
                interrupted()
            if _state["traceback"]:
                raise
            fail(str(exc), 2)
        except KeyboardInterrupt:
            interrupted()  # says whether the output was already complete
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except MemoryError:
            fail("out of memory; close other programs, or use a smaller model or --ctx", 2)
        except Exception as exc:  # a bug: still one line, unless --traceback
            if SIGNALLED:  # a signal inside library code that re-raised it as another exception
                interrupted()
            if _state["traceback"]:
                raise
            if isinstance(exc, ImportError):  # an extra is not installed (device install): say which one
                message = missing_extra_message(exc, f"'edgellm {name}'")
                if message is not None:
                    fail(message, 2)
            fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --traceback and report it)", 1)

    return wrapper


def _version(value: bool):
    if value:
        print(f"edgellm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    traceback: bool = typer.Option(False, "--traceback", help="Show the full Python traceback on errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
):
    _state["traceback"] = traceback


# Every command, in --help order: (name, function). Each function lives in
# edgellm/commands/<module>.py and imports its heavy dependencies inside its body.
COMMANDS = [
    ("info", info),
    ("distill", distill),
    ("prune", prune),
    ("quantize", quantize),
    ("export", export),
    ("run", run),
    ("warmup", warmup),
    ("eval", evaluate),
    ("bench", bench),
    ("serve", serve),
    ("compress", compress),
]


def reflow(doc: str | None) -> str:
    """A command's docstring as its --help text: typer keeps single line breaks after the first
    paragraph, which at any terminal width but the source's breaks lines mid-sentence. Lines of a
    paragraph are joined; a line starting with "- " (a list item) or indented (an example) keeps
    its own line."""
    out = []
    for para in inspect.cleandoc(doc or "").split("\n\n"):
        lines: list[str] = []
        for line in para.splitlines():
            if lines and not line.startswith(("- ", " ")) and not lines[-1].startswith(" "):
                lines[-1] += " " + line.strip()
            else:
                lines.append(line)
        out.append("\n".join(lines))
    return "\n\n".join(out)


for _name, _fn in COMMANDS:
    app.command(_name, help=reflow(_fn.__doc__))(_guarded(_name, _fn))


def main():
    app()
