"""GPU speed and energy of the runtime's CUDA path, side by side with transformers in the same run.

    python -m edgellm.benchmarks.gpu_bench EXPORT... -o gpu.json [--prompt-tokens 512]
        [--gen-tokens 128] [--reps 3] [--peers] [--parity 32]

Per export (batch 1, greedy, like `edgellm bench`): load, warm-up, pp (prompt tokens/s),
tg (generated tokens/s over `gen_tokens` decode steps after a 1-token prefill), and the GPU's
energy over the tg phase from NVML's total-energy counter (pynvml): J/token labelled
*measured*, or absent when NVML is not readable (never estimated here). `--parity N`: the CPU
runtime on the same file, greedy tokens compared for N steps and the first logits' gap.
`--peers`: transformers on the same shapes and random weights, fp16 eager (and bitsandbytes NF4
and int8 where bitsandbytes is installed), the same protocol. Rows are JSON; a Markdown table
goes to stdout. Run it on a quiet GPU (the NVML counter is the whole board).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

PARITY_PROMPT = 16  # tokens of the parity check's prompt


class Skip(Exception):
    """A peer that cannot run on this machine (no CUDA torch, no bitsandbytes): a skipped row."""


def _meter():
    from .energy import Meter

    m = Meter(rapl_root="/nonexistent")  # the GPU board only: NVML
    return m if m.nvml else None


def _phase(meter, fn):
    e0 = meter.read() if meter else None
    t0 = time.perf_counter()
    n = fn()
    dt = time.perf_counter() - t0
    joules = meter.read() - e0 if meter else None
    return n, dt, joules


def _summary(name, pp, tg, extra) -> dict:
    row = {
        "variant": name,
        "pp_tokens_per_s": statistics.median(r[0] / r[1] for r in pp),
        "tg_tokens_per_s": statistics.median(r[0] / r[1] for r in tg),
        "pp_runs": pp,
        "tg_runs": tg,
    }
    js = [r[2] / r[0] for r in tg if r[2] is not None]
    if js:
        row["tg_j_per_token"] = statistics.median(js)
        row["energy"] = "measured (NVML nvmlDeviceGetTotalEnergyConsumption, whole GPU board, over the tg phase)"
    row.update(extra)
    return row


def bench_export(path: Path, a, meter) -> dict:
    from edgellm.runtime.cuda.model import CudaModel

    t0 = time.perf_counter()
    m = CudaModel(path, n_ctx=a.prompt_tokens + a.gen_tokens + 8 + (PARITY_PROMPT + a.parity if a.parity else 0))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    m.warmup()
    warm_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    ids = rng.integers(1, m.config.vocab_size, a.prompt_tokens).astype(np.int64)

    def pp():
        m.reset()
        m.forward(ids)
        return a.prompt_tokens

    def tg():
        m.reset()
        logits = m.forward(ids[:1])
        for _ in range(a.gen_tokens):
            logits = m.forward([int(logits.argmax())])
        return a.gen_tokens

    pp_runs = [_phase(meter, pp) for _ in range(a.reps)]
    tg_runs = [_phase(meter, tg) for _ in range(a.reps)]
    extra = {
        "backend": "numba-cuda",
        "decode_mode": m.decode_mode,
        "kernels": m.kernels,
        "grid_blocks": m._coop_grid,
        "threads_per_block": m.tpb,
        "load_s": load_s,
        "warmup_s": warm_s,
        "device_mib": m.device_bytes / 2**20,
        "weight_mib_per_token": m.bytes_per_token / 2**20,
    }
    if a.parity:
        extra["parity"] = parity(path, m, a.parity)
    m.close()
    return _summary(f"{path.name}:numba-cuda", pp_runs, tg_runs, extra)


def parity(path: Path, gm, steps: int) -> dict:
    """Greedy tokens of the CUDA path vs the CPU runtime on the same file, and the first logits' gap."""
    from edgellm.runtime.model import NumbaModel

    cm = NumbaModel(path, n_ctx=PARITY_PROMPT + steps + 8)
    prompt = np.arange(1, PARITY_PROMPT + 1, dtype=np.int64) * 37 % gm.config.vocab_size
    seqs, first = [], []
    for m in (gm, cm):
        m.reset()
        logits = m.forward(prompt)
        first.append(logits)
        ids = []
        for _ in range(steps):
            ids.append(int(logits.argmax()))
            logits = m.forward([ids[-1]])
        seqs.append(ids)
    same = next((i for i, (x, y) in enumerate(zip(*seqs)) if x != y), steps)
    cm.close()
    return {
        "steps": steps,
        "identical_prefix": same,
        "first_logits_max_abs_diff": float(np.abs(first[0] - first[1]).max()),
        "first_logits_scale": float(np.abs(first[1]).max()),
    }


def bench_transformers(path: Path, a, meter, quant: str | None) -> dict:
    """transformers on the export's shapes (random weights), fp16 eager or bitsandbytes NF4 / int8."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from edgellm.runtime.loader import open_export

    if not torch.cuda.is_available():
        raise Skip("torch has no CUDA device here")
    if quant and importlib.util.find_spec("bitsandbytes") is None:
        raise Skip("bitsandbytes is not installed (pip install 'edgellm[gpu]')")

    c = open_export(path).config
    cfg = LlamaConfig(
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_layers"],
        num_attention_heads=c["num_heads"],
        num_key_value_heads=c["num_kv_heads"],
        vocab_size=c["vocab_size"],
        max_position_embeddings=c["max_position_embeddings"],
        tie_word_embeddings=bool(c.get("tie_word_embeddings")),
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    if quant:
        from transformers import BitsAndBytesConfig

        qc = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16)
            if quant == "nf4"
            else BitsAndBytesConfig(load_in_8bit=True)
        )
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            model = AutoModelForCausalLM.from_pretrained(
                tmp, quantization_config=qc, dtype=torch.float16, device_map="cuda"
            )
    else:
        model = model.to("cuda")
    model.eval()
    ids = torch.randint(1, cfg.vocab_size, (1, a.prompt_tokens), device="cuda")

    @torch.inference_mode()
    def pp():
        model(input_ids=ids, use_cache=True)
        torch.cuda.synchronize()
        return a.prompt_tokens

    @torch.inference_mode()
    def tg():
        out = model(input_ids=ids[:, :1], use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(a.gen_tokens):
            out = model(input_ids=tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        return a.gen_tokens

    pp(), tg()  # warm-up
    pp_runs = [_phase(meter, pp) for _ in range(a.peer_reps)]
    tg_runs = [_phase(meter, tg) for _ in range(a.peer_reps)]
    name = f"{path.name}:transformers-{quant or 'fp16'}"
    model = None  # free its GPU memory before the next row
    torch.cuda.empty_cache()
    return _summary(
        name, pp_runs, tg_runs, {"backend": f"transformers {'bitsandbytes ' + quant if quant else 'fp16 eager'}"}
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_bench", description=__doc__.splitlines()[0])
    ap.add_argument("exports", nargs="+", type=Path)
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--peer-reps", type=int, default=2, help="repetitions of the transformers rows (slow: int8 bitsandbytes)"
    )
    ap.add_argument("--peers", action="store_true")
    ap.add_argument("--parity", type=int, default=0)
    a = ap.parse_args(argv)
    meter = _meter()
    rows = []
    for path in a.exports:
        runs = [("cuda", None)] + ([("hf", None), ("hf", "nf4"), ("hf", "int8")] if a.peers else [])
        for kind, quant in runs:
            label = f"{path.name}:{'numba-cuda' if kind == 'cuda' else 'transformers-' + (quant or 'fp16')}"
            print(f"@ {label}", file=sys.stderr, flush=True)
            try:
                row = bench_export(path, a, meter) if kind == "cuda" else bench_transformers(path, a, meter, quant)
            except Skip as exc:
                row = {"variant": label, "status": "skipped", "reason": str(exc)}
            except Exception as exc:  # one failed row (no bitsandbytes, OOM, ...) must not lose the others
                row = {"variant": label, "status": "failed", "error": f"{type(exc).__name__}: {str(exc).strip()[:300]}"}
            rows.append(row)
            a.output.write_text(json.dumps({"meter": meter.method if meter else None, "rows": rows}, indent=1))
    print("| variant | pp tok/s | tg tok/s | J/token (tg, NVML measured) | notes |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        if r.get("status") in ("failed", "skipped"):
            print(f"| {r['variant']} | - | - | - | {r['status']}: {r.get('error', r.get('reason', ''))[:100]} |")
            continue
        j = f"{r['tg_j_per_token']:.4f}" if "tg_j_per_token" in r else "n/a (no NVML)"
        note = r.get("decode_mode", r.get("backend", ""))
        if "parity" in r:
            p = r["parity"]
            note += (
                f"; greedy = CPU for {p['identical_prefix']}/{p['steps']} steps, first-logit gap "
                f"{p['first_logits_max_abs_diff']:.3g} of {p['first_logits_scale']:.3g}"
            )
        print(f"| {r['variant']} | {r['pp_tokens_per_s']:.1f} | {r['tg_tokens_per_s']:.1f} | {j} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
