"""The workflow library (edgellm.pipeline): called directly, kept below the CLI, and its options
records in step with the typer commands that fill them in."""

from __future__ import annotations

import ast
import json
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent / "edgellm"
FORBIDDEN = ("edgellm.commands", "edgellm.cli", "typer")


def _imports(path: Path, root: Path = ROOT) -> list[str]:
    """Every module a source file imports, relative imports resolved against its package under `root`."""
    package = ["edgellm", *path.relative_to(root).parent.parts]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            out.append(module)
            out += [f"{module}.{a.name}" for a in node.names]  # `from .. import commands`
    return out


@pytest.mark.parametrize("folder", ["recipe", "pipeline"])
def test_recipe_and_pipeline_never_import_the_cli(folder):
    """cli -> recipe -> pipeline -> library: the arrows point one way."""
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files
    bad = [
        f"{f.relative_to(ROOT.parent)}: {m}"
        for f in files
        for m in _imports(f)
        if any(m == x or m.startswith(x + ".") for x in FORBIDDEN)
    ]
    assert not bad, bad


def test_import_check_sees_relative_imports(tmp_path):
    """The check above resolves `from ..commands import x` and `from .. import cli` (no false pass)."""
    path = tmp_path / "edgellm" / "recipe" / "x.py"
    path.parent.mkdir(parents=True)
    path.write_text("from ..commands.common import load\nfrom .. import cli\nimport typer\n")
    got = set(_imports(path, tmp_path / "edgellm"))
    assert {"edgellm.commands.common", "edgellm.cli", "typer"} <= got, got


def _cli_options(fn) -> dict:
    """{python name: (first long flag, default, min, max, value type)} of a typer command's options."""
    import inspect

    from typer.models import OptionInfo

    from edgellm.pipeline.options import value_type

    hints = typing.get_type_hints(fn, include_extras=True)
    out = {}
    for name, param in inspect.signature(fn).parameters.items():
        info = next((m for m in getattr(hints[name], "__metadata__", ()) if isinstance(m, OptionInfo)), None)
        if info is None:
            continue
        decls = ([info.default] if isinstance(info.default, str) else []) + list(info.param_decls or ())
        flag = next(d.split("/")[0] for d in decls if d.startswith("--"))
        out[name] = (flag, param.default, info.min, info.max, value_type(typing.get_args(hints[name])[0]))
    return out


def test_options_records_match_the_commands():
    """One list of options: the record's fields are the command's options, same flag, default, range, type."""
    import dataclasses

    from edgellm.commands import bench, distill, evaluate, export, prune, quantize
    from edgellm.commands.draft import DRAFT_FLAGS
    from edgellm.pipeline.options import flags
    from edgellm.recipe.stages import COMMANDS

    cli = {
        "prune": prune.prune,
        "distill": distill.distill,
        "draft": distill.distill,  # distill --draft-for
        "quantize": quantize.quantize,
        "export": export.export,
        "bench": bench.bench,
        "eval": evaluate.evaluate,
    }
    for stage, record in COMMANDS.items():
        want = {k: v for k, v in _cli_options(cli[stage]).items() if k not in ("output", "force", "as_json")}
        if stage == "distill":  # the options only --draft-for reads (the "draft" stage's record)
            want = {k: v for k, v in want.items() if k not in DRAFT_FLAGS}
        got = {f.name: (flag.flag, f.default, flag.min, flag.max, kind) for f, flag, kind in flags(record)}
        if stage == "draft":  # a subset of distill's options, with a draft's defaults (not compared)
            got = {k: v[:1] + v[2:] for k, v in got.items()}
            want = {k: v[:1] + v[2:] for k, v in want.items() if k in got}
        assert got == want, stage
        assert all(f.default is not dataclasses.MISSING for f in dataclasses.fields(record))


@pytest.mark.filterwarnings("ignore::edgellm.progress.EdgeLLMWarning")  # few calibration samples, on purpose
def test_quantize_rtn_called_directly(tiny_dirs, tmp_path):
    """The library call, without the CLI: a result record, the packed output and its edgellm.json."""
    from edgellm.pipeline.quantize import Method, QuantizeOptions, run_quantize

    options = QuantizeOptions(
        bits=4, method=Method.rtn, group_size=32, calib_samples=4, seq_len=32, eval_tokens=256, seed=0
    )
    result = run_quantize(str(tiny_dirs["llama"]), tmp_path / "q4", options)
    assert result.output == tmp_path / "q4" and (tmp_path / "q4" / "config.json").is_file()
    assert result.layers and all(r["bits"] == 4 and r["group_size"] == 32 for r in result.layers)
    assert all(0 <= r["rel_error"] < 1 for r in result.layers)
    assert result.info["bits_per_weight"] > 4 and result.seconds >= 0
    assert result.before.tokens == result.after.tokens > 0
    record = json.loads((tmp_path / "q4" / "edgellm.json").read_text())
    assert record["quantization"] == json.loads(json.dumps(result.info))
    assert record["steps"][-1]["params"]["method"] == "rtn"


def test_quantize_bad_options_raise_before_any_work(tiny_dirs, tmp_path):
    from edgellm.errors import EdgeLLMError
    from edgellm.pipeline.quantize import QuantizeOptions, run_quantize

    with pytest.raises(EdgeLLMError, match="--float-zero needs --asym"):
        run_quantize(str(tiny_dirs["llama"]), tmp_path / "q", QuantizeOptions(float_zero=True))
    assert not (tmp_path / "q").exists()


def test_progress_in_a_log_prints_lines(capsys):
    """Without a terminal (nohup, CI) a long track prints a line at every tenth, with the count and
    an ETA, instead of a bar nobody sees; a short one prints nothing."""
    from edgellm.console import PROGRESS

    assert list(PROGRESS.track(range(40), "layers", total=40)) == list(range(40))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 and lines[0].startswith("layers: 4/40 (") and lines[-1].startswith("layers: 40/40 (")
    assert all("eta" in line for line in lines)
    assert list(PROGRESS.track(iter(range(5)), "few", total=5)) == list(range(5))
    assert capsys.readouterr().err == ""
