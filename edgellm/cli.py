"""The `edgellm` command line. One module per command under edgellm/commands/, registered here
explicitly. Errors caused by input print one line and exit with code 2."""

from __future__ import annotations

import functools

import typer

from . import __version__
from .commands import evaluate as eval_cmd
from .commands import info as info_cmd
from .commands import quantize as quantize_cmd
from .commands import pending
from .errors import EdgeLLMError

app = typer.Typer(
    name="edgellm",
    help="Make a trained transformer LM small and fast for laptops and Raspberry Pis: "
    "distill, prune, quantize, export to ONNX, run on a torch-free runtime, and bench it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"traceback": False}


def _guarded(fn):
    """Turn EdgeLLMError into a one-line error with exit code 2 (and bugs into one line, exit 1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .console import fail

        try:
            return fn(*args, **kwargs)
        except EdgeLLMError as exc:
            if _state["traceback"]:
                raise
            fail(str(exc), 2)
        except KeyboardInterrupt:
            fail("interrupted; nothing was written at the output path", 130)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:  # a bug: still one line, unless --traceback
            if _state["traceback"]:
                raise
            fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --traceback and report it)", 1)

    return wrapper


def _version(value: bool):
    if value:
        print(f"edgellm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    traceback: bool = typer.Option(False, "--traceback", help="Show the full Python traceback on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
):
    _state["traceback"] = traceback


app.command("info")(_guarded(info_cmd.info))
app.command("quantize")(_guarded(quantize_cmd.quantize))
app.command("eval")(_guarded(eval_cmd.evaluate))
app.command("compress")(_guarded(pending.load("compress")))
# Commands whose module exists are registered; the rest say "not yet available". Each module
# defines one function named after its command and imports its heavy dependencies inside it.
for _name in pending.PENDING:
    _fn = pending.load(_name)
    _extra = {} if _fn.__module__ != pending.__name__ else {"context_settings": {"allow_extra_args": True, "ignore_unknown_options": True}}
    app.command(_name, **_extra)(_guarded(_fn))


def main():
    app()
