"""Resumable checkpoints, written atomically and read without unpickling anything.

Folder layout (one run per folder):

    run.json              what run this is: fingerprint + the fields it hashes (teacher, data, hyper-parameters)
    latest.json           {"step": s, "dir": "step-000000s"}: replaced atomically after a checkpoint is whole
    step-000000s/
        model.safetensors      student weights (full, unsharded; tied weights stored once)
        optimizer.safetensors  optimizer state tensors, keyed "<param name>/<state name>"
        rng.safetensors        torch RNG state of every rank (uint8 tensors), CUDA RNG where used
        state.json             step, samples seen, optimizer param-group scalars, tied-weight aliases
    log.jsonl             the loss curve, one JSON object per step

A checkpoint is written into a temporary folder and renamed into place, then latest.json is
replaced; only after that is the previous checkpoint deleted. A crash or a full disk at any
point leaves latest.json pointing at a complete checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

from ..errors import EdgeLLMError

FORMAT = 1


def fingerprint(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:20]


def model_identity(spec: str) -> dict:
    """A cheap identity for a model spec: config and weight-file headers, sizes (no full hash of GBs)."""
    path = Path(spec)
    files = (
        [path]
        if path.is_file()
        else sorted([*path.glob("*.safetensors"), *path.glob("config.json")])
        if path.is_dir()
        else []
    )
    if not files:
        return {"spec": spec}
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            h.update(fh.read(1 << 20))  # the safetensors header and the first weights
    return {"spec": str(path.resolve()), "files": h.hexdigest()[:16]}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(obj, indent=1) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _dedupe_shared(tensors: dict) -> tuple[dict, dict]:
    """safetensors refuses tensors sharing storage (tied embeddings): keep one, record the aliases."""
    seen, out, aliases = {}, {}, {}
    for name, t in tensors.items():
        key = (
            (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            if t.numel()
            else None
        )
        if key is not None and key in seen:
            aliases[name] = seen[key]
        else:
            if key is not None:
                seen[key] = name
            out[name] = t.detach().contiguous()
    return out, aliases


def _save_tensors(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _load_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise EdgeLLMError(
            f"checkpoint file '{path}' is unreadable ({str(exc).splitlines()[0]}); the checkpoint is damaged"
        ) from None


class CheckpointDir:
    """One run's checkpoint folder (see the module docstring for the layout)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def log_path(self) -> Path:
        return self.path / "log.jsonl"

    def latest_step(self) -> int | None:
        latest = self.path / "latest.json"
        if not latest.is_file():
            return None
        try:
            return int(json.loads(latest.read_text())["step"])
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            raise EdgeLLMError(f"'{latest}' is damaged; the checkpoint folder cannot be resumed") from None

    def check(self, fields: dict, resume: bool, force: bool = False) -> None:
        """Refuse a --resume folder of another run, or a fresh run over an existing one (read-only)."""
        run = self.path / "run.json"
        fp = fingerprint(fields)
        if resume:
            if not run.is_file():
                raise EdgeLLMError(f"--resume '{self.path}' is not a distill checkpoint folder (no run.json)")
            try:
                saved = json.loads(run.read_text())
            except json.JSONDecodeError:
                raise EdgeLLMError(f"'{run}' is damaged; the checkpoint folder cannot be resumed") from None
            if saved.get("fingerprint") != fp:
                old = saved.get("fields", {})
                diff = sorted(
                    k
                    for k in set(old) | set(fields)
                    if json.dumps(old.get(k), sort_keys=True, default=str)
                    != json.dumps(fields.get(k), sort_keys=True, default=str)
                )
                raise EdgeLLMError(
                    f"--resume '{self.path}' is a checkpoint of a different run (differs in: "
                    f"{', '.join(diff) or 'format'}); resume with the same teacher, data and options, or start a new "
                    "run"
                )
            self.latest_step()
        elif self.path.exists() and any(self.path.iterdir()) and not force:
            raise EdgeLLMError(
                f"checkpoint folder '{self.path}' already holds a run; continue it with --resume {self.path}, "
                "or pass --force to start over"
            )

    def claim(self, fields: dict) -> None:
        """Start a fresh run in the folder (after check): write run.json and an empty log."""
        run = self.path / "run.json"
        fp = fingerprint(fields)
        if self.path.exists():
            shutil.rmtree(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            _write_json(run, {"format": FORMAT, "fingerprint": fp, "fields": fields})
        except OSError as exc:
            raise EdgeLLMError(
                f"cannot create checkpoint folder '{self.path}' ({exc.strerror}); choose another --checkpoint-dir"
            ) from None
        self.log_path.write_text("")

    def save(self, step: int, model_state: dict, optim_state: dict, rng: dict, extra: dict) -> None:
        """Write a complete checkpoint for `step`, atomically; on failure the previous one stays valid."""
        final = self.path / f"step-{step:08d}"
        tmp = self.path / f".tmp-step-{step:08d}"
        previous = self.latest_step()
        for stale in self.path.glob(".tmp-step-*"):  # left by a process killed mid-checkpoint
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.mkdir()
            weights, aliases = _dedupe_shared(model_state)
            _save_tensors(weights, tmp / "model.safetensors")
            opt_tensors, opt_scalars = {}, {}
            for pname, st in optim_state["state"].items():
                for k, v in st.items():
                    if hasattr(v, "shape"):
                        opt_tensors[f"{pname}/{k}"] = v.detach().contiguous()
                    else:
                        opt_scalars[f"{pname}/{k}"] = v
            _save_tensors(opt_tensors, tmp / "optimizer.safetensors")
            _save_tensors({k: v.contiguous() for k, v in rng.items()}, tmp / "rng.safetensors")
            state = {
                "format": FORMAT,
                "step": step,
                "aliases": aliases,
                "param_groups": optim_state["param_groups"],
                "optimizer_scalars": opt_scalars,
                **extra,
            }
            _write_json(tmp / "state.json", state)
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_json(self.path / "latest.json", {"step": step, "dir": final.name})
            _fsync_dir(self.path)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            why = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
            kept = (
                f"the previous checkpoint (step {previous}) is intact"
                if previous is not None
                else "no earlier checkpoint exists"
            )
            raise EdgeLLMError(
                f"could not write the checkpoint at step {step} in '{self.path}' ({why}); {kept}: "
                f"free space and continue with --resume {self.path}"
            ) from None
        for old in self.path.glob("step-*"):
            if old.name != final.name:
                shutil.rmtree(old, ignore_errors=True)

    def load(self) -> dict | None:
        """The latest checkpoint as {step, model, optimizer, rng, state}, or None when there is none."""
        step = self.latest_step()
        if step is None:
            return None
        folder = self.path / json.loads((self.path / "latest.json").read_text())["dir"]
        if not (folder / "state.json").is_file():
            raise EdgeLLMError(f"checkpoint '{folder}' is missing; the checkpoint folder is damaged")
        state = json.loads((folder / "state.json").read_text())
        model = _load_tensors(folder / "model.safetensors")
        for alias, name in state["aliases"].items():
            model[alias] = model[name]
        per_param: dict = {}
        for key, value in [
            *_load_tensors(folder / "optimizer.safetensors").items(),
            *state["optimizer_scalars"].items(),
        ]:
            pname, k = key.rsplit("/", 1)
            per_param.setdefault(pname, {})[k] = value
        optim = {"state": per_param, "param_groups": state["param_groups"]}
        return {
            "step": step,
            "model": model,
            "optimizer": optim,
            "rng": _load_tensors(folder / "rng.safetensors"),
            "state": state,
        }

    def read_log(self, upto: int | None = None) -> list[dict]:
        if not self.log_path.is_file():
            return []
        rows = [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]
        return [r for r in rows if upto is None or r["step"] <= upto]

    def truncate_log(self, upto: int) -> None:
        """Drop curve entries past the checkpoint being resumed (they are recomputed)."""
        rows = self.read_log(upto)
        tmp = self.log_path.with_name("log.jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.log_path)

    def append_log(self, row: dict) -> None:
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
