"""Tiny-model parity across machines: the x86 run writes exports and what its runtime computed;
an aarch64 run (scripts/test-arm64.sh, under qemu-user) reads them and must agree.

    python scripts/arm64_parity.py reference OUT   # x86, needs torch (the compress extra)
    python scripts/arm64_parity.py check REF       # any machine, device install only (no torch)
    python scripts/arm64_parity.py describe        # the CPU numba compiles for, HWCAP, the tier

Each case is a tiny seeded model (tests/tiny.py), quantized with `edgellm quantize` and exported
with `edgellm export`. The reference records, on the x86 runtime, the prompt's logits (all
positions) and a greedy decode of DECODE tokens with each step's logits. `check` runs the same
prompt, feeds x86's tokens (so logits stay comparable) and requires: the same greedy choice at
every step where x86's top-2 margin exceeds twice the tolerance, and every logit within
the runtime's tolerance (tests/test_runtime.py's contract: 1e-3 for float weights, 3% of
max|logit| for quantized ones, whose int8 activation rounding may differ by one step where float
sums round differently). It prints one line per case and exits 1 if any case fails.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROMPT = [5, 17, 100, 3, 77, 250, 9, 11, 400, 12, 33, 7, 64, 128, 2, 300, 45]
DECODE = 16
N_CTX = 64
# family: initializer_range. Random tiny models are nearly uniform: at the default 0.02 a llama's
# greedy top-2 margin fell to 1e-3 of its logit scale, where float summation order alone may pick
# the other token. These ranges gave the largest margins of 0.02/0.05/0.1/0.2 (llama: 0.036 on
# max|logit| 2.2; gpt2: 0.096 on 0.9), so a token that differs points at a kernel, not at rounding.
INIT = {"llama": 0.1, "gpt2": 0.02, "gemma3_text": 0.1}
# name: (family, quantize arguments or None for float weights)
CASES = {
    "llama-f32": ("llama", None),
    "llama-q4-sym-g32": ("llama", ["--bits", "4", "--group-size", "32", "--sym"]),
    "llama-q8-asym-g16": ("llama", ["--bits", "8", "--group-size", "16", "--asym"]),
    "gpt2-q4-asym-g64": ("gpt2", ["--bits", "4", "--group-size", "64", "--asym"]),
    "gemma3-q4-sym-g32": ("gemma3_text", ["--bits", "4", "--group-size", "32", "--sym"]),
}
# Gemma 3 (tests/tiny.py: window 6, three sliding layers and a global one): a 34-token prompt read
# in two prompt-kernel chunks of 17, so each ring holds 6 + 17 - 1 = 22 rows and wraps from
# position 22 on (the default chunk of 128 would give no ring at this context at all)
CHUNK = {"gemma3_text": 17}
PROMPTS = {"gemma3_text": PROMPT + PROMPT[::-1]}
# the batched step (`serve --parallel`) is checked on the quantized cases with an fp16 KV cache of
# these families: one compile of it per machine (a float case's fp32 cache is another)
SLOTS = {"llama-q4-sym-g32", "gemma3-q4-sym-g32"}
SLOT_STEPS = 6  # decode steps per slot in the batched check


def tolerance(quantized: bool, ref_logits: np.ndarray) -> float:
    return 0.03 * float(np.abs(ref_logits).max()) if quantized else 1e-3


def greedy(model, prompt, steps: int, forced=None):
    """Prompt logits (T, V), then `steps` greedy tokens and each step's logits (steps, V).
    With `forced`, the given tokens are fed instead of the model's own choices (the choices are
    still returned), so logits stay comparable after a first disagreement."""
    model.reset()
    first = model.forward(np.asarray(prompt, np.int64), all_logits=True)
    tokens, logits, last = [], [], first[-1]
    for i in range(steps):
        tokens.append(int(last.argmax()))
        last = model.forward([tokens[-1] if forced is None else forced[i]])
        logits.append(last)
    return first, tokens, np.stack(logits)


def open_model(path, n_ctx: int, chunk: int | None):
    """NumbaModel reading prompts in chunks of `chunk` tokens (None: the runtime's default), which
    sizes the sliding layers' rings."""
    import edgellm.runtime.model as M

    default = M.PROMPT_CHUNK
    M.PROMPT_CHUNK = chunk or default
    try:
        return M.NumbaModel(path, n_ctx=n_ctx, threads=2)
    finally:
        M.PROMPT_CHUNK = default


def same_machine(model, prompt, tokens, steps, slots: bool) -> list[str]:
    """This machine's runtime against itself, bit for bit (see the module docstring); `tokens`
    were fed after `prompt` and gave `steps` (DECODE, V). The failures, one line each."""
    bad = []
    for k in (2, len(tokens)):
        model.truncate(len(prompt))
        if model.pos != len(prompt):
            bad.append(f"verify: truncate to {len(prompt)} forgot the cache (pos {model.pos})")
            break
        rows = model.forward(np.asarray(tokens[:k], np.int64), all_logits=True)
        if not np.array_equal(rows, steps[:k]):
            bad.append(
                f"verify: {k} tokens in one call differ from {k} decode steps by {np.abs(rows - steps[:k]).max():.3g}"
            )
    if not slots:
        return bad
    from edgellm.runtime.batched import SlotCaches

    # a second prompt, whose chunks exceed FEW_TOKENS as the first's do: the one-at-a-time path runs a
    # chunk of 16 tokens or fewer through the decode kernels, which round differently from the
    # batched step's prompt kernels (README: a known difference, not checked here)
    other = [int(i) for i in prompt[::-1]]
    alone = []  # per slot: its decode tokens and the logits after its prompt and after each of them
    for p, toks in ((prompt, list(tokens[:SLOT_STEPS])), (other, None)):
        first, own, st = greedy(model, p, SLOT_STEPS, forced=toks)
        alone.append((toks or own, np.concatenate([first[-1:], st[:-1]])))
    sc = SlotCaches(model, 2)
    got = [[], []]
    seq = [(0, np.asarray(prompt, np.int64), True, True)]  # slot 0 reads its prompt
    out = sc.step(seq)
    got[0].append(out[0])
    for i in range(SLOT_STEPS):  # step 0: slot 0 decodes beside slot 1's prompt; then both decode
        seg1 = (1, np.asarray(other, np.int64), True, True) if i == 0 else (1, alone[1][0][i - 1 : i], True, False)
        out = sc.step([(0, np.asarray(alone[0][0][i : i + 1], np.int64), True, False), seg1])
        got[0].append(out[0])
        got[1].append(out[1])
    for s in (0, 1):  # slot 0 has one more row (after its last token), which `alone` has not
        want, have = alone[s][1], np.stack(got[s][:SLOT_STEPS])
        if not np.array_equal(have, want):
            bad.append(
                f"slots: slot {s} of the batched step differs from its run alone by {np.abs(have - want).max():.3g}"
            )
    return bad


def describe() -> str:
    import platform

    import llvmlite.binding as llb
    import numba

    cpu = numba.config.CPU_NAME or llb.get_host_cpu_name()
    line = f"{platform.machine()} numba {numba.__version__} compiles for {cpu}"
    if platform.machine() == "aarch64":
        import ctypes

        hwcap = ctypes.CDLL(None).getauxval(16)  # AT_HWCAP
        line += f"; HWCAP asimd={bool(hwcap & (1 << 1))} asimddp={bool(hwcap & (1 << 20))}"
    from edgellm.runtime.kernels import tiers

    return line + f"; kernel tiers {', '.join(tiers.supported())}"


def reference(out: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "tests"))
    import tiny  # noqa: E402  (tests/tiny.py: seeded tiny models, needs torch)

    cli = str(Path(sys.executable).with_name("edgellm"))
    out.mkdir(parents=True)
    tok = tiny.make_tokenizer(out / "tokenizer")
    srcs = {}
    manifest = {"prompt": PROMPT, "decode": DECODE, "n_ctx": N_CTX, "cases": {}}
    for name, (fam, qargs) in CASES.items():
        if fam not in srcs:
            srcs[fam] = tiny.save(tiny.build(fam, initializer_range=INIT[fam]), tok, out / "src" / fam)
        model = srcs[fam]
        if qargs:
            model = out / "src" / name
            subprocess.run(
                [
                    cli,
                    "quantize",
                    str(srcs[fam]),
                    *qargs,
                    "--method",
                    "rtn",
                    "--quantize-embeddings",
                    "--no-eval",
                    "-o",
                    str(model),
                ],
                check=True,
                capture_output=True,
            )
        dst = out / name
        subprocess.run([cli, "export", str(model), "-o", str(dst), "--no-check"], check=True, capture_output=True)
        prompt = PROMPTS.get(fam, PROMPT)
        nm = open_model(dst, N_CTX, CHUNK.get(fam))
        first, tokens, steps = greedy(nm, prompt, DECODE)
        kernels = nm.kernels
        bad = same_machine(nm, prompt, tokens, steps, name in SLOTS)
        nm.close()
        if bad:  # the x86 runtime breaks its own contract: no point in comparing the arm run with it
            raise SystemExit(f"x86 runtime, {name}: " + "; ".join(bad))
        np.savez(out / f"{name}.npz", prompt_logits=first, step_logits=steps, tokens=np.array(tokens, np.int64))
        allv = np.concatenate([first, steps])
        top2 = np.sort(np.concatenate([first[-1:], steps[:-1]]), axis=-1)[:, -2:]  # the rows that pick tokens
        manifest["cases"][name] = {
            "prompt": prompt,
            "chunk": CHUNK.get(fam),
            "slots": name in SLOTS,
            "quantized": qargs is not None,
            "tokens": tokens,
            "tolerance": tolerance(qargs is not None, allv),
            "min_top2_margin": float((top2[:, 1] - top2[:, 0]).min()),
        }
        manifest["cases"][name]["kernels"] = kernels
        print(f"reference {name}: tokens {tokens} (kernels {kernels})", flush=True)
    manifest["x86"] = describe()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(out / "src")  # the torch checkpoints are not needed on the arm side


def check(ref: Path) -> int:
    man = json.loads((ref / "manifest.json").read_text())
    print(f"reference: {man['x86']}", flush=True)
    print(f"this run:  {describe()}", flush=True)
    failed = 0
    for name, case in man["cases"].items():
        t0 = time.perf_counter()
        exp = np.load(ref / f"{name}.npz")
        prompt = case.get("prompt", man["prompt"])
        nm = open_model(ref / name, man["n_ctx"], case.get("chunk"))
        first, tokens, steps = greedy(nm, prompt, man["decode"], forced=case["tokens"])
        kernels = nm.kernels
        bad = same_machine(nm, prompt, case["tokens"], steps, case.get("slots", False))
        nm.close()
        d = max(np.abs(first - exp["prompt_logits"]).max(), np.abs(steps - exp["step_logits"]).max())
        # tests/test_runtime.py's rule: equal tokens wherever x86's top-2 margin exceeds twice the
        # tolerance; below that a near tie may go either way when logits differ within tolerance
        picks = np.concatenate([exp["prompt_logits"][-1:], exp["step_logits"][:-1]])  # the rows that pick tokens
        top2 = np.sort(picks, axis=-1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        diff = [i for i, (a, b) in enumerate(zip(tokens, case["tokens"])) if a != b]
        ties = [i for i in diff if margin[i] <= 2 * case["tolerance"]]
        if not diff:
            verdict = "equal"
        else:
            where = ", ".join(f"step {i} ({tokens[i]} vs {case['tokens'][i]}, margin {margin[i]:.3g})" for i in diff)
            verdict = f"differ at {where}" + (" (near ties: margin <= 2 x tolerance)" if ties == diff else "")
        ok = ties == diff and d <= case["tolerance"] and not bad
        failed += not ok
        own = "; ".join(bad) or ("verify and slots" if case.get("slots") else "verify") + " bit for bit"
        print(
            f"{'PASS' if ok else 'FAIL'} {name}: tokens {verdict} "
            f"({len(tokens)}), max|dlogit| {d:.3g} (tolerance {case['tolerance']:.3g}, x86 min top-2 margin "
            f"{case['min_top2_margin']:.3g}), {own}, kernels {kernels}, {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if len(argv) == 1 and argv[0] == "describe":
        print(describe())
        return 0
    if len(argv) != 2 or argv[0] not in ("reference", "check"):
        print("usage: arm64_parity.py reference OUT | check REF | describe", file=sys.stderr)
        return 2
    path = Path(argv[1])
    if argv[0] == "reference":
        if path.exists():
            print(f"error: {path} exists; give a new directory", file=sys.stderr)
            return 2
        reference(path)
        return 0
    if not (path / "manifest.json").is_file():
        print(f"error: {path} has no manifest.json; run 'arm64_parity.py reference' on x86 first", file=sys.stderr)
        return 2
    return check(path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
