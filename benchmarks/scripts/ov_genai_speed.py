"""OpenVINO GenAI (`openvino-genai`'s LLMPipeline) as a bench peer: its speed on its own model
folder (`optimum-cli export openvino --weight-format int4 ...`), by the bench worker's protocol
(benchmarks/worker.py: cold load, warm-up, pp reps, tg reps, peak RSS, warm reload).

OpenVINO's exporter (optimum-intel) pins a transformers older than edgellm's, so OpenVINO usually
lives in a venv of its own (tests/peers/openvino.txt says how to make it). Its int4 model:

    OV_VENV/bin/optimum-cli export openvino --model HF_DIR --task text-generation-with-past \
        --weight-format int4 [--group-size-fallback adjust] OUT

(optimum-intel's default for a model it has no entry for: int4 asymmetric, group 128, every
linear layer; embeddings and LM head int8 per channel. A model whose widths 128 does not divide,
such as SmolLM2's 576, fails with nncf's InvalidGroupSizeError unless --group-size-fallback adjust.)

This file is therefore two things:

- run as a script by that venv's python, it measures one model and writes a JSON result. It
  imports only the standard library, numpy and openvino_genai (never edgellm, never torch):

      OV_PYTHON ov_genai_speed.py MODEL_DIR RESULT.json --text PROMPT.txt \\
          [--threads 2] [--tokens 128] [--pp 512] [--reps 3]

- imported (by runtime_decode.py), `measure_ov()` runs that child and returns measure()'s shape.

What is timed (greedy: do_sample off, ignore_eos, token ids in, so no chat template and no
tokenizer in the timed region): pp = one generate() of `pp` prompt tokens and one new token,
wall clock (the time to first token of a pre-tokenized prompt); every pp rep's prompt starts at
a different token, so a prefix cache could not serve it. tg = the `tokens` decode steps after
the first token of a one-token prompt, from the pipeline's own per-token timings
(raw_metrics.m_durations: one per new token after the first, first to last new token). Threads: INFERENCE_NUM_THREADS.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

WARMUP_STEPS = 8
MODEL_XML = "openvino_model.xml"


# ---- the child: runs in OpenVINO's venv ---------------------------------------------------------


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _evict(path: Path) -> int:
    """Drop the model's files from the page cache (as the bench worker does before a cold load)."""
    n = 0
    for f in (p for p in path.rglob("*") if p.is_file()):
        try:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            finally:
                os.close(fd)
        except (OSError, AttributeError):
            pass
    return n


def _child(model: Path, text: str, threads: int, tokens: int, pp: int, reps: int) -> dict:
    t0 = time.perf_counter()
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    import_s = time.perf_counter() - t0
    res: dict = {"status": "ok", "threads": threads, "engine": f"openvino-genai {ov_genai.__version__}"}
    res["size_bytes"] = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())

    def pipeline():
        return ov_genai.LLMPipeline(str(model), "CPU", INFERENCE_NUM_THREADS=threads)

    def run(pipe, ids: list[int], new: int):
        """generate() `new` greedy tokens after `ids`: (wall seconds, perf metrics)."""
        cfg = ov_genai.GenerationConfig()
        cfg.max_new_tokens = cfg.min_new_tokens = new
        cfg.ignore_eos, cfg.do_sample = True, False
        arr = np.asarray([ids], np.int64)
        inputs = ov_genai.TokenizedInputs(ov.Tensor(arr), ov.Tensor(np.ones_like(arr)))
        t = time.perf_counter()
        out = pipe.generate(inputs, cfg)
        wall = time.perf_counter() - t
        got = len(out.tokens[0])
        if got != new:
            raise RuntimeError(f"generate() gave {got} tokens, asked for {new}")
        return wall, out.perf_metrics

    evicted = _evict(model)
    t0 = time.perf_counter()
    pipe = pipeline()
    cold_s = time.perf_counter() - t0
    ids = [int(i) for i in pipe.get_tokenizer().encode(text, add_special_tokens=False).input_ids.data[0]]
    need = pp + reps + 1
    ids = (ids * (need // max(len(ids), 1) + 1))[:need]  # tiled if the text is short

    t0 = time.perf_counter()
    wall, _ = run(pipe, ids[:pp], 1)
    first_token_s = cold_s + wall
    run(pipe, ids[:pp], 1 + min(WARMUP_STEPS, tokens))
    warmup_s = time.perf_counter() - t0

    pp_s, ttft_ov = [], []
    for r in range(reps):
        wall, pm = run(pipe, ids[r + 1 : r + 1 + pp], 1)
        pp_s.append(wall)
        ttft_ov.append(pm.get_ttft().mean / 1e3)
    tg_s = []
    for _ in range(reps):
        _, pm = run(pipe, ids[:1], tokens + 1)
        steps = list(pm.raw_metrics.m_durations)  # microseconds from each new token to the next
        if len(steps) != tokens:
            raise RuntimeError(f"the pipeline timed {len(steps)} decode steps, expected {tokens}")
        tg_s.append(sum(steps) / 1e6)

    res["pp"] = {"tokens": pp, "runs_s": pp_s, "values": [pp / t for t in pp_s], "ov_ttft_s": ttft_ov}
    res["tg"] = {"tokens": tokens, "runs_s": tg_s, "values": [tokens / t for t in tg_s]}
    res["peak_rss_bytes"] = _peak_rss_bytes()
    del pipe
    t0 = time.perf_counter()
    pipe = pipeline()
    warm_s = time.perf_counter() - t0
    del pipe
    res["peak_rss_total_bytes"] = max(res["peak_rss_bytes"], _peak_rss_bytes())
    res["load"] = {
        "import_s": import_s,
        "cold_s": cold_s,
        "warm_s": warm_s,
        "warmup_s": warmup_s,
        "first_token_s": first_token_s,
        "cold_method": f"first load in a fresh process after posix_fadvise(DONTNEED) on {evicted} file(s)",
    }
    return res


def child_main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="OpenVINO GenAI speed on one model folder (a bench peer's child)")
    ap.add_argument("model", type=Path)
    ap.add_argument("result", type=Path)
    ap.add_argument("--text", type=Path, required=True, help="the prompt text (tokenized by the model's tokenizer)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args(argv)
    try:
        res, code = _child(a.model, a.text.read_text(encoding="utf-8"), a.threads, a.tokens, a.pp, a.reps), 0
    except BaseException as exc:  # the row is marked failed with this error
        traceback.print_exc(file=sys.stderr)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        res, code = {"status": "failed", "error": f"{type(exc).__name__}: {msg}".rstrip(": ")}, 1
    tmp = a.result.with_suffix(".tmp")
    tmp.write_text(json.dumps(res))
    os.replace(tmp, a.result)
    return code


# ---- the parent: edgellm's side ------------------------------------------------------------------


def check_peer(model: str, python: str) -> str | None:
    """Why this OpenVINO peer cannot run (one line), or None when it can."""
    if not (Path(model) / MODEL_XML).is_file():
        return (
            f"'{model}' is not an OpenVINO model folder (no {MODEL_XML}); make one with optimum-intel: "
            "optimum-cli export openvino --model HF_DIR --weight-format int4 OUT"
        )
    if not Path(python).is_file():
        return f"--ov-python '{python}' does not exist; give the python of the venv that has openvino-genai"
    probe = subprocess.run([python, "-c", "import openvino_genai"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"'{python}' cannot import openvino_genai; install it there: {python} -m pip install openvino-genai"
    return None


def measure_ov(
    path: str, python: str, text: str, threads: int, tokens: int = 128, pp: int = 512, reps: int = 3
) -> dict:
    """One child process of `python` (OpenVINO's venv) on one model folder: the result in
    _common.measure()'s flat shape (status, tg/pp values and medians, load, peak RSS)."""
    with tempfile.TemporaryDirectory(prefix="edgellm-ov-") as work:
        prompt, result = Path(work) / "prompt.txt", Path(work) / "result.json"
        prompt.write_text(text, encoding="utf-8")
        cmd = [python, __file__, path, str(result), "--text", str(prompt)]
        cmd += ["--threads", str(threads), "--tokens", str(tokens), "--pp", str(pp), "--reps", str(reps)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if not result.is_file():
            last = (run.stderr.strip().splitlines() or [f"exit code {run.returncode}"])[-1]
            return {"status": "failed", "error": last}
        res = json.loads(result.read_text())
    if res["status"] == "ok":
        res.update(
            tg_values=res["tg"]["values"],
            tg_median=statistics.median(res["tg"]["values"]),
            pp_values=res["pp"]["values"],
            pp_median=statistics.median(res["pp"]["values"]),
            first_token_s=res["load"]["first_token_s"],
            peak_rss_mb=res["peak_rss_bytes"] / 2**20,
            peak_rss_total_mb=res["peak_rss_total_bytes"] / 2**20,
        )
    return res


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
