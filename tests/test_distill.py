"""`edgellm distill`: losses, student construction, distillation beats plain CE, exact resume,
a 2-process gloo DDP run, and bad input (exit code 2, nothing lost)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tiny
from edgellm.cli import app
from edgellm.data import builtin_text

runner = CliRunner()

TEACHER_CFG = dict(
    hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
)
SMALL = ["--seq-len", "64", "--batch-size", "4", "--no-eval"]


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """A 4-layer tiny llama, trained briefly on the built-in corpus (seeded)."""
    out = tmp_path_factory.mktemp("teacher")
    tok = tokenizer
    model = tiny.build("llama", seed=0, **TEACHER_CFG)
    tiny.train(model, tok, steps=300, seq_len=64, batch=16, lr=3e-3)
    return tiny.save(model, tok, out)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(builtin_text()[:120_000])
    return path


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def curve(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "distill_log.jsonl").read_text().splitlines()]


def numbers(rows):
    """The parts of the curve that must reproduce (timings never do)."""
    return [(r["step"], r["loss"], r["kd"], r["grad_norm"], r["lr"]) for r in rows]


# ---- pure pieces ------------------------------------------------------------------------------


def test_keep_layers_spreads_first_and_last():
    from edgellm.distill.student import keep_layers
    from edgellm.errors import EdgeLLMError

    assert keep_layers(4, 2) == [0, 3]
    assert keep_layers(7, 4) == [0, 2, 4, 6]  # every 2nd layer when L = 2(N-1)+1
    assert len(keep_layers(30, 15)) == 15 and keep_layers(30, 15)[-1] == 29
    with pytest.raises(EdgeLLMError):
        keep_layers(4, 4)


def test_kl_losses_against_definition():
    from edgellm.distill.losses import kl_loss

    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    assert kl_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    p, q = t.softmax(-1), s.softmax(-1)
    fwd = (p * (p.log() - q.log())).sum(-1).mean()
    rev = (q * (q.log() - p.log())).sum(-1).mean()
    assert kl_loss(s, t).item() == pytest.approx(fwd.item(), rel=1e-5)
    assert kl_loss(s, t, kind="reverse").item() == pytest.approx(rev.item(), rel=1e-5)
    T = 2.0
    pT, qT = (t / T).softmax(-1), (s / T).softmax(-1)
    assert kl_loss(s, t, temperature=T).item() == pytest.approx(
        (T * T * (pT * (pT.log() - qT.log())).sum(-1).mean()).item(), rel=1e-5
    )


def test_lr_schedule_warmup_then_cosine():
    from edgellm.distill.train import TrainConfig, lr_at

    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # non-increasing after warm-up
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)


def test_data_order_is_a_function_of_position():
    from edgellm.distill.data import PackedData

    d = PackedData(torch.arange(1000), seq_len=10, seed=3)
    one = d.batch(5, 0, batch_size=4, grad_accum=1)
    two = torch.cat([d.batch(5, 0, batch_size=2, grad_accum=1, rank=r, world=2) for r in range(2)])
    assert torch.equal(one, two)  # 2 ranks x 2 = 1 rank x 4
    assert torch.equal(one, PackedData(torch.arange(1000), seq_len=10, seed=3).batch(5, 0, batch_size=4, grad_accum=1))
    assert not torch.equal(
        one, PackedData(torch.arange(1000), seq_len=10, seed=4).batch(5, 0, batch_size=4, grad_accum=1)
    )


def test_student_copies_teacher_layers(teacher_dir):
    from edgellm.distill.student import student_from_teacher
    from edgellm.modelio import load_model

    teacher = load_model(teacher_dir).model
    student, kept = student_from_teacher(teacher, 2)
    assert kept == [0, 3] and student.config.num_hidden_layers == 2
    for j, i in enumerate(kept):
        ws, wt = student.model.layers[j].mlp.down_proj.weight, teacher.model.layers[i].mlp.down_proj.weight
        assert torch.equal(ws, wt) and ws.data_ptr() != wt.data_ptr()
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert teacher.config.num_hidden_layers == 4


@pytest.mark.parametrize("family", sorted(tiny.CONFIGS))
def test_student_from_teacher_every_family(family):
    from edgellm.distill.student import student_from_teacher

    teacher = tiny.build(family, **({"n_layer": 4} if family == "gpt2" else {"num_hidden_layers": 4}))
    student, kept = student_from_teacher(teacher, 2)
    x = torch.randint(0, tiny.VOCAB, (1, 12))
    out = student(input_ids=x, output_hidden_states=True)
    assert kept == [0, 3] and len(out.hidden_states) == 3 and out.logits.shape == (1, 12, tiny.VOCAB)


def test_checkpoint_round_trip_with_tied_weights(tmp_path):
    """Tied embeddings are stored once and restored as both names; optimizer state survives exactly."""
    from edgellm.distill.checkpoint import CheckpointDir
    from edgellm.distill.train import TrainConfig, _full_state, _optimizer, _restore

    model = tiny.build("qwen2")  # tie_word_embeddings=True
    opt = _optimizer(model, TrainConfig())
    model(input_ids=torch.randint(0, tiny.VOCAB, (2, 8)), labels=torch.randint(0, tiny.VOCAB, (2, 8))).loss.backward()
    opt.step()
    ck = CheckpointDir(tmp_path / "ck")
    ck.check({"a": 1}, resume=False)
    ck.claim({"a": 1})
    msd, osd = _full_state(model, opt)
    ck.save(1, msd, osd, {"cpu.rank0": torch.get_rng_state()}, {})
    saved = ck.load()
    assert saved["state"]["aliases"]  # lm_head.weight -> model.embed_tokens.weight
    fresh = tiny.build("qwen2", seed=5)
    opt2 = _optimizer(fresh, TrainConfig())
    _restore(fresh, opt2, saved)
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k]["exp_avg_sq"], s2[k]["exp_avg_sq"]) for k in s1)


# ---- the claim: distillation beats plain CE and the initial student --------------------------


def test_distillation_beats_cross_entropy(teacher_dir, tmp_path):
    common = [
        "--student-layers",
        2,
        "--steps",
        30,
        "--seq-len",
        64,
        "--batch-size",
        8,
        "--lr",
        1e-3,
        "--eval-tokens",
        4096,
        "--ctx",
        128,
        "--checkpoint-every",
        0,
    ]
    kd = invoke("distill", teacher_dir, "-o", tmp_path / "kd", *common)
    assert kd.exit_code == 0, kd.output
    ce = invoke("distill", teacher_dir, "-o", tmp_path / "ce", "--ce-weight", 1.0, *common)
    assert ce.exit_code == 0, ce.output
    q_kd = json.loads((tmp_path / "kd" / "edgellm.json").read_text())["steps"][-1]["quality"]
    q_ce = json.loads((tmp_path / "ce" / "edgellm.json").read_text())["steps"][-1]["quality"]
    assert q_kd["initial_student"]["perplexity"] == q_ce["initial_student"]["perplexity"]  # same start
    print(
        {
            "teacher": q_kd["teacher"]["perplexity"],
            "initial": q_kd["initial_student"]["perplexity"],
            "kd": q_kd["student"]["perplexity"],
            "ce": q_ce["student"]["perplexity"],
        }
    )
    assert q_kd["student"]["perplexity"] < q_kd["initial_student"]["perplexity"]
    assert q_kd["student"]["perplexity"] < q_ce["student"]["perplexity"]
    # the output is an ordinary transformers directory
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(tmp_path / "kd"))
    assert m.config.num_hidden_layers == 2


# ---- resume: interrupted, and a full disk mid-checkpoint ---------------------------------------

RUN = ["--steps", 8, "--checkpoint-every", 3, *SMALL]


@pytest.fixture(scope="module")
def reference(teacher_dir, small_data, tmp_path_factory):
    """The loss curve of an uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "ref"
    r = invoke("distill", teacher_dir, "-o", out, "--data", small_data, *RUN)
    assert r.exit_code == 0, r.output
    assert not out.with_name("ref.checkpoints").exists()  # removed on success
    return curve(out)


def test_resume_after_interruption_is_exact(teacher_dir, small_data, reference, tmp_path, monkeypatch):
    from edgellm.distill import data as ddata

    real = ddata.PackedData.batch

    def interrupted(self, step, micro, **kw):
        if step == 4:  # mid-way between the checkpoints at 3 and 6
            raise KeyboardInterrupt
        return real(self, step, micro, **kw)

    monkeypatch.setattr(ddata.PackedData, "batch", interrupted)
    out, ck = tmp_path / "run", tmp_path / "run.checkpoints"
    r = invoke("distill", teacher_dir, "-o", out, "--data", small_data, *RUN)
    assert r.exit_code == 130 and not out.exists()
    assert json.loads((ck / "latest.json").read_text())["step"] == 3
    monkeypatch.setattr(ddata.PackedData, "batch", real)
    r = invoke("distill", teacher_dir, "-o", out, "--data", small_data, *RUN, "--resume", ck)
    assert r.exit_code == 0, r.output
    resumed = curve(out)
    assert [row["step"] for row in resumed] == list(range(1, 9))
    assert numbers(resumed) == numbers(reference)  # bit-exact on CPU, fp32: same ops, same order, same state
    rec = json.loads((out / "edgellm.json").read_text())["steps"][-1]
    assert rec["training"]["resumed_from"] == 3


def test_full_disk_during_checkpoint_keeps_previous(teacher_dir, small_data, reference, tmp_path, monkeypatch):
    from edgellm.distill import checkpoint as ckmod

    real, calls = ckmod._save_tensors, {"n": 0}

    def full_disk(tensors, path):
        calls["n"] += 1
        if calls["n"] > 3:  # the checkpoint at step 3 is 3 files; the one at step 6 fails half-written
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(ckmod, "_save_tensors", full_disk)
    out, ck = tmp_path / "run", tmp_path / "run.checkpoints"
    r = invoke("distill", teacher_dir, "-o", out, "--data", small_data, *RUN)
    assert r.exit_code == 2, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("error:") and "disk is full" in last and "step 3" in last, r.output
    assert not out.exists() and not list(ck.glob(".tmp-*"))
    saved = ckmod.CheckpointDir(ck).load()  # the previous checkpoint is whole and readable
    assert saved["step"] == 3 and saved["model"]
    monkeypatch.setattr(ckmod, "_save_tensors", real)
    r = invoke("distill", teacher_dir, "-o", out, "--data", small_data, *RUN, "--resume", ck)
    assert r.exit_code == 0, r.output
    assert numbers(curve(out)) == numbers(reference)


# ---- multi-process ---------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_match_one_process(teacher_dir, small_data, tmp_path, engine):
    """torchrun, 2 gloo processes x batch 2 == 1 process x batch 4 (same samples, averaged gradients)."""
    args = [
        "distill",
        str(teacher_dir),
        "--data",
        str(small_data),
        "--steps",
        "3",
        "--checkpoint-every",
        "2",
        "--seq-len",
        "64",
        "--no-eval",
    ]
    script = [sys.executable, "-c", "from edgellm.cli import main; main()"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    extra = ["--fsdp"] if engine == "fsdp" else []
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "--no-python",
            *script,
            *args,
            *extra,
            "-o",
            str(tmp_path / "ddp"),
            "--batch-size",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = invoke(*args, "-o", tmp_path / "one", "--batch-size", "4")
    assert one.exit_code == 0, one.output
    a, b = curve(tmp_path / "ddp"), curve(tmp_path / "one")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):  # within float noise (different reduction order)
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    rec = json.loads((tmp_path / "ddp" / "edgellm.json").read_text())["steps"][-1]
    assert rec["params"]["world"] == 2 and rec["params"]["fsdp"] == (engine == "fsdp")


# ---- bad input: one line, exit 2, nothing written --------------------------------------------


def _one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert text.startswith("error:"), result.output
    for w in words:
        assert w in text, text


def test_student_larger_than_teacher(teacher_dir, tmp_path):
    r = invoke("distill", teacher_dir, "-o", tmp_path / "o", "--student-layers", 4, *SMALL)
    _one_line_error(r, "smaller than the teacher")
    big = tiny.build("llama", seed=1, **{**TEACHER_CFG, "num_hidden_layers": 6})
    from transformers import AutoTokenizer

    tiny.save(big, AutoTokenizer.from_pretrained(str(teacher_dir)), tmp_path / "big")
    r = invoke("distill", teacher_dir, "-o", tmp_path / "o", "--student", tmp_path / "big", *SMALL)
    _one_line_error(r, "larger than the teacher")
    assert not (tmp_path / "o").exists()


def test_mismatched_vocabulary(teacher_dir, tmp_path):
    from transformers import AutoTokenizer

    other = tiny.build("llama", seed=1, **{**TEACHER_CFG, "num_hidden_layers": 1}, vocab_size=600)
    tiny.save(other, AutoTokenizer.from_pretrained(str(teacher_dir)), tmp_path / "s")
    r = invoke("distill", teacher_dir, "-o", tmp_path / "o", "--student", tmp_path / "s", *SMALL)
    _one_line_error(r, "vocabulary", "600", "512")


def test_empty_dataset(teacher_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    r = invoke("distill", teacher_dir, "-o", tmp_path / "o", "--data", tmp_path / "empty.txt", *SMALL)
    _one_line_error(r, "empty")
    (tmp_path / "short.txt").write_text("def f(x): return x\n" * 20)  # too short for one --seq-len 512 window
    r = invoke(
        "distill", teacher_dir, "-o", tmp_path / "o", "--data", tmp_path / "short.txt", "--seq-len", 512, "--no-eval"
    )
    _one_line_error(r, "--seq-len")
    assert not (tmp_path / "o").exists()


def test_resume_from_a_different_run(teacher_dir, small_data, tmp_path, monkeypatch):
    from edgellm.distill import data as ddata

    real = ddata.PackedData.batch

    def interrupted(self, step, micro, **kw):
        if step == 2:
            raise KeyboardInterrupt
        return real(self, step, micro, **kw)

    monkeypatch.setattr(ddata.PackedData, "batch", interrupted)
    ck = tmp_path / "o.checkpoints"
    r = invoke(
        "distill",
        teacher_dir,
        "-o",
        tmp_path / "o",
        "--data",
        small_data,
        "--steps",
        4,
        "--checkpoint-every",
        1,
        *SMALL,
    )
    assert r.exit_code == 130
    monkeypatch.setattr(ddata.PackedData, "batch", real)
    before = {p: p.stat().st_mtime_ns for p in ck.rglob("*")}
    r = invoke(
        "distill",
        teacher_dir,
        "-o",
        tmp_path / "o",
        "--data",
        small_data,
        "--steps",
        4,
        "--lr",
        1e-3,
        *SMALL,
        "--resume",
        ck,
    )
    _one_line_error(r, "different run", "train")
    r = invoke("distill", teacher_dir, "-o", tmp_path / "o", "--steps", 4, *SMALL, "--resume", ck)  # other data
    _one_line_error(r, "different run", "data")
    assert {p: p.stat().st_mtime_ns for p in ck.rglob("*")} == before  # nothing touched
    (tmp_path / "other").mkdir()  # not tmp_path itself: an output inside an input is refused first
    r = invoke("distill", teacher_dir, "-o", tmp_path / "o", "--steps", 4, *SMALL, "--resume", tmp_path / "other")
    _one_line_error(r, "not a distill checkpoint")
