"""`edgellm compress RECIPE`: a recipe end to end on a tiny trained model, skip-on-rerun, rerun
from a changed stage, resume of an interrupted distill stage, and bad recipes (every problem in
one pass, exit code 2, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tiny
from edgellm.cli import app
from edgellm.data import builtin_text

runner = CliRunner()

TEACHER_CFG = dict(
    hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tokenizer) -> Path:
    """A 4-layer tiny llama trained briefly (seeded), so pruning and distillation see real structure."""
    model = tiny.build("llama", seed=0, **TEACHER_CFG)
    tiny.train(model, tokenizer, steps=60, seq_len=64, batch=8, lr=3e-3)
    return tiny.save(model, tokenizer, tmp_path_factory.mktemp("compress") / "teacher")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(builtin_text()[:60_000])
    return path


def recipe_text(teacher: Path, data: Path, group_size: int = 32, bench: bool = False, speed: bool = False) -> str:
    text = f"""
model: {teacher}
data: {data}
report: {{eval-tokens: 256, ctx: 64, speed: {str(speed).lower()}, prompt-tokens: 16, gen-tokens: 4, reps: 1}}
stages:
  - name: depth
    prune: {{structured: layers, ratio: 0.25, calib-samples: 8, seq-len: 64, eval: false}}
  - name: heal
    distill: {{steps: 4, batch-size: 2, seq-len: 32, checkpoint-every: 2, eval: false, lr: 1.0e-3}}
  - quantize: {{bits: 4, method: rtn, group-size: {group_size}, calib-samples: 4, seq-len: 32, eval: false}}
  - export: {{check: false}}
"""
    if bench:
        text += "  - bench: {quick: true, prompt-tokens: 8, gen-tokens: 4, reps: 1, quality: false}\n"
    return text


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def compress(*args):
    return runner.invoke(app, ["compress", *[str(a) for a in args]])


def lock(out: Path) -> dict:
    return json.loads((out / "recipe.lock.json").read_text())


def statuses(result) -> dict[str, str]:
    """Stage dir -> what this run did with it ('skip' / 'run' / 'resume' / 'failed'), from the CLI's lines."""
    seen = {}
    for line in result.output.splitlines():
        if line.startswith("[") and "]" in line and ": " in line:
            name, what = line.split("] ", 1)[1].split(": ", 1)
            what = what.split(" ")[0]
            if what != "done":
                seen[name] = what
    return seen


def test_recipe_end_to_end_skip_and_partial_rerun(teacher, data, tmp_path):
    out = tmp_path / "out"
    recipe = write(tmp_path, recipe_text(teacher, data))
    r = compress(recipe, "-o", out)
    assert r.exit_code == 0, r.output
    dirs = ["00-depth", "01-heal", "02-quantize", "03-export"]
    assert all((out / d).is_dir() for d in dirs)
    assert not list(out.glob(".*tmp*")), "temporary siblings are renamed or removed"
    assert json.loads((out / "00-depth" / "config.json").read_text())["num_hidden_layers"] == 3
    lk = lock(out)
    assert [e["status"] for e in lk["stages"]] == ["done"] * 4
    assert lk["stages"][1]["inputs"]["student"]["sha256"] == lk["stages"][0]["output_sha256"], (
        "distill starts from the pruned model"
    )
    assert lk["stages"][1]["inputs"]["teacher"]["spec"] == str(teacher)
    assert lk["stages"][2]["options"] == {
        "bits": 4,
        "method": "rtn",
        "group-size": 32,
        "calib-samples": 4,
        "seq-len": 32,
        "eval": False,
        "data": str(data),
    }
    assert all(e["code_version"].startswith("0.") and e["code_version"] != lk["code_version"] for e in lk["stages"])
    heal = json.loads((out / "01-heal" / "edgellm.json").read_text())["steps"][-1]
    assert heal["student"]["model"]["spec"] == str((out / "00-depth").resolve())
    assert not (out / "01-heal.checkpoints").exists(), "a finished distill removes its checkpoints"

    rep = json.loads((out / "report.json").read_text())
    assert [row["stage"] for row in rep["outputs"]] == ["input", *dirs]
    params = [row["parameters"] for row in rep["outputs"]]
    assert params[1] < params[0] and params[2] == params[1] and params[3] == params[2] == params[4]
    q = [row["quality"] for row in rep["outputs"]]
    assert q[0]["kl"] == pytest.approx(0.0, abs=1e-9) and all(x["kl"] > 0 for x in q[1:])
    assert rep["outputs"][4]["quality_from"] == "02-quantize" and q[4] == q[3]
    sizes = [row["size_bytes"] for row in rep["outputs"]]
    assert sizes[3] < sizes[2], "4-bit is smaller than the float student"
    md = (out / "report.md").read_text()
    assert "KL vs input" in md and "03-export" in md
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")

    # unchanged: every stage is skipped, outputs untouched
    before = {e["dir"]: e["output_sha256"] for e in lock(out)["stages"]}
    r = compress(recipe, "-o", out)
    assert r.exit_code == 0, r.output
    assert statuses(r) == {d: "skip" for d in dirs}
    assert {e["dir"]: e["output_sha256"] for e in lock(out)["stages"]} == before

    # a changed quantize option reruns quantize and what follows it, nothing before it
    write(tmp_path, recipe_text(teacher, data, group_size=16))
    r = compress(recipe, "-o", out)
    assert r.exit_code == 0, r.output
    assert statuses(r) == {"00-depth": "skip", "01-heal": "skip", "02-quantize": "run", "03-export": "run"}
    assert json.loads((out / "02-quantize" / "edgellm.json").read_text())["quantization"]["group_size"] == 16

    # an output modified by hand is noticed and rebuilt
    (out / "03-export" / "extra.txt").write_text("x")
    r = compress(recipe, "-o", out)
    assert statuses(r)["03-export"] == "run" and not (out / "03-export" / "extra.txt").exists()


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupted_distill_resumes_from_its_checkpoint(teacher, data, tmp_path, monkeypatch, how):
    import os
    import signal

    from edgellm.distill import data as ddata

    real = ddata.PackedData.batch

    def interrupted(self, step, micro, **kw):
        if step == 3:  # after the checkpoint at step 2
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)  # `kill PID` of the compress process
            raise KeyboardInterrupt
        return real(self, step, micro, **kw)

    out = tmp_path / "out"
    recipe = write(tmp_path, recipe_text(teacher, data))
    monkeypatch.setattr(ddata.PackedData, "batch", interrupted)
    r = compress(recipe, "-o", out, "--no-report")
    assert r.exit_code == 130 and "rerun the same command to continue" in r.output
    lk = lock(out)
    assert [(e["dir"], e["status"]) for e in lk["stages"]] == [("00-depth", "done"), ("01-heal", "failed")]
    assert lk["stages"][1]["error"] == "interrupted"
    assert not (out / "01-heal").exists(), "the failed stage leaves no output"
    assert json.loads((out / "01-heal.checkpoints" / "latest.json").read_text())["step"] == 2

    monkeypatch.setattr(ddata.PackedData, "batch", real)
    r = compress(recipe, "-o", out, "--no-report")
    assert r.exit_code == 0, r.output
    assert statuses(r) == {"00-depth": "skip", "01-heal": "resume", "02-quantize": "run", "03-export": "run"}
    step = json.loads((out / "01-heal" / "edgellm.json").read_text())["steps"][-1]
    assert step["training"]["resumed_from"] == 2 and step["training"]["steps"] == 4
    rows = [json.loads(x) for x in (out / "01-heal" / "distill_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2, 3, 4]


def test_failed_stage_keeps_earlier_outputs_and_rerun_starts_there(teacher, data, tmp_path):
    out = tmp_path / "out"
    text = recipe_text(teacher, data).replace("group-size: 32", "group-size: 48")  # 64 is not a multiple of 48
    recipe = write(tmp_path, text)
    r = compress(recipe, "-o", out, "--no-report")
    assert r.exit_code == 2, r.output
    assert "stage 3 (quantize) failed" in r.output
    lk = lock(out)
    assert [e["status"] for e in lk["stages"]] == ["done", "done", "failed"]
    assert "48" in lk["stages"][2]["error"]
    assert (out / "01-heal").is_dir() and not (out / "02-quantize").exists()
    write(tmp_path, recipe_text(teacher, data))
    r = compress(recipe, "-o", out, "--no-report")
    assert r.exit_code == 0, r.output
    assert statuses(r) == {"00-depth": "skip", "01-heal": "skip", "02-quantize": "run", "03-export": "run"}


def test_every_problem_in_one_pass(teacher, tmp_path):
    out = tmp_path / "out"
    recipe = write(
        tmp_path,
        f"""
model: {teacher}
colour: blue
stages:
  - quantise: {{bits: 4}}
  - export: {{}}
  - quantize: {{bitz: 4, group-size: "x", method: awq2, sym: 3}}
  - prune: {{structured: layers, ratio: 0.2, output: elsewhere}}
  - bench: {{target: rpi9, with: nope}}
""",
    )
    r = compress(recipe, "-o", out)
    assert r.exit_code == 2
    for needle in [
        "unknown key 'colour'",
        "stage 1: unknown stage 'quantise'; did you mean 'quantize'?",
        "stage 3 (quantize): unknown option 'bitz'; did you mean 'bits'?",
        "stage 3 (quantize): 'group-size' takes an integer",
        "'method' must be one of rtn, gptq, awq",
        "'sym' is a switch",
        "stage 4 (prune): 'output' is set by the recipe",
        "stage 5 (bench): 'target' must be one of host, laptop, rpi4, rpi5",
        "'with' must be a list",
        "stage 3 (quantize): 'quantize' after export",
        "stage 4 (prune): 'prune' after export",
    ]:
        assert needle in r.output, (needle, r.output)
    assert r.output.count("\n  - ") == 11
    assert not out.exists(), "nothing is written for a bad recipe"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("stages: [\n", "is not valid YAML at line"),
        ("- just a list\n", "expected a mapping"),
        ("model: x\nstages: []\n", "'stages' must be a non-empty list"),
        ("model: x\nstages:\n  - quantize: {bits: 4}\n  - quantize: {bits: 8}\n", "'quantize' twice"),
        ("model: x\nstages:\n  - quantize: {}\n  - distill: {steps: 2}\n", "'distill' after quantize"),
        (
            "model: x\nstages:\n  - prune: {structured: layers, ratio: 0.2}\n  - distill: {student-layers: 2}\n",
            "'student-layers' makes the student",
        ),
        ("model: x\nstages:\n  - distill: {student: other/}\n", "'student' is set by the recipe"),
        (
            "model: x\nstages:\n  - prune: {method: wanda}\n  - distill: {steps: 2}\n",
            "would train the pruned zeros back",
        ),
        ("model: x\nreport: {speed: 3}\nstages:\n  - export: {}\n", "report: 'speed' must be true or false"),
    ],
)
def test_bad_recipes(tmp_path, text, needle):
    r = compress(write(tmp_path, text), "-o", tmp_path / "out")
    assert r.exit_code == 2 and needle in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_pattern_is_read_as_a_string_and_model_override(teacher, tmp_path):
    """YAML 1.1 reads 2:4 as the base-60 number 124; recipes follow YAML 1.2, where it is a string."""
    from edgellm.recipe import spec

    r = spec.parse(
        {"model": "unused", "stages": [{"prune": {"method": "sparsegpt", "pattern": "2:4"}}]}, model=str(teacher)
    )
    assert r.model == str(teacher)
    doc = spec.read_yaml(write(tmp_path, "stages:\n  - prune: {method: sparsegpt, pattern: 2:4, sparsity: .5}\n"))
    assert doc["stages"][0]["prune"] == {"method": "sparsegpt", "pattern": "2:4", "sparsity": 0.5}
    r = compress(
        write(tmp_path, "stages:\n  - export: {}\n"), "-o", tmp_path / "out", "--model", tmp_path / "missing", "--check"
    )
    assert r.exit_code == 2 and "does not exist" in r.output


def test_options_come_from_the_command_signatures():
    """No second list: every option of the real command is accepted under its long name."""
    from edgellm.commands import bench, distill, evaluate, export, prune, quantize
    from edgellm.recipe import stages as C

    cli = {
        "prune": prune.prune,
        "distill": distill.distill,
        "quantize": quantize.quantize,
        "export": export.export,
        "bench": bench.bench,
        "eval": evaluate.evaluate,
    }
    from edgellm.commands.draft import DRAFT_FLAGS

    cli["draft"] = distill.distill  # distill --draft-for: a subset of distill's options
    for stage in C.COMMANDS:
        fn = cli[stage]
        import inspect

        names = set(inspect.signature(fn).parameters) - set(C.MANAGED) - {"context"}
        got = {o.name for o in C.options(stage).values()}
        if stage == "draft":
            assert got <= names and set(DRAFT_FLAGS) - {"draft_for"} <= got, got
        else:
            assert got == names - (set(DRAFT_FLAGS) if stage == "distill" else set()), stage
    assert C.convert("quantize", "group-size", 64) == ("group_size", 64)
    assert C.convert("prune", "eval", False) == ("evaluate", False)
    with pytest.raises(ValueError, match=">= 1"):
        C.convert("distill", "steps", 0)


def test_shipped_recipes_are_valid():
    from edgellm.recipe import spec

    root = Path(__file__).parent.parent / "recipes"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert {"smollm2-pi.yaml", "quantize-only.yaml", "sparse-2of4.yaml"} <= set(names)
    for name in names:
        r = spec.read_recipe(root / name)
        assert r.stages
    pi = spec.read_recipe(root / "smollm2-pi.yaml")
    assert [s.command for s in pi.stages] == ["prune", "distill", "quantize", "export", "bench"]
    assert pi.stages[-1].options["target"].value == "rpi5"


def test_compare_adds_another_runs_outputs_only_when_measured_alike(tmp_path):
    from edgellm.errors import EdgeLLMError
    from edgellm.recipe import report as rep

    ours = {"model": "m", "data": "builtin:pydoc", "settings": {"eval-tokens": 256, "ctx": 64}, "outputs": []}
    other = tmp_path / "baseline"
    other.mkdir()
    rows = [
        {"stage": "input", "size_bytes": 10},
        {"stage": "01-export", "size_bytes": 5, "quality": {"perplexity": 3.0, "kl": 0.1}},
    ]
    (other / "report.json").write_text(json.dumps({**ours, "outputs": rows}))
    got = rep.compared_rows(ours, other)
    assert [r["stage"] for r in got] == ["baseline/01-export"] and got[0]["compared"] == str(other)
    (other / "report.json").write_text(
        json.dumps({**ours, "settings": {"eval-tokens": 512, "ctx": 64}, "outputs": rows})
    )
    with pytest.raises(EdgeLLMError, match="another input or protocol"):
        rep.compared_rows(ours, other)


def test_eval_stage_scores_the_latest_model_against_the_input(teacher, data, tmp_path):
    out = tmp_path / "out"
    recipe = write(
        tmp_path,
        f"""
model: {teacher}
data: {data}
stages:
  - quantize: {{bits: 4, method: rtn, group-size: 32, calib-samples: 4, seq-len: 32, eval: false}}
  - eval: {{eval-tokens: 256, ctx: 64}}
""",
    )
    r = compress(recipe, "-o", out, "--no-report")
    assert r.exit_code == 0, r.output
    res = json.loads((out / "01-eval" / "eval.json").read_text())
    assert res["model"] == str(out / "00-quantize") and res["reference"] == str(teacher)
    assert res["kl"] > 0 and 200 < res["tokens"] < 256 and res["ctx"] == 64
    assert lock(out)["stages"][1]["inputs"]["model"]["sha256"] == lock(out)["stages"][0]["output_sha256"]


def test_eval_stage_checks_the_context_like_edgellm_eval(tiny_dirs, tmp_path):
    """The eval stage is `edgellm eval`'s workflow: a --ctx beyond the model's positions is refused."""
    recipe = write(tmp_path, f"model: {tiny_dirs['llama']}\nstages:\n  - eval: {{ctx: 100000, eval-tokens: 64}}\n")
    r = compress(recipe, "-o", tmp_path / "out", "--no-report")
    assert r.exit_code == 2 and "--ctx 100000 exceeds the model's" in r.output, r.output
    assert not (tmp_path / "out" / "00-eval").exists()
