"""Bounded, seeded fuzzing of the loader (tests/tools/fuzz_loader.py) and the bad-input matrix of
the command line: no crash, hang, traceback or accepted NaN from any file, and every bad
command line ends in one `error:` line with exit code 2."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from fuzz_seeds import copy, seed_exports  # noqa: E402

from edgellm.cli import app  # noqa: E402


@pytest.fixture(scope="session")
def seeds(tmp_path_factory):
    return seed_exports(tmp_path_factory)


def test_fuzz_campaign(seeds):
    """1000 seeded mutants (about 25 s on one core) of the ten seeds, one per issue-25 family
    among them: every outcome is a clean rejection or a run with finite logits; `changed`
    outputs come only from mutations nothing can detect without --verify (flipped weight bytes,
    swapped same-shape tensors, a family key set to another valid value)."""
    from tools.fuzz_loader import FAILURES, SEEDS, campaign

    res = campaign(seeds, n=1000, seed=12345, timeout=30)
    print(json.dumps({k: res[k] for k in ("mutants", "seconds", "counts", "by_seed")}))
    assert res["mutants"] == 1000
    assert res["failures"] == 0, res["examples"]
    assert res["counts"].get("rejected", 0) > 500  # the mutators really do damage
    assert set(res["by_seed"]) == set(SEEDS) and all(c.get("rejected", 0) > 20 for c in res["by_seed"].values())
    assert res["by_class"]["meta_family"].get("rejected", 0) > 20
    assert all(f not in res["counts"] for f in FAILURES)


@pytest.mark.slow
def test_fuzz_campaign_cuda(seeds):
    """64 seeded mutants through the CUDA path under numba's CUDA simulator (workers get
    NUMBA_ENABLE_CUDASIM=1; this process never imports numba.cuda): load, validate through the
    weights plan, one decode step (a 1-token prompt, 1 new token: the simulator runs a CUDA thread
    as a Python thread); every 16th through `edgellm run --device cuda`, where only exit 0 or one
    `error:` line with exit 2 passes. A few seconds per accepted mutant, mostly the simulated
    decode step: 256 mutants took 729 s of a 25-minute suite, so CI runs 64 and the campaign of
    a few hundred is `python tests/tools/fuzz_loader.py --device cuda` (benchmarks/RESULTS.md §8)."""
    from tools.fuzz_loader import FAILURES, campaign

    res = campaign(seeds, n=64, seed=2027, timeout=180, device="cuda")
    print(json.dumps({k: res[k] for k in ("mutants", "device", "seconds", "counts")}))
    assert res["mutants"] == 64 and res["device"] == "cuda (simulator)"
    assert res["failures"] == 0, res["examples"]
    assert all(f not in res["counts"] for f in FAILURES)
    assert res["counts"].get("rejected", 0) > 25 and res["counts"].get("accepted", 0) > 5
    assert sum(res["counts"].values()) == 64


def _is_one_line_error(r) -> bool:
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    return r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:")


def bad_command_lines(seeds, tmp: Path) -> list[list[str]]:
    """Bad invocations of all eight commands: options out of range or of the wrong type,
    unknown options, missing arguments, damaged inputs, outputs over inputs."""
    exp, hf = str(seeds["llama-q4"]), str(seeds["llama-f32"].parent / "llama-f32-hf")
    broken = tmp / "broken-hf"
    if not broken.exists():
        copy(Path(hf), broken)
        (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    broken = str(broken)
    out = str(tmp / "out")
    run = ["run", exp, "-p", "hi"]
    cases = [
        # run
        ["run"],
        [*run, "--temperature", "inf"],
        [*run, "--temperature", "-1"],
        [*run, "--temperature", "nan"],
        [*run, "--seed", "-1"],
        [*run, "--top-p", "0"],
        [*run, "--top-p", "1.5"],
        [*run, "--top-k", "-3"],
        [*run, "--repetition-penalty", "0"],
        [*run, "--repetition-penalty", "inf"],
        [*run, "-n", "0"],
        [*run, "--threads", "0"],
        [*run, "--ctx", "1"],
        [*run, "--ctx", "x"],
        [*run, "--backend", "tvm"],
        [*run, "--kv-cache", "fp8"],
        [*run, "--bogus"],
        [*run, "--stop", ""],
        ["run", exp, "-p", ""],
        ["run", str(tmp / "nope"), "-p", "hi"],
        ["run", hf, "-p", "hi"],
        [*run, "-n", "abc"],
        [*run, "--verify", "--backend", "onnxruntime", "--ctx", "0"],
        # info
        ["info"],
        ["info", str(tmp / "nope")],
        ["info", broken],
        ["info", hf, "--verify"],
        ["info", exp, "--bogus"],
        # quantize
        ["quantize", hf],
        ["quantize", hf, "-o", out, "--bits", "3"],
        ["quantize", hf, "-o", out, "--bits", "x"],
        ["quantize", hf, "-o", out, "--group-size", "7"],
        ["quantize", hf, "-o", out, "--damp", "2"],
        ["quantize", hf, "-o", out, "--damp", "nan"],
        ["quantize", hf, "-o", out, "--seed", "-1"],
        ["quantize", hf, "-o", out, "--method", "magic"],
        ["quantize", hf, "-o", out, "--calib-samples", "0"],
        ["quantize", hf, "-o", hf, "--force"],
        ["quantize", hf, "-o", f"{hf}/sub"],
        ["quantize", broken, "-o", out],
        ["quantize", hf, "-o", out, "--seq-len", "100000", "--no-eval", "--method", "rtn"],
        ["quantize", hf, "-o", exp],
        # prune
        ["prune", hf, "-o", out],
        ["prune", hf, "-o", out, "--method", "wanda", "--sparsity", "1.5"],
        ["prune", hf, "-o", out, "--method", "wanda", "--sparsity", "nan"],
        ["prune", hf, "-o", out, "--method", "wanda", "--pattern", "5:4"],
        ["prune", hf, "-o", out, "--structured", "mlp"],
        ["prune", hf, "-o", out, "--structured", "mlp", "--ratio", "1"],
        ["prune", hf, "-o", out, "--method", "wanda", "--damp", "-1"],
        ["prune", hf, "-o", out, "--method", "wanda", "--seed", "-2"],
        ["prune", hf, "-o", hf, "--method", "magnitude", "--force"],
        ["prune", broken, "-o", out, "--method", "magnitude"],
        # distill
        ["distill", hf],
        ["distill", hf, "-o", out, "--weight-decay", "-1"],
        ["distill", hf, "-o", out, "--warmup-steps", "-5"],
        ["distill", hf, "-o", out, "--lr", "0"],
        ["distill", hf, "-o", out, "--lr", "inf"],
        ["distill", hf, "-o", out, "--temperature", "0"],
        ["distill", hf, "-o", out, "--ce-weight", "2"],
        ["distill", hf, "-o", out, "--clip", "nan"],
        ["distill", hf, "-o", out, "--seed", "-1"],
        ["distill", hf, "-o", out, "--steps", "0"],
        ["distill", hf, "-o", hf, "--force"],
        ["distill", hf, "-o", out, "--student", hf, "--student-layers", "1"],
        # export
        ["export", hf],
        ["export", hf, "-o", out, "--accuracy-level", "9"],
        ["export", hf, "-o", out, "--format", "gguf"],
        ["export", hf, "-o", hf, "--force"],
        ["export", hf, "-o", f"{hf}/onnx"],
        ["export", broken, "-o", out, "--no-check"],
        ["export", str(tmp / "nope"), "-o", out],
        # eval
        ["eval"],
        ["eval", hf, "--ctx", "4"],
        ["eval", hf, "--ctx", "64", "--stride", "128"],
        ["eval", broken],
        ["eval", hf, "--ctx", "100000", "--eval-tokens", "64"],
        ["eval", hf, "--data", str(tmp / "nope.txt")],
        # bench
        ["bench", exp],
        ["bench", exp, "-o", exp, "--force"],
        ["bench", exp, "-o", f"{exp}/report"],
        ["bench", exp, "-o", out, "--reps", "0"],
        ["bench", exp, "-o", out, "--timeout", "nan"],
        ["bench", exp, "-o", out, "--target", "mars"],
        ["bench", f"{exp}:tvm", "-o", out],
        ["bench", str(tmp / "nope"), "-o", out],
        ["bench", exp, "-o", str(seeds["gpt2-f32"]), "--force"],
        # no such command / option
        ["nosuch"],
        ["--bogus"],
    ]
    return cases


def test_bad_input_matrix(seeds, tmp_path):
    """Every bad invocation ends in one `error:` line with exit 2, and no input is touched."""
    before = {p: p.stat().st_mtime_ns for s in seeds.values() for p in s.iterdir()}
    cases = bad_command_lines(seeds, tmp_path)
    bad = []
    for args in cases:
        r = CliRunner().invoke(app, args)
        if not _is_one_line_error(r):
            bad.append((args, r.exit_code, r.output[-400:]))
    print(f"bad-input matrix: {len(cases) - len(bad)} of {len(cases)} invocations end in one error line with exit 2")
    assert not bad, bad
    assert before == {p: p.stat().st_mtime_ns for s in seeds.values() for p in s.iterdir()}
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- outputs
def test_output_parents_created(seeds, tmp_path):
    hf = seeds["llama-f32"].parent / "llama-f32-hf"
    out = tmp_path / "a" / "b" / "c"
    r = CliRunner().invoke(app, ["export", str(hf), "-o", str(out), "--no-check"])
    assert r.exit_code == 0, r.output
    assert (out / "model.onnx").is_file() and not list(out.parent.glob(".c.tmp-*"))


def test_failed_command_removes_created_parents(tmp_path):
    from edgellm.outputs import atomic_output_dir

    out = tmp_path / "x" / "y" / "z"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "f").write_text("half")
            raise RuntimeError("failed")
    assert list(tmp_path.iterdir()) == []


def test_interrupt_after_rename_says_complete(seeds, tmp_path, monkeypatch):
    """Ctrl-C after the output was renamed into place (here: while printing the summary) must
    not claim that nothing was written."""
    import edgellm.commands.export as export_cmd

    def interrupted(*a, **k):
        raise KeyboardInterrupt()

    monkeypatch.setattr(export_cmd, "human_bytes", interrupted)
    out = tmp_path / "out"
    r = CliRunner().invoke(
        app, ["export", str(seeds["llama-f32"].parent / "llama-f32-hf"), "-o", str(out), "--no-check"]
    )
    assert r.exit_code == 130 and "written completely" in r.output, r.output
    assert (out / "model.onnx").is_file()


def test_interrupt_before_rename_says_nothing_written(seeds, tmp_path, monkeypatch):
    import edgellm.export.exporter as exporter

    def interrupted(*a, **k):
        raise KeyboardInterrupt()

    monkeypatch.setattr(exporter, "write_record", interrupted)
    out = tmp_path / "out"
    r = CliRunner().invoke(
        app, ["export", str(seeds["llama-f32"].parent / "llama-f32-hf"), "-o", str(out), "--no-check"]
    )
    assert r.exit_code == 130 and "nothing was written" in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_signal_inside_an_import_is_an_interrupt(monkeypatch):
    """A Ctrl-C that a library turns into ImportError (or require() into a missing-extra error)
    still reads as an interrupt."""
    import edgellm.commands.info as info_cmd
    from edgellm import console

    def load(*a, **k):
        console.SIGNALLED.append(signal.SIGINT)
        raise ImportError("initialization failed")

    monkeypatch.setattr(info_cmd, "load_shown", load)
    r = CliRunner().invoke(app, ["info", "whatever"])
    assert r.exit_code == 130 and "interrupted" in r.output and "ImportError" not in r.output, r.output


def test_sigterm_removes_the_temporary_folder(seeds, tmp_path):
    """SIGTERM while export writes (its parity check runs ONNX Runtime, a second or two) leaves
    no temporary folder and says so in one line."""
    hf = seeds["llama-f32"].parent / "llama-f32-hf"
    results = []
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        p = subprocess.Popen(
            [sys.executable, "-c", "from edgellm.cli import main; main()", "export", str(hf), "-o", str(out)],
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list(tmp_path.glob(f".{out.name}.tmp-*")) and p.poll() is None:
            time.sleep(0.02)
        p.send_signal(signal.SIGTERM)
        err = p.communicate(timeout=120)[1]
        results.append((p.returncode, err.strip().splitlines()[-1:] if err.strip() else []))
        assert not list(tmp_path.glob(f".{out.name}.*")), (attempt, err)
        if p.returncode == 143:
            assert "SIGTERM" in err, err
    assert any(rc == 143 for rc, _ in results), results
