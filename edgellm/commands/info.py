"""`edgellm info`: what a model or export directory is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .common import ModelArg, dir_size, human_bytes, load_shown


def info(
    model: ModelArg,
    verify: Annotated[
        bool, typer.Option("--verify", help="Export directory: check every file against the sha256 recorded at export.")
    ] = False,
):
    """Print architecture, parameter count, dtype, size on disk and compression applied.

    An export directory (written by 'edgellm export') is described from its metadata, without
    torch; with --verify its files are checked against the sha256 recorded at export.
    Example: edgellm info smol-q4/   or   edgellm info smol-q4-onnx/ --verify
    """
    from rich.table import Table

    from ..console import out
    from ..errors import EdgeLLMError
    from ..modelio import count_parameters, resolve_spec

    if (Path(model) / "model.onnx").is_file():
        return _export_info(Path(model), verify)
    if verify:
        raise EdgeLLMError(f"--verify checks an export directory (with model.onnx); '{model}' is not one")
    loaded = load_shown(model)
    m, cfg = loaded.model, loaded.model.config
    rec = loaded.record
    table = Table(show_header=False, title=str(model))
    table.add_row("architecture", f"{cfg.model_type} ({type(m).__name__})")
    table.add_row("parameters", f"{count_parameters(m) / 1e6:.2f} M")
    table.add_row("layers / hidden / heads", f"{cfg.num_hidden_layers} / {cfg.hidden_size} / {cfg.num_attention_heads}")
    table.add_row("dtype", str(next(m.parameters()).dtype).replace("torch.", ""))
    table.add_row(
        "size on disk",
        human_bytes(dir_size(Path(resolve_spec(model)))) if Path(resolve_spec(model)).exists() else "n/a (hub)",
    )
    q = rec.get("quantization")
    table.add_row(
        "quantization",
        "none"
        if not q
        else f"{q['method']} {q['bits']}-bit, group {q['group_size']}, {'sym' if q['sym'] else 'asym'}, embeddings "
        f"{'quantized' if q['embeddings'] else 'kept'}",
    )
    steps = rec.get("steps", [])
    table.add_row("steps", ", ".join(s["step"] for s in steps) or "none")
    for s in steps:
        if s.get("quality"):
            table.add_row(f"{s['step']} quality", json.dumps(s["quality"].get("after", s["quality"])))
    out.print(table)


def _export_info(path: Path, verify: bool) -> None:
    """An export directory: its metadata after the runtime's full validation (torch-free), and
    the kernel tier the numba runtime would run here."""
    from rich.table import Table

    from ..console import console, out
    from ..runtime.kernels import tiers
    from ..runtime.loader import open_export, verify_files
    from ..runtime.validate import validate_export

    checked = verify_files(path) if verify else None
    ex = open_export(path)
    try:
        cfg = validate_export(ex)
        q = ex.quantization
    finally:
        ex.close()
    table = Table(show_header=False, title=str(path))
    table.add_row("architecture", f"{cfg.architecture} (export format {ex.metadata.get('edgellm.format_version')})")
    table.add_row(
        "layers / hidden / heads (kv)", f"{cfg.num_layers} / {cfg.hidden_size} / {cfg.num_heads} ({cfg.num_kv_heads})"
    )
    table.add_row("vocabulary / context", f"{cfg.vocab_size} / {cfg.max_position_embeddings}")
    table.add_row(
        "quantization",
        "none"
        if not q
        else f"{q.get('bits')}-bit, group {q.get('group_size')}, "
        f"{'sym' if q.get('sym') else 'asym'}, {q.get('format', 'matmulnbits')}",
    )
    table.add_row("size on disk", human_bytes(dir_size(path)))
    table.add_row("kernels (numba)", f"{tiers.describe(tiers.best())}; this CPU runs {', '.join(tiers.supported())}")
    out.print(table)
    if checked is not None:
        console.print(
            f"verified: {len(checked)} files match the sha256 recorded at export ({', '.join(checked)})", soft_wrap=True
        )
