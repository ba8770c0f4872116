"""The four tiny seed exports of the loader tests (built once per session, shared by test files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tools.fuzz_loader import SEEDS, make_seeds


def seed_exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.getbasetemp() / "fuzz-seeds"
    seeds = {k: root / k for k in SEEDS}
    if not all((p / "model.onnx").is_file() for p in seeds.values()):
        seeds = make_seeds(root)
    return seeds


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_model(path: Path, edit) -> Path:
    """Rewrite path/model.onnx after `edit(model_proto)` (weights stay where they are)."""
    import onnx

    m = onnx.load(str(path / "model.onnx"), load_external_data=False)
    edit(m)
    (path / "model.onnx").write_bytes(m.SerializeToString())
    return path


def edit_config(path: Path, key: str = "edgellm.config", **changes) -> Path:
    def edit(m):
        for p in m.metadata_props:
            if p.key == key:
                cfg = json.loads(p.value)
                cfg.update(changes)
                p.value = json.dumps(cfg)

    return edit_model(path, edit)


def init(m, name: str):
    return next(t for t in m.graph.initializer if t.name == name)
