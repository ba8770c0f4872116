"""`edgellm info`: what a model or export directory is."""

from __future__ import annotations

import json
from pathlib import Path

from .common import ModelArg, dir_size, human_bytes, load


def info(model: ModelArg):
    """Print architecture, parameter count, dtype, size on disk and compression applied.

    Example: edgellm info smol-q4/
    """
    from rich.table import Table

    from ..console import out
    from ..modelio import count_parameters, resolve_spec

    if (Path(model) / "model.onnx").is_file():
        return _export_info(Path(model))
    loaded = load(model)
    m, cfg = loaded.model, loaded.model.config
    rec = loaded.record
    table = Table(show_header=False, title=str(model))
    table.add_row("architecture", f"{cfg.model_type} ({type(m).__name__})")
    table.add_row("parameters", f"{count_parameters(m) / 1e6:.2f} M")
    table.add_row("layers / hidden / heads", f"{cfg.num_hidden_layers} / {cfg.hidden_size} / {cfg.num_attention_heads}")
    table.add_row("dtype", str(next(m.parameters()).dtype).replace("torch.", ""))
    table.add_row("size on disk", human_bytes(dir_size(Path(resolve_spec(model)))) if Path(resolve_spec(model)).exists() else "n/a (hub)")
    q = rec.get("quantization")
    table.add_row("quantization", "none" if not q else f"{q['method']} {q['bits']}-bit, group {q['group_size']}, {'sym' if q['sym'] else 'asym'}, embeddings {'quantized' if q['embeddings'] else 'kept'}")
    steps = rec.get("steps", [])
    table.add_row("steps", ", ".join(s["step"] for s in steps) or "none")
    for s in steps:
        if s.get("quality"):
            table.add_row(f"{s['step']} quality", json.dumps(s["quality"].get("after", s["quality"])))
    out.print(table)


def _export_info(path: Path):
    """An export directory: what it holds and the kernel tier the numba runtime would run here."""
    from rich.table import Table

    from ..console import out
    from ..runtime.kernels import tiers
    from ..runtime.loader import open_export

    ex = open_export(path)
    c, q = ex.config, ex.quantization
    table = Table(show_header=False, title=str(path))
    table.add_row("architecture", f"{c.get('architecture')} (export)")
    table.add_row("layers / hidden / heads", f"{c.get('num_layers')} / {c.get('hidden_size')} / {c.get('num_heads')}")
    table.add_row("quantization", "none" if not q else ", ".join(f"{k} {v}" for k, v in q.items()))
    table.add_row("size on disk", human_bytes(ex.size_bytes))
    table.add_row("kernels (numba)", f"{tiers.describe(tiers.best())}; this CPU runs {', '.join(tiers.supported())}")
    ex.close()
    out.print(table)
