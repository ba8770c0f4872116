"""Orchestration: every variant in its own worker subprocess, one after the other, then a report.

Each worker is a fresh `python -m edgellm.benchmarks.worker` so one variant's memory, thread
pools and JIT caches never bleed into the next one's numbers. The first variant is the quality
reference (its log-probs go to a private temporary folder as .npy files). A worker that fails
or crashes (exception, signal, timeout) gives a row with status "failed" and the error; the
others still run and the report still comes out.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .energy import PROFILES, energy_summary

SCHEMA_VERSION = 2  # 2: target 'this' became 'host' (generic unless measured); device estimates


@dataclass
class Settings:
    prompt_tokens: int = 512  # llama-bench's pp512
    gen_tokens: int = 128  # llama-bench's tg128
    reps: int = 5  # median and spread over these, after one warm-up
    threads: int = 0  # 0: every CPU this process may use
    data: str | None = None  # quality data (edgellm.data); None = built-in corpus
    eval_tokens: int = 2048  # tokens of the evaluation split scored for perplexity / KL
    ctx: int = 512  # perplexity context (edgellm.evaluate protocol)
    stride: int = 512
    quality: bool = True
    target: str = "host"  # energy: host (measured, else a generic estimate) or a device profile
    timeout_s: float | None = None  # per variant

    @classmethod
    def quick(cls, **kw) -> "Settings":
        """A smoke run: seconds per variant, not for publishing."""
        base = dict(prompt_tokens=64, gen_tokens=16, reps=2, eval_tokens=256, ctx=128, stride=128)
        base.update(kw)
        return cls(**base)

    def resolved_threads(self) -> int:
        from .energy import usable_cpus

        return self.threads or usable_cpus()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["threads"] = self.resolved_threads()
        d["data"] = self.data or "builtin:pydoc"
        return d


Event = Callable[[int, str, str], None]  # (variant index, label, phase)


def _worker_env() -> dict:
    # Threads are set through each engine's API (torch.set_num_threads, ORT intra_op_num_threads,
    # numba.set_num_threads, llama.cpp n_threads), not OMP_NUM_THREADS: measured here, exporting
    # OMP_NUM_THREADS made torch's decode loop 4x slower on a busy 2-core machine (OpenMP spin-waits).
    env = dict(os.environ)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def worker_command(backend: str) -> list[str]:
    """The worker's command line: this python, or OpenVINO's (its own venv) for `openvino` rows."""
    if backend != "openvino":
        return [sys.executable, "-m", "edgellm.benchmarks.worker"]
    import importlib.util

    import edgellm

    from .ov_backend import ov_python

    runtime = importlib.util.find_spec("edgellm.runtime").submodule_search_locations[0]  # without its __init__
    here = Path(__file__).resolve().parent
    return [ov_python(), str(here / "ov_worker.py"), str(Path(edgellm.__file__).parent), str(here), runtime]


def run_worker(
    variant: dict,
    settings: Settings,
    ref_dir: Path,
    is_reference: bool,
    work: Path,
    on_phase: Callable[[str], None] = lambda p: None,
    prefix: tuple[str, ...] = (),
    env: dict | None = None,
) -> dict:
    """Run one variant in a subprocess; always returns a result dict (status ok or failed).

    `prefix` goes before the worker's command line (the tests wrap it in `/usr/bin/time -v`);
    `env` adds variables to the worker's environment (runtime_decode.py's empty compile cache)."""
    job = {"variant": variant, "settings": settings.to_dict(), "ref_dir": str(ref_dir), "is_reference": is_reference}
    job_path, result_path = work / "job.json", work / "result.json"
    job_path.write_text(json.dumps(job))
    cmd = [*prefix, *worker_command(variant["backend"]), str(job_path), str(result_path)]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env={**_worker_env(), **(env or {})},
    )
    timer = None
    timed_out = threading.Event()
    if settings.timeout_s:

        def kill():
            timed_out.set()
            proc.kill()

        timer = threading.Timer(settings.timeout_s, kill)
        timer.start()
    tail: deque[str] = deque(maxlen=40)
    for line in proc.stdout:
        line = line.rstrip("\n")
        if line.startswith("@phase "):
            on_phase(line[7:])
        elif line.strip():
            tail.append(line)
    code = proc.wait()
    if timer:
        timer.cancel()
    (work / "worker.log").write_text("\n".join(tail) + "\n")
    if result_path.is_file():
        res = json.loads(result_path.read_text())
        if res.get("status") == "ok" and code != 0:
            res = {"status": "failed", "error": f"worker exited with code {code} after writing its result"}
        return res
    if timed_out.is_set():
        return {"status": "failed", "error": f"timed out after {settings.timeout_s:g} s"}
    why = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    last = next((line for line in reversed(tail) if line.strip()), "")
    return {"status": "failed", "error": f"worker {why}" + (f": {last.strip()}" if last else "")}


def make_row(variant, res: dict, settings: Settings) -> dict:
    row = {
        "label": variant.label,
        "spec": variant.spec,
        "path": variant.path,
        "kind": variant.kind,
        "backend": variant.backend,
    }
    if getattr(variant, "speculate", None):
        row["speculate"] = variant.speculate
    row.update(res)
    if res.get("status") == "ok":
        row["energy"] = energy_summary(res["phases"], PROFILES[settings.target], res.get("meter"), res.get("traffic"))
    return row


def run_variants(variants: list, settings: Settings, on_event: Event = lambda i, label, p: None) -> list[dict]:
    rows = []
    root = Path(tempfile.mkdtemp(prefix="edgellm-bench-"))
    try:
        ref_dir = root / "reference"
        ref_dir.mkdir()
        for i, v in enumerate(variants):
            work = root / f"v{i}"
            work.mkdir()
            on_event(i, v.label, "starting")
            res = run_worker(v.to_dict(), settings, ref_dir, i == 0, work, lambda p, i=i, v=v: on_event(i, v.label, p))
            on_event(i, v.label, "done" if res.get("status") == "ok" else "failed")
            rows.append(make_row(v, res, settings))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def build_report(variants: list, settings: Settings, rows: list[dict]) -> dict:
    from .environment import collect

    return {
        "schema": "edgellm.bench.report",
        "schema_version": SCHEMA_VERSION,
        "settings": settings.to_dict(),
        "environment": collect(),
        "energy_profile": PROFILES[settings.target].to_dict(),
        "reference": variants[0].label if variants else None,
        "variants": rows,
    }


def reapply_energy(report: dict, target: str) -> dict:
    """The same report with energy figures for another target profile (measurements unchanged)."""
    rep = json.loads(json.dumps(report))
    rep["settings"]["target"] = target
    rep["energy_profile"] = PROFILES[target].to_dict()
    for row in rep["variants"]:
        if row.get("status") == "ok":
            row["energy"] = energy_summary(row["phases"], PROFILES[target], row.get("meter"), row.get("traffic"))
    return rep
