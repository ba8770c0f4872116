"""`edgellm.json`: what was done to a model directory (steps, parameters, data, measured quality)."""

from __future__ import annotations

import json
from pathlib import Path

from . import __version__

RECORD_NAME = "edgellm.json"


def read_record(model_dir: Path) -> dict:
    path = Path(model_dir) / RECORD_NAME
    if not path.is_file():
        return {"edgellm_version": __version__, "steps": []}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        from .errors import EdgeLLMError

        raise EdgeLLMError(f"'{path}' is not valid JSON ({exc}); restore it or remove it") from None


def add_step(record: dict, step: str, **fields) -> dict:
    """A copy of `record` with one more step appended."""
    rec = json.loads(json.dumps(record))
    rec["edgellm_version"] = __version__
    rec.setdefault("steps", []).append({"step": step, **fields})
    return rec


def write_record(model_dir: Path, record: dict) -> None:
    (Path(model_dir) / RECORD_NAME).write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
