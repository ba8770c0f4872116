"""ONNX Runtime on edgellm exports vs ONNX Runtime's own MatMulNBits quantizer, side by side.

    python -m edgellm.benchmarks.scripts.export_ort \\
        --export fp32=FP32_EXPORT_DIR --export q8=Q8_EXPORT_DIR --export q4=Q4_EXPORT_DIR \\
        --ort-q4-from fp32 --work WORK_DIR

Run it alone (nothing else busy on the machine).

For every variant: file sizes, greedy decode tokens/s (ORT, `--threads` intra-op threads,
`--tokens` new tokens after a short prompt, `--reps` repetitions interleaved across variants so
machine drift hits all alike; median and min-max), and perplexity over `--eval-tokens` held-out
tokens of the built-in corpus (edgellm.evaluate's protocol: last 10% of the token stream,
non-overlapping windows of `--ctx`, every token scored once), computed from ORT's logits.

`--ort-q4-from NAME` adds "ort-q4": ONNX Runtime's MatMulNBitsQuantizer (block 32, symmetric,
accuracy_level 4, MatMul only: its default) applied to that float export. The quantizer only
rewrites MatMuls whose weight is an initializer, so the constant Transposes in front of our
[out, in] weights are folded first (what ORT's own constant folding does at load).
Prints a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

PROMPT = (
    "<|im_start|>user\nWrite a short Python function that checks whether a number is prime.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path / "model.onnx"), so, providers=["CPUExecutionProvider"])


def _feed(sess, ids: np.ndarray, past: dict | None, start: int) -> dict:
    b, s = ids.shape
    feed = {
        "input_ids": ids,
        "attention_mask": np.ones((b, start + s), np.int64),
        "position_ids": np.arange(start, start + s, dtype=np.int64)[None].repeat(b, 0),
    }
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feed[i.name] = past[i.name] if past else np.zeros((b, i.shape[1], 0, i.shape[3]), np.float32)
    return feed


def decode(sess, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """Greedy: prompt, then n single-token steps through the cache. Returns (decode tok/s, tokens)."""
    outs = [o.name for o in sess.get_outputs()]
    past_names = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    res = dict(zip(outs, sess.run(None, _feed(sess, np.array([prompt], np.int64), None, 0))))
    ids = list(prompt)
    t0 = time.perf_counter()
    for _ in range(n):
        nxt = int(np.argmax(res["logits"][0, -1]))
        ids.append(nxt)
        past = {p: res[p.replace("past_key_values.", "present.")] for p in past_names}
        res = dict(zip(outs, sess.run(None, _feed(sess, np.array([[nxt]], np.int64), past, len(ids) - 1))))
    return n / (time.perf_counter() - t0), ids[len(prompt) :]


def perplexity(sess, ids: np.ndarray, ctx: int) -> float:
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, ctx):
        x = ids[start : start + ctx]
        if len(x) < 2:
            break
        logits = sess.run(["logits"], _feed(sess, x[None], None, 0))[0][0, :-1].astype(np.float64)  # (T-1, V)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        nll -= logp[np.arange(len(x) - 1), x[1:]].sum()
        count += len(x) - 1
    return float(np.exp(nll / count))


def fold_transposes(model):
    """Replace Transpose(initializer) by a transposed initializer (what ORT folds at load)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            w = numpy_helper.to_array(inits[node.input[0]])
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            model.graph.initializer.append(
                numpy_helper.from_array(np.ascontiguousarray(w.transpose(perm)), node.output[0])
            )
            continue
        keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    used = {i for n in model.graph.node for i in n.input}
    survivors = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(survivors)
    return model


def ort_quantize(src: Path, dst: Path) -> float:
    """ONNX Runtime's MatMulNBitsQuantizer (4-bit, block 32, symmetric, accuracy_level 4) on src."""
    import shutil

    import onnx

    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError:  # older ONNX Runtime
        from onnxruntime.quantization.matmul_4bits_quantizer import MatMul4BitsQuantizer as MatMulNBitsQuantizer

    t0 = time.perf_counter()
    model = fold_transposes(onnx.load(str(src / "model.onnx")))
    q = MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=True, accuracy_level=4)
    q.process()
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".json" or f.name.startswith("tokenizer"):
            shutil.copy(f, dst / f.name)
    q.model.save_model_to_file(str(dst / "model.onnx"), use_external_data_format=True)
    return time.perf_counter() - t0


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.name.startswith("model.onnx")) / 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", action="append", required=True, help="NAME=DIR of an edgellm export (repeat)")
    ap.add_argument("--ort-q4-from", help="NAME of a float export to quantize with ONNX Runtime's MatMulNBitsQuantizer")
    ap.add_argument("--work", type=Path, help="where the ORT-quantized model is written (needed by --ort-q4-from)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=512)
    args = ap.parse_args(argv)
    if args.ort_q4_from and args.work is None:
        ap.error("--ort-q4-from needs --work DIR (where the ORT-quantized model is written)")

    variants = dict(e.split("=", 1) for e in args.export)
    variants = {k: Path(v) for k, v in variants.items()}
    notes = {}
    if args.ort_q4_from:
        dst = args.work / "ort-q4"
        if not (dst / "model.onnx").is_file():
            notes["ort-q4"] = f"quantized in {ort_quantize(variants[args.ort_q4_from], dst):.1f} s"
        variants["ort-q4"] = dst

    from transformers import AutoTokenizer

    from edgellm.data import builtin_text, split_tokens, token_ids

    tok = AutoTokenizer.from_pretrained(str(next(iter(variants.values()))))
    prompt = tok(PROMPT, add_special_tokens=False)["input_ids"]
    eval_ids = split_tokens(token_ids(tok, builtin_text()), "eval")[: args.eval_tokens].numpy()

    sessions = {k: session(p, args.threads) for k, p in variants.items()}
    for s in sessions.values():  # warm-up: first-run allocations and prepacking
        decode(s, prompt, 8)
    speeds = {k: [] for k in variants}
    tokens = {}
    for _ in range(args.reps):  # interleaved: drift on a shared machine hits every variant alike
        for k, s in sessions.items():
            tps, toks = decode(s, prompt, args.tokens)
            speeds[k].append(tps)
            tokens[k] = toks
    ppl = {k: perplexity(s, eval_ids, args.ctx) for k, s in sessions.items()}

    ref = "ort-q4" if "ort-q4" in variants else next(iter(variants))
    ref_tps = statistics.median(speeds[ref])
    first = next(iter(variants))
    print(
        f"\nONNX Runtime decode, {args.threads} threads, greedy, {args.tokens} new tokens after a {len(prompt)}-token "
        "prompt, "
        f"{args.reps} reps (median, min-max); perplexity over {len(eval_ids)} held-out builtin-corpus tokens, ctx "
        f"{args.ctx}\n"
    )
    print(
        f"| variant | model.onnx(+data) MB | decode tok/s | vs {ref} | perplexity | greedy tokens equal to {first}'s "
        "(prefix) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for k in variants:
        med = statistics.median(speeds[k])
        same = next((i for i, (a, b) in enumerate(zip(tokens[k], tokens[first])) if a != b), len(tokens[first]))
        print(
            f"| {k} | {size_mb(variants[k]):.1f} | {med:.1f} ({min(speeds[k]):.1f}-{max(speeds[k]):.1f}) | "
            f"{med / ref_tps:.2f}x | "
            f"{ppl[k]:.3f} | {same}/{len(tokens[first])} |"
        )
    for k, v in notes.items():
        print(f"\n{k}: {v}")


if __name__ == "__main__":
    main()
