"""Benchmark ONE variant in this process (run as a subprocess by benchmarks/run.py).

    python -m edgellm.benchmarks.worker JOB.json RESULT.json

Phases, in order (each reported on stderr as a line `@phase NAME` for the progress display):
 import   the engine's libraries (timed apart from the load)
 load     cold: the variant's files are first evicted from the page cache with
          posix_fadvise(POSIX_FADV_DONTNEED) (no root needed), then loaded in this fresh process
 warmup   one full prompt + a few decode steps (JIT compiles, allocations, thread pools)
 pp       `reps` x prefill of `prompt_tokens` tokens from a fresh cache -> tokens/s; time to first
          token = tokenize the prompt + prefill + argmax of the first token
 tg       `reps` x (1-token prefill, then `gen_tokens` greedy decode steps) -> tokens/s of the steps
 memory   peak RSS so far (VmHWM, = getrusage ru_maxrss) covers import + load + speed
 quality  perplexity over the last 10% of the data's text (windows of edgellm.evaluate: fixed
          ctx and stride); the reference variant saves its token ids and log-probs as .npy
          files, the others read them for KL(ref || variant) and top-1 agreement (plain .npy,
          never pickle). Same vocabulary, slightly different pre-tokenizer (llama.cpp vs HF):
          the variant scores the reference's ids, and the row says so.
 speculation  (EXPORT+lookup / EXPORT+DRAFT only) plain vs speculating greedy generation on copy
          tasks and free generation, interleaved: acceptance, mean accepted length, speed-up
          (speculation.py; after the memory reading, so peak RSS is the plain model's)
 reload   warm load time: the same files again, now in the page cache, libraries imported
CPU time (getrusage user+sys) and, where readable, energy counters are taken around pp and tg.
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ENGINE_MODULES = {
    "torch": ("torch", "transformers"),
    "onnxruntime": ("onnxruntime", "tokenizers", "edgellm.runtime.ort_backend"),
    "numba": ("numba", "edgellm.runtime.model"),
    "llama.cpp": ("llama_cpp",),
    "numba-cuda": ("numba", "edgellm.runtime.cuda.model"),
    "ort-genai": ("onnxruntime_genai",),
    "openvino": ("openvino", "openvino_tokenizers"),
}
WARMUP_STEPS = 8
SAME_VOCAB_TOKENS, SAME_VOCAB_RATIO = 512, 0.9  # see same_vocabulary()


def phase(name: str) -> None:
    print(f"@phase {name}", file=sys.stderr, flush=True)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_bytes() -> int:
    """High-water resident set size of this process: VmHWM, else ru_maxrss (KiB on Linux)."""
    from .environment import proc_kib_field

    hwm = proc_kib_field("/proc/self/status", "VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def stats(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": values,
    }


def evict(path: Path) -> int:
    """Drop the variant's files from the page cache (clean pages only). Returns files evicted."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    n = 0
    for f in files:
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


class Clock:
    """Accumulates wall time, CPU time and (if readable) joules over timed regions."""

    def __init__(self, meter):
        self.meter, self.wall, self.cpu, self.joules = meter, 0.0, 0.0, (0.0 if meter.available else None)

    def __enter__(self):
        self._e = self.meter.read()
        self._c = cpu_seconds()
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.last = time.perf_counter() - self._t
        self.wall += self.last
        self.cpu += cpu_seconds() - self._c
        if self.joules is not None:
            self.joules += self.meter.read() - self._e

    def summary(self, tokens: int, cpus: int) -> dict:
        return {"wall_s": self.wall, "cpu_s": self.cpu, "cpus": cpus, "tokens": tokens, "joules": self.joules}


def _quantized_export(path: Path) -> bool:
    """True for an edgellm export (or model directory) whose weights are 4/8-bit."""
    rec = path / "edgellm.json"
    try:
        return bool(json.loads(rec.read_text()).get("quantization")) if rec.is_file() else False
    except (OSError, ValueError):
        return False


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def eval_text(text: str) -> str:
    """The evaluation split by characters (last 10%, from a line start) so that every variant,
    whatever its tokenizer, scores the same text (edgellm.data splits the token stream instead)."""
    cut = int(len(text) * 0.9)
    nl = text.find("\n", cut)
    return text[nl + 1 if 0 <= nl < len(text) - 1 else cut :]


def same_vocabulary(ids: list[int], ref_ids: list[int]) -> bool:
    """True when two tokenizations of the same text come from one vocabulary: at least 90% of the
    first 512 ids align (difflib). Pre-tokenizers that split a whitespace run differently shift a
    few ids; a different vocabulary shares almost none."""
    import difflib

    a, b = ids[:SAME_VOCAB_TOKENS], ref_ids[:SAME_VOCAB_TOKENS]
    return bool(a) and difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() >= SAME_VOCAB_RATIO


def quality(b, ids: list[int], s: dict, ref_dir: Path, is_ref: bool) -> dict:
    from edgellm.evaluate import windows

    ids = ids[: s["eval_tokens"]]
    wins = windows(len(ids), s["ctx"], s["stride"])
    if not wins:
        raise ValueError(f"the evaluation data has {len(ids)} tokens, too few to score")
    ref_ids_path = ref_dir / "ids.npy"
    compare = False
    note = None
    if is_ref:
        np.save(ref_ids_path, np.asarray(ids, np.int64))
    elif ref_ids_path.is_file():
        ref_ids = np.load(ref_ids_path, allow_pickle=False).tolist()
        if ref_ids == ids:
            compare = True
        elif same_vocabulary(ids, ref_ids):
            # Same vocabulary, but the pre-tokenizers split some whitespace differently (e.g.
            # llama.cpp vs HF tokenizers): score the reference's ids so KL compares like with like.
            import difflib

            matched = sum(
                m.size for m in difflib.SequenceMatcher(None, ids, ref_ids, autojunk=False).get_matching_blocks()
            )
            ids, compare = ref_ids, True
            wins = windows(len(ids), s["ctx"], s["stride"])
            note = (
                f"scored on the reference's token ids: this variant's own tokenizer (same vocabulary) gives "
                f"{len(ref_ids) - matched} of the {len(ref_ids)} differently"
            )
        else:
            note = "the tokenizer differs from the reference's: no KL / top-1"
    else:
        note = "the reference variant produced no logits: no KL / top-1"
    nll, kl, agree, count = 0.0, 0.0, 0, 0
    for k, (start, end, first) in enumerate(wins):
        x = ids[start:end]
        logp = log_softmax(b.logits(x)[first:-1])  # predictions for x[first+1:]
        target = np.asarray(x[first + 1 :])
        nll -= logp[np.arange(len(target)), target].sum()
        count += len(target)
        wpath = ref_dir / f"logp_{k:04d}.npy"
        if is_ref:
            np.save(wpath, logp.astype(np.float32))
        elif compare:
            ref = np.load(wpath, mmap_mode="r", allow_pickle=False)
            if ref.shape != logp.shape:
                raise ValueError(
                    f"logits of shape {logp.shape} cannot be compared with the reference's {ref.shape} (different "
                    "vocabulary?)"
                )
            for i in range(0, len(logp), 64):  # chunks keep the float64 temporaries small
                r = np.asarray(ref[i : i + 64], np.float64)
                kl += (np.exp(r) * (r - logp[i : i + 64])).sum()
                agree += int((r.argmax(-1) == logp[i : i + 64].argmax(-1)).sum())
    out = {"perplexity": math.exp(nll / count), "tokens": count, "ctx": s["ctx"], "stride": s["stride"]}
    if compare:
        out.update(kl=kl / count, top1=agree / count)
    if note:
        out["note"] = note
    return out


def run_job(job: dict) -> dict:
    from edgellm.data import load_text
    from edgellm.files import dir_size

    from .backends import make_backend
    from .energy import Meter, usable_cpus

    v, s = job["variant"], job["settings"]
    path, cpus, threads = Path(v["path"]), usable_cpus(), s["threads"]
    res: dict = {"status": "ok", "threads": threads}
    res["size_bytes"] = dir_size(path)

    phase("import")
    t0 = time.perf_counter()
    for mod in ENGINE_MODULES[v["backend"]]:
        __import__(mod)
    import_s = time.perf_counter() - t0

    n_pp, n_tg = s["prompt_tokens"], s["gen_tokens"]
    n_ctx = max(n_pp + min(WARMUP_STEPS, n_tg), n_tg + 1, s["ctx"] if s["quality"] else 0)  # KV positions needed

    phase("load")
    evicted = evict(path)
    b = make_backend(v, threads, n_ctx)
    t0 = time.perf_counter()
    b.load()
    cold_s = time.perf_counter() - t0
    rss_after_load = peak_rss_bytes()
    res["kernels"] = getattr(
        getattr(getattr(b, "impl", None), "model", None), "kernels", None
    )  # numba: the kernel tier that ran
    res["traffic"] = b.traffic() or {
        "bytes_per_token": res["size_bytes"],
        "macs_per_token": None,
        "quantized": v["kind"] == "gguf" or _quantized_export(path),
        "source": "size on disk (the engine gives no count; an upper bound)",
    }

    text = load_text(s.get("data"))
    limit = b.max_context()
    if limit and n_ctx > limit:
        raise ValueError(
            f"the model's context is {limit} tokens: --prompt-tokens {n_pp} / --gen-tokens {n_tg} / ctx {s['ctx']} "
            "must fit"
        )
    # The prompt is the start of the data. Only a prefix is tokenized here: tokenizing the whole
    # corpus would allocate more than a small model and distort peak RSS (quality does it later).
    n_chars = 8 * n_pp
    while True:
        prompt_text = text[:n_chars]
        prompt = b.encode(prompt_text)
        if len(prompt) > n_pp or n_chars >= len(text):
            break
        n_chars *= 2
    prompt = (prompt * (n_pp // max(len(prompt), 1) + 1))[:n_pp]  # tiled if the data is short

    phase("warmup")
    t0 = time.perf_counter()
    logits = b.prefill(prompt)
    np.argmax(logits)
    first_token_s = cold_s + time.perf_counter() - t0  # load + the first prefill and first token (JIT included)
    for _ in range(min(WARMUP_STEPS, n_tg)):
        logits = b.step(int(np.argmax(logits)))
    warmup_s = time.perf_counter() - t0

    meter = Meter()
    pp_clock, tg_clock = Clock(meter), Clock(meter)
    pp_s, ttft_s, tg_s = [], [], []
    for r in range(s["reps"]):
        phase(f"pp {r + 1}/{s['reps']}")
        t0 = time.perf_counter()
        ids = b.encode(prompt_text)[:n_pp]
        t_enc = time.perf_counter() - t0
        ids = ids if len(ids) == n_pp else prompt
        with pp_clock:
            first = int(np.argmax(b.prefill(ids)))
        pp_s.append(pp_clock.last)
        ttft_s.append(t_enc + pp_clock.last)
    for r in range(s["reps"]):
        phase(f"tg {r + 1}/{s['reps']}")
        logits = b.prefill(prompt[:1])
        with tg_clock:
            for _ in range(n_tg):
                logits = b.step(int(np.argmax(logits)))
        tg_s.append(tg_clock.last)
    del first
    res["pp"] = {"tokens": n_pp, "runs_s": pp_s, "tokens_per_s": stats([n_pp / t for t in pp_s])}
    res["tg"] = {"tokens": n_tg, "runs_s": tg_s, "tokens_per_s": stats([n_tg / t for t in tg_s])}
    res["ttft_s"] = stats(ttft_s)
    res["phases"] = {"pp": pp_clock.summary(n_pp * s["reps"], cpus), "tg": tg_clock.summary(n_tg * s["reps"], cpus)}
    res["meter"] = meter.method if meter.available else None
    res["memory"] = {
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_after_load_bytes": rss_after_load,
        "method": "VmHWM of the worker process (= getrusage ru_maxrss) after load + speed phases",
    }

    if v.get("speculate"):  # EXPORT+lookup / EXPORT+DRAFT: plain vs speculating greedy on tasks (speculation.py)
        from .speculation import measure

        phase("speculation")
        res["speculation"] = measure(
            v["path"], v["speculate"], threads, n_tg, s["reps"], on_task=lambda name: phase(f"speculation: {name}")
        )

    if s["quality"]:
        phase("quality")
        res["quality"] = quality(b, b.encode(eval_text(text)), s, Path(job["ref_dir"]), job["is_reference"])
    else:
        res["quality"] = None

    phase("reload")
    b.close()
    del b, logits
    gc.collect()
    b = make_backend(v, threads, n_ctx)
    t0 = time.perf_counter()
    b.load()
    warm_s = time.perf_counter() - t0
    b.close()
    res["load"] = {
        "import_s": import_s,
        "cold_s": cold_s,
        "warm_s": warm_s,
        "warmup_s": warmup_s,
        "first_token_s": first_token_s,
        "cold_method": f"first load in a fresh process after posix_fadvise(DONTNEED) on {evicted} file(s)",
        "warm_method": "second load in the same process, files in the page cache",
    }
    res["memory"]["peak_rss_total_bytes"] = peak_rss_bytes()
    return res


def main(argv: list[str]) -> int:
    job_path, result_path = Path(argv[0]), Path(argv[1])
    job = json.loads(job_path.read_text())
    try:
        res = run_job(job)
        code = 0
    except BaseException as exc:  # the row is marked failed with this error; the report still comes out
        traceback.print_exc(file=sys.stderr)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        res, code = {"status": "failed", "error": f"{type(exc).__name__}: {msg}".rstrip(": ")}, 1
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res))
    os.replace(tmp, result_path)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
