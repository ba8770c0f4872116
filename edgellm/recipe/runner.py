"""Run a checked recipe stage by stage into OUT/, skipping what the lock file says is up to date.

Chaining (what each stage reads):
- prune, quantize, export: the latest model (the recipe's input, or the last prune / distill /
  quantize output);
- draft (`distill --draft-for`): target = the recipe's input model; the stages after it work on
  the draft (quantize and export it again: the recipe's target and its draft);
- distill: teacher = the recipe's input model; student = the latest model when a stage made
  one (Minitron: prune, then heal by distillation), else made from the teacher's layers
  (`student-layers`);
- bench: the latest export (numba) or, before any export, the latest model (torch), plus `with:`;
- eval: the latest model, against `reference` (default: the recipe's input model).

Each stage runs its workflow (edgellm.pipeline), which writes OUT/NN-stage/ through a temporary sibling. A
stage that fails leaves the earlier outputs as they are and is marked failed in the lock; the
next run restarts there, and a distill stage continues from its last checkpoint.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import EdgeLLMError
from . import stages as C
from .lock import Lock, code_version, hash_path, identity, stage_key
from .spec import Recipe, Stage

Event = Callable[[Stage, str, str], None]  # (stage, "skip" | "run" | "resume" | "done" | "failed", detail)


@dataclass
class StageResult:
    stage: Stage
    output: Path
    status: str  # skipped | ran
    seconds: float
    model_in: str  # the model the stage read
    entry: dict = field(default_factory=dict)


def _data_identity(stage: Stage) -> dict:
    data = stage.options.get("data")
    return {"data": identity(data)} if data else {}


def run_recipe(
    recipe: Recipe, out: Path, on_event: Event = lambda s, what, detail: None, hooks: C.Hooks | None = None
) -> list[StageResult]:
    """Run (or skip) every stage; returns one result per stage in order."""
    hooks = hooks or C.Hooks()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = Lock(out)
    version = code_version()
    lock.data.update(recipe=str(recipe.path) if recipe.path else None, model=recipe.model, code_version=version)
    lock.truncate(len(recipe.stages))
    lock.save()

    input_id = identity(recipe.model)
    model, model_id, made_model = recipe.model, input_id, False
    export_dir, export_id = None, None
    results = []
    for stage in recipe.stages:
        outdir = out / stage.dirname
        args, inputs = _plan(stage, recipe, outdir, model, model_id, input_id, made_model, export_dir, export_id)
        options = {k: C.jsonable(v) for k, v in sorted(stage.options.items())}
        stage_version = code_version(stage.command)
        key = stage_key(stage.command, options, inputs, stage_version)
        prev = lock.entry(stage.index)
        entry = {
            "index": stage.index,
            "name": stage.name,
            "command": stage.command,
            "dir": stage.dirname,
            "options": {k: C.jsonable(v) for k, v in stage.keys.items()},
            "resolved_options": options,
            "extra": stage.extra,
            "inputs": inputs,
            "code_version": stage_version,
            "key": key,
        }
        if _current(prev, key, outdir):
            on_event(stage, "skip", "inputs, options and code unchanged")
            results.append(StageResult(stage, outdir, "skipped", 0.0, str(model), prev))
        else:
            if stage.command == "distill":
                args["resume"] = _distill_resume(outdir, prev, key, stage, on_event)
            else:
                on_event(stage, "run", _why(prev, key, outdir))
            seconds = _run_stage(stage, args, entry, lock, hooks, on_event, out, outdir)
            results.append(StageResult(stage, outdir, "ran", seconds, str(model), entry))
        if stage.command in ("prune", "distill", "draft", "quantize"):
            model, model_id, made_model = (
                str(outdir),
                {"spec": stage.dirname, "sha256": lock.entry(stage.index)["output_sha256"]},
                True,
            )
        elif stage.command == "export":
            export_dir, export_id = (
                str(outdir),
                {"spec": stage.dirname, "sha256": lock.entry(stage.index)["output_sha256"]},
            )
    return results


def _current(prev: dict | None, key: str, outdir: Path) -> bool:
    """The stage's last run finished with the same key, and its output is still what it wrote."""
    return bool(
        prev
        and prev.get("key") == key
        and prev.get("status") == "done"
        and outdir.is_dir()
        and hash_path(outdir) == prev.get("output_sha256")
    )


def _run_stage(stage: Stage, args: dict, entry: dict, lock: Lock, hooks, on_event, out: Path, outdir: Path) -> float:
    """Run one stage, recording in the lock that it runs, then how it ended; its seconds."""
    entry.update(status="running", started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    lock.set(stage.index, entry)
    t0 = time.perf_counter()
    try:
        C.run_stage(stage.command, args, stage.options, hooks)
    except BaseException as exc:
        why = "interrupted" if isinstance(exc, KeyboardInterrupt) else (str(exc) or type(exc).__name__)
        entry.update(status="failed", error=why, seconds=round(time.perf_counter() - t0, 2))
        lock.set(stage.index, entry)
        on_event(stage, "failed", why)
        if isinstance(exc, EdgeLLMError):
            raise EdgeLLMError(
                f"stage {stage.index + 1} ({stage.name}) failed: {why}; the earlier stages' outputs "
                f"in '{out}' are kept and the next run restarts at this stage"
            ) from None
        raise  # interrupted, or a bug: the lock says so; the CLI reports it
    seconds = time.perf_counter() - t0
    entry.update(
        status="done",
        seconds=round(seconds, 2),
        output_sha256=hash_path(outdir),
        finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    lock.set(stage.index, entry)
    on_event(stage, "done", f"{seconds:.1f} s")
    return seconds


def _plan(stage: Stage, recipe: Recipe, outdir: Path, model, model_id, input_id, made_model, export_dir, export_id):
    """(the arguments the recipe gives the command, the inputs recorded in the lock) for one stage."""
    tail = {"output": outdir, "force": True}
    data = _data_identity(stage)
    if stage.command == "draft":
        return {"target": recipe.model, **tail}, {"target": input_id, **data}
    if stage.command == "distill":
        args = {"teacher": recipe.model, **tail, "student": model if made_model else None}
        return args, {"teacher": input_id, **({"student": model_id} if made_model else {}), **data}
    if stage.command == "bench":
        from ..modelio import resolve_spec

        first, first_id = (export_dir, export_id) if export_dir else (resolve_spec(model), model_id)
        extra = list(stage.extra.get("with", []))
        return {"variants": [first, *extra], **tail}, {
            "variant": first_id,
            "with": [identity(_variant_path(v)) for v in extra],
            **data,
        }
    if stage.command == "eval":
        ref = stage.options.get("reference") or recipe.model
        return {"model": model, "reference": ref, "output": outdir}, {
            "model": model_id,
            "reference": identity(ref) if ref != recipe.model else input_id,
            **data,
        }
    return {"model": model, **tail}, {"model": model_id, **data}


def _variant_path(spec: str) -> str:
    """The path of a bench variant `PATH[:BACKEND]`."""
    head, sep, _ = spec.rpartition(":")
    return head if sep and head and not Path(spec).exists() else spec


def _why(prev: dict | None, key: str, outdir: Path) -> str:
    if prev is None:
        return "first run"
    if prev.get("status") == "failed":
        return f"failed last time ({prev.get('error', '?')})"
    if prev.get("status") == "running":
        return "was interrupted last time"
    if prev.get("key") != key:
        return "inputs, options or code changed"
    return "its output is missing or was modified"


def _distill_resume(outdir: Path, prev: dict | None, key: str, stage: Stage, on_event: Event) -> Path | None:
    """--resume CKPT when the last attempt of this very stage left a checkpoint; else start clean."""
    from ..distill.checkpoint import CheckpointDir

    ckpt = CheckpointDir(outdir.with_name(outdir.name + ".checkpoints"))
    same = prev is not None and prev.get("key") == key and prev.get("status") in ("failed", "running")
    step = ckpt.latest_step() if same and ckpt.path.is_dir() else None
    if step is not None:
        on_event(stage, "resume", f"from its checkpoint at step {step} ({ckpt.path.name})")
        return ckpt.path
    if ckpt.path.exists():
        shutil.rmtree(ckpt.path)  # a checkpoint of other inputs or options: of no use now
    on_event(stage, "run", _why(prev, key, outdir))
    return None
