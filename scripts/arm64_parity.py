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
INIT = {"llama": 0.1, "gpt2": 0.02}
# name: (family, quantize arguments or None for float weights)
CASES = {
    "llama-f32": ("llama", None),
    "llama-q4-sym-g32": ("llama", ["--bits", "4", "--group-size", "32", "--sym"]),
    "llama-q8-asym-g16": ("llama", ["--bits", "8", "--group-size", "16", "--asym"]),
    "gpt2-q4-asym-g64": ("gpt2", ["--bits", "4", "--group-size", "64", "--asym"]),
}


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
    from edgellm.runtime.model import NumbaModel

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
        nm = NumbaModel(dst, n_ctx=N_CTX, threads=2)
        first, tokens, steps = greedy(nm, PROMPT, DECODE)
        kernels = nm.kernels
        nm.close()
        np.savez(out / f"{name}.npz", prompt_logits=first, step_logits=steps, tokens=np.array(tokens, np.int64))
        allv = np.concatenate([first, steps])
        top2 = np.sort(np.concatenate([first[-1:], steps[:-1]]), axis=-1)[:, -2:]  # the rows that pick tokens
        manifest["cases"][name] = {
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
    from edgellm.runtime.model import NumbaModel

    man = json.loads((ref / "manifest.json").read_text())
    print(f"reference: {man['x86']}", flush=True)
    print(f"this run:  {describe()}", flush=True)
    failed = 0
    for name, case in man["cases"].items():
        t0 = time.perf_counter()
        exp = np.load(ref / f"{name}.npz")
        nm = NumbaModel(ref / name, n_ctx=man["n_ctx"], threads=2)
        first, tokens, steps = greedy(nm, man["prompt"], man["decode"], forced=case["tokens"])
        kernels = nm.kernels
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
        ok = ties == diff and d <= case["tolerance"]
        failed += not ok
        print(
            f"{'PASS' if ok else 'FAIL'} {name}: tokens {verdict} "
            f"({len(tokens)}), max|dlogit| {d:.3g} (tolerance {case['tolerance']:.3g}, x86 min top-2 margin "
            f"{case['min_top2_margin']:.3g}), kernels {kernels}, {time.perf_counter() - t0:.0f} s",
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
