"""The cost of a structured-output token mask per decode step, llguidance vs xgrammar, beside
the decode step it rides on (issue 28: goal mask <= 10% of the step at 135M).

    python -m edgellm.benchmarks.scripts.constrain_mask smol-q4-onnx/ --threads 2

For each grammar the same token sequence is replayed through each library: the tokens of a
valid document (the model's own tokenization), each step computing the mask, applying it to a
(V,) float32 logits row (-inf where disallowed), and advancing by the token. The decode step is
`model.forward` of one token after a short prompt, on the same export, in the same process.
xgrammar is timed for its mask alone (it imports torch and transformers, so the runtime cannot
use it); both masks are applied with the same numpy code.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "score", "role", "tags", "address"],
    "additionalProperties": False,
}
DOC = {
    "name": "Ada Lovelace",
    "age": 36,
    "score": 0.875,
    "role": "admin",
    "tags": ["math", "engines", "poetry"],
    "address": {"city": "London", "zip": "01234"},
}
CASES = {
    "json_schema (nested, enum, array, bounds)": (SCHEMA, json.dumps(DOC, indent=2)),
    "json_object (any object)": ({"type": "object"}, json.dumps({**DOC, "extra": [1, 2, {"k": None}]})),
}


def apply_mask(bits: np.ndarray, logits: np.ndarray) -> None:
    """The runtime's way (runtime/constrain.py Constraint.mask): unpack, then -inf where 0."""
    ok = np.unpackbits(bits.view(np.uint8), count=logits.size, bitorder="little").view(bool)
    np.copyto(logits, -np.inf, where=~ok)


def time_llguidance(gen, vocab: int, schema, ids) -> dict:
    from edgellm.runtime.constrain import compile_grammar

    t0 = time.perf_counter()
    g = compile_grammar(gen.tokenizer, vocab, gen.eos_ids, "json_schema", schema)
    compile_s = time.perf_counter() - t0
    c = g.start()
    logits = np.zeros(vocab, np.float32)
    mask_us, apply_us = [], []
    for t in ids:
        t0 = time.perf_counter()
        c.matcher.unsafe_compute_mask_ptr(c._bits.ctypes.data, c._bits.nbytes)
        t1 = time.perf_counter()
        apply_mask(c._bits, logits)
        t2 = time.perf_counter()
        assert np.isfinite(logits[t]), "the document's token was masked"
        logits[:] = 0
        c.advance(t)
        mask_us.append((t1 - t0) * 1e6)
        apply_us.append((t2 - t1) * 1e6)
    return {"compile_ms": compile_s * 1e3, "mask_us": mask_us, "apply_us": apply_us}


def time_xgrammar(tokenizer_json: str, vocab: int, schema, ids) -> dict:
    import torch
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=tokenizer_json)
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=True)
    compile_s = time.perf_counter() - t0
    m = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab)  # torch int32 (1, V/32)
    logits = np.zeros(vocab, np.float32)
    mask_us, apply_us = [], []
    for t in ids:
        t0 = time.perf_counter()
        m.fill_next_token_bitmask(bitmask)
        t1 = time.perf_counter()
        apply_mask(bitmask[0].numpy(), logits)
        t2 = time.perf_counter()
        assert np.isfinite(logits[t]), "the document's token was masked"
        logits[:] = 0
        assert m.accept_token(t)
        mask_us.append((t1 - t0) * 1e6)
        apply_us.append((t2 - t1) * 1e6)
    del torch
    return {"compile_ms": compile_s * 1e3, "mask_us": mask_us, "apply_us": apply_us}


def decode_step_ms(gen, steps: int) -> list[float]:
    m = gen.model
    m.truncate(0)
    m.forward(np.array(gen.tokenizer.encode("The capital of France is"), np.int64))
    out = []
    tok = 260
    for _ in range(steps):
        t0 = time.perf_counter()
        tok = int(np.argmax(m.forward(np.array([tok], np.int64))))
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="export directory (e.g. SmolLM2-135M 4-bit)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3, help="replays of each document (medians over all)")
    args = ap.parse_args()

    from edgellm.runtime import load

    gen = load(args.model, threads=args.threads, n_ctx=256)
    vocab = gen.model.config.vocab_size
    step = sorted(decode_step_ms(gen, args.steps))
    step_ms = statistics.median(step)
    print(f"decode step ({args.model}, {args.threads} threads): median {step_ms:.2f} ms over {args.steps} steps")
    rows = []
    for name, (schema, doc) in CASES.items():
        ids = gen.tokenizer.encode(doc, special=False)
        for lib, fn in (
            ("llguidance", lambda: time_llguidance(gen, vocab, schema, ids)),
            ("xgrammar", lambda: time_xgrammar(str(gen.tokenizer.path), vocab, schema, ids)),
        ):
            runs = [fn() for _ in range(args.reps)]
            mask = [x for r in runs for x in r["mask_us"]]
            apply = [x for r in runs for x in r["apply_us"]]
            total = statistics.median([a + b for a, b in zip(mask, apply)])
            rows.append(
                (
                    name,
                    lib,
                    len(ids),
                    statistics.median(r["compile_ms"] for r in runs),
                    statistics.median(mask),
                    float(np.percentile(mask, 95)),
                    statistics.median(apply),
                    total,
                    100 * total / 1e3 / step_ms,
                )
            )
    # end to end: the generator's decode rate with and without a grammar (chat prompt, greedy)
    from edgellm.runtime import Sampling

    ids = gen.tokenizer.encode(
        gen.tokenizer.apply_chat_template([{"role": "user", "content": "Describe Ada Lovelace as JSON."}]),
        special=False,
    )
    rates = {}
    for label, grammar in (("free", None), ("json_schema", gen.grammar("json_schema", SCHEMA))):
        runs = []
        for _ in range(args.reps):
            p = Sampling(temperature=0, max_new_tokens=64, grammar=grammar, ignore_eos=grammar is None)
            "".join(gen.stream(ids, p))
            runs.append((gen.stats.gen_rate, gen.stats.gen_tokens))
        rates[label] = (statistics.median(r[0] for r in runs), runs[0][1])
    for label, (rate, n) in rates.items():
        print(f"generation {label}: {rate:.1f} tokens/s ({n} tokens, median of {args.reps})")
    print(f"  per token: {1e3 / rates['json_schema'][0] - 1e3 / rates['free'][0]:+.2f} ms with the grammar")
    print(f"\nvocabulary {vocab} tokens; per token: mask = the library's bitmask, apply = -inf into the logits")
    print(
        "| grammar | library | tokens | compile ms | mask µs p50 | mask µs p95 | apply µs p50 | total µs p50 "
        "| % of step |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.0f} | {r[5]:.0f} | {r[6]:.0f} | {r[7]:.0f} "
            f"| {r[8]:.1f}% |"
        )


if __name__ == "__main__":
    main()
