"""A seeded mutation fuzzer for the runtime's loader: no crash, hang or traceback from any file.

    python tests/tools/fuzz_loader.py --n 20000 [--seed 0] [--minutes 15] [--json out.json]
    python tests/tools/fuzz_loader.py --device cuda --n 300     # the CUDA path, under numba's simulator

Each mutant is a copy of one of ten tiny exports (fp32 llama, 4-bit symmetric llama, 8-bit
asymmetric llama with quantized embeddings, fp32 GPT-2, and one per family of issue 25: Qwen3,
Gemma 3, SmolLM3, Phi-3 with LongRoPE, Granite, OLMo 2; `SEEDS`) with one mutation, drawn from
`MUTATORS` by a seeded RNG (the same --seed gives the same mutants):
- `model.onnx` bytes: bit flips, byte values, truncation, length varints and field tags;
- `model.onnx` structure (through the onnx package): metadata keys and values (every config and
  quantization key set to other types and to extreme values), initializer names swapped or
  renamed, dims, data types, external-data offsets/lengths/locations, tensors dropped,
  duplicated or inlined;
- `model.onnx.data`: bit flips, NaN/inf patterns, zeroed ranges, truncation, appended bytes;
- side files: tokenizer.json, tokenizer_config.json, generation_config.json and the chat
  template (bytes, truncation, bad UTF-8, JSON values of the wrong type, deleted files), plus a
  booby-trapped pickle planted beside the weights (unpickling it would create a marker file).

A worker process loads each mutant with `edgellm.runtime.load` (every 8th on the onnxruntime
backend) and generates 2 greedy tokens; the supervisor classifies each outcome:
`rejected` (an EdgeLLMError: the one-line message the CLI prints, exit 2), `accepted` (ran;
`changed` when its text differs from the unmutated seed's), and the failures the runtime must
never show: `crash` (the worker died of a signal), `hang` (no answer within --timeout s),
`exception` (any other exception: a traceback), `nan` (accepted with NaN/inf logits),
`memory` (the worker's peak RSS grew past --max-rss-mb), `unpickled` (the marker appeared),
`changed_verified` (every 16th mutant runs with verify=True, as `run --verify`: a changed
output that passed the sha256 check).
A failed worker is restarted and the campaign goes on. tests/test_fuzz.py runs a bounded
campaign in CI; this script is the long run.

`--device cuda` runs every mutant through the CUDA path (`load(..., device="cuda")`, which
validates through the same weights plan) under numba's CUDA simulator (`--gpu`: on a real GPU):
the simulator runs each CUDA thread as a Python thread, so a mutant gets a 1-token prompt, one
new token and a 16-token context there; every 16th mutant goes through the command line instead
(`edgellm run DIR --device cuda`, in-process with typer's CliRunner), where anything but exit 0,
or exit 2 with one `error:` line, is a `cli` failure. In both modes an EdgeLLMError whose
message spans several lines is a `multiline` failure (the CLI prints it as `error: ...`).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEEDS = (
    "llama-f32",
    "llama-q4",
    "llama-q8a",
    "gpt2-f32",
    # one export per family of issue 25, each with the metadata that sets it apart
    "qwen3-q4",  # q/k RMSNorm per head, head_dim != hidden / heads
    "gemma3-f32",  # sliding window (ring KV), local/global rope, four norms, GeGLU, soft-caps
    "smollm3-q4",  # NoPE layers
    "phi3-f32",  # partial rotary, LongRoPE (short/long factors, the switch)
    "granite-q4",  # embedding / residual / attention multipliers, logits scaling
    "olmo2-f32",  # post-norms, q/k RMSNorm over the whole projection
)
# the CUDA path's campaign mutates these (the simulator affords few seeds; the families' layers
# on the CUDA path are held to the CPU runtime by tests/cuda_families.py)
CUDA_SEEDS = SEEDS[:4]
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")
FAILURES = ("crash", "hang", "exception", "nan", "memory", "unpickled", "changed_verified", "multiline", "cli")
PROMPT = "def add(a, b):"
CUDA_RUN = dict(prompt="a", tokens=1, n_ctx=16)  # --device cuda: what the simulator affords per mutant
_MARKER = [Path("/nonexistent/edgellm-fuzz-marker")]  # set by campaign(): the file a trapped pickle would create


# ----------------------------------------------------------------------------- seeds
def make_seeds(root: Path) -> dict[str, Path]:
    """Build the tiny seed exports under `root` (needs the compress extra: torch, transformers)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    from typer.testing import CliRunner

    from edgellm.cli import app
    from edgellm.data import builtin_text

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([builtin_text()[:200_000]], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    common = dict(vocab_size=512, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    configs = {
        "llama": dict(
            model_type="llama",
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        ),
        "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512),
    }
    small = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    configs.update(
        qwen3=dict(small, model_type="qwen3", head_dim=24, tie_word_embeddings=True),
        gemma3=dict(
            small,
            model_type="gemma3_text",
            head_dim=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=20,
            attn_logit_softcapping=30.0,
            final_logit_softcapping=15.0,
            tie_word_embeddings=True,
        ),
        smollm3=dict(small, model_type="smollm3", no_rope_layer_interval=2, tie_word_embeddings=True),
        phi3=dict(
            small,
            model_type="phi3",
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0 + 0.3 * i for i in range(6)],
                "long_factor": [3.0 + 2.0 * i for i in range(6)],
            },
            original_max_position_embeddings=32,
            partial_rotary_factor=0.75,
            tie_word_embeddings=False,
        ),
        granite=dict(
            small,
            model_type="granite",
            embedding_multiplier=6.0,
            residual_multiplier=0.5,
            attention_multiplier=0.09,
            logits_scaling=2.5,
            tie_word_embeddings=False,
        ),
        olmo2=dict(small, model_type="olmo2", tie_word_embeddings=False),
    )
    quant = {
        "f32": [],
        "q4": ["--bits", "4", "--group-size", "32", "--sym"],
        "q8a": ["--bits", "8", "--group-size", "16", "--asym", "--quantize-embeddings"],
    }
    runner, out = CliRunner(), {}
    for name in SEEDS:
        fam, var = name.split("-")
        kw = dict(configs[fam])
        mt = kw.pop("model_type")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(mt, **kw, **common), dtype=torch.float32).eval()
        src = root / f"{name}-hf"
        model.save_pretrained(str(src), safe_serialization=True)
        fast.save_pretrained(str(src))
        if quant[var]:
            r = runner.invoke(
                app,
                [
                    "quantize",
                    str(src),
                    *quant[var],
                    "--method",
                    "rtn",
                    "--no-eval",
                    "-o",
                    str(root / f"{name}-q"),
                    "--force",
                ],
            )
            assert r.exit_code == 0, r.output
            src = root / f"{name}-q"
        r = runner.invoke(app, ["export", str(src), "-o", str(root / name), "--no-check", "--force"])
        assert r.exit_code == 0, r.output
        out[name] = root / name
    return out


# ----------------------------------------------------------------------------- mutators
INTERESTING = [0, -1, 1, 2, 3, 7, 255, 256, 4096, 65537, 10**6, 10**9, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64]


def _value(rng: random.Random, v):
    """Another JSON value for `v`: a near or extreme number, another type, or a broken string."""
    choices = [
        None,
        True,
        False,
        "x",
        "",
        [],
        {},
        [1, 2],
        1.5,
        -0.0,
        float("nan"),
        float("inf"),
        rng.choice(INTERESTING),
        -rng.choice(INTERESTING),
    ]
    if isinstance(v, bool):
        choices += [not v, 1, "true"]
    elif isinstance(v, int):
        choices += [v + 1, v - 1, v * 2, v // 2, max(v, 1) * 1000, v * 10**7, -v, float(v), str(v)]
    elif isinstance(v, float):
        choices += [v * 10, v / 10, -v, 0.0, 1e30, 1e-30, str(v)]
    elif isinstance(v, str):
        choices += [
            v + "x",
            v.upper(),
            v[: len(v) // 2],
            "rms",
            "layer",
            "gelu",
            "rope",
            "learned",
            "plain",
            "gated",
            "qwen2",
            "gpt2",
        ]
    elif isinstance(v, list):
        choices += [v[:-1], v + v, [None] * len(v), [str(x) for x in v]]
    return rng.choice(choices)


def _mutate_json(rng: random.Random, obj):
    """Change one value somewhere in a JSON tree (or delete a key); returns the new tree."""
    if not isinstance(obj, (dict, list)) or not obj:
        return _value(rng, obj)
    path, node = [], obj
    while isinstance(node, (dict, list)) and node and (not path or rng.random() < 0.6):
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append((node, key))
        node = node[key]
    parent, key = path[-1]
    if isinstance(parent, dict) and rng.random() < 0.15:
        del parent[key]
    else:
        parent[key] = _value(rng, parent[key])
    return obj


def _flip(rng, data: bytes, n: int | None = None) -> bytes:
    b = bytearray(data)
    for _ in range(n or rng.choice((1, 1, 2, 4, 16))):
        if b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def _bytes_set(rng, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 2, 8))):
        if b:
            b[rng.randrange(len(b))] = rng.choice((0, 0xFF, 0x7F, 0x80, 0x01, rng.randrange(256)))
    return bytes(b)


def _truncate(rng, data: bytes) -> bytes:
    return data[: rng.randrange(len(data))] if data else data


def _wire_spans(data: bytes):
    """(tag start, length-varint start, length-varint end, length) of length-delimited fields of
    the ModelProto, its graph and the graph's initializers (the messages the runtime parses)."""
    from edgellm.runtime.onnx_proto import ProtoError, _varint

    spans = []

    def walk(start, end, depth):
        i = start
        while i < end:
            tag = i
            try:
                key, i = _varint(data, i, end)
                wt = key & 7
                if wt == 0:
                    _, i = _varint(data, i, end)
                elif wt == 1:
                    i += 8
                elif wt == 5:
                    i += 4
                elif wt == 2:
                    ls = i
                    n, i = _varint(data, i, end)
                    spans.append((tag, ls, i, n))
                    if depth < 2 and (key >> 3) in (7, 5, 14, 13):
                        walk(i, min(i + n, end), depth + 1)
                    i += n
                else:
                    return
            except ProtoError:
                return

    walk(0, len(data), 0)
    return spans


def _enc(v: int) -> bytes:
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def m_onnx_varint(rng, files, proto):
    data = files["model.onnx"]
    tag, ls, le, n = rng.choice(_wire_spans(data))
    new = rng.choice((n + 1, n - 1 if n else 1, n + 8, n // 2, 0, n * 2, 2**31, 2**63 - 1, n + rng.randrange(1, 64)))
    return {"model.onnx": data[:ls] + _enc(max(new, 0)) + data[le:]}


def m_onnx_tag(rng, files, proto):
    data = files["model.onnx"]
    tag, ls, _, _ = rng.choice(_wire_spans(data))
    key = rng.choice((rng.randrange(256), (rng.randrange(1, 16) << 3) | rng.randrange(8), 0, 0x78 | rng.randrange(8)))
    return {"model.onnx": data[:tag] + bytes([key & 0x7F]) + data[ls:]}


def _proto_edit(edit):
    def mutator(rng, files, proto):
        import onnx

        m = onnx.ModelProto()
        m.CopyFrom(proto)
        edit(rng, m)
        return {"model.onnx": m.SerializeToString()}

    mutator.__name__ = edit.__name__
    return mutator


def _meta(m, key):
    for p in m.metadata_props:
        if p.key == key:
            return p
    return None


@_proto_edit
def m_meta_config(rng, m):
    p = _meta(m, "edgellm.config")
    p.value = json.dumps(_mutate_json(rng, json.loads(p.value)))


@_proto_edit
def m_meta_family(rng, m):
    """One of the per-layer description's keys (runtime/features.py KEYS), the window or the rope
    scaling: changed inside when it is a list or object, else set to another value (or added)."""
    from edgellm.runtime.features import KEYS

    p = _meta(m, "edgellm.config")
    cfg = json.loads(p.value)
    key = rng.choice((*KEYS, "sliding_window", "rope_scaling", "head_dim", "rope_theta"))
    if isinstance(cfg.get(key), (dict, list)) and cfg[key] and rng.random() < 0.7:
        cfg[key] = _mutate_json(rng, cfg[key])
    else:
        cfg[key] = _value(rng, cfg.get(key))
    p.value = json.dumps(cfg)


@_proto_edit
def m_meta_quant(rng, m):
    p = _meta(m, "edgellm.quantization")
    q = json.loads(p.value)
    p.value = json.dumps(_mutate_json(rng, q if q is not None else {"bits": 4, "group_size": 32, "sym": True}))


@_proto_edit
def m_meta_text(rng, m):
    p = rng.choice(list(m.metadata_props))
    kind = rng.randrange(5)
    if kind == 0:
        p.value = p.value[: rng.randrange(len(p.value) + 1)]
    elif kind == 1:
        m.metadata_props.remove(p)
    elif kind == 2:
        p.key = p.key + "x"
    elif kind == 3:
        p.value = rng.choice(("", "null", "[]", "{}", "2", '"1"', "[" * 5000, "NaN"))
    else:
        extra = m.metadata_props.add()
        extra.key, extra.value = p.key, p.value


def _init(rng, m):
    return rng.choice(list(m.graph.initializer))


@_proto_edit
def m_init_swap(rng, m):
    a, b = rng.sample(list(m.graph.initializer), 2)
    a.name, b.name = b.name, a.name


@_proto_edit
def m_init_rename(rng, m):
    t = _init(rng, m)
    t.name = rng.choice(
        (
            t.name + "_",
            t.name.replace(".weight", ".qweight"),
            t.name.replace("qzeros", "zeros"),
            t.name.replace(".1.", ".2.").replace(".0.", ".5."),
            "lm_head.weight",
            "",
        )
    )


@_proto_edit
def m_init_dims(rng, m):
    t = _init(rng, m)
    dims = list(t.dims)
    kind = rng.randrange(4)
    if kind == 0 and dims:
        i = rng.randrange(len(dims))
        dims[i] = rng.choice((dims[i] + 1, dims[i] - 1, dims[i] * 2, dims[i] // 2, 0, 1, 2**31, 2**40, -1))
    elif kind == 1:
        dims.append(rng.choice((1, 2)))
    elif kind == 2 and dims:
        dims.pop()
    else:
        dims = dims[::-1]
    del t.dims[:]
    t.dims.extend(dims)


@_proto_edit
def m_init_dtype(rng, m):
    _init(rng, m).data_type = rng.choice((0, 1, 2, 3, 5, 6, 7, 9, 10, 11, 12, 16, 21, 22, 99))


@_proto_edit
def m_init_external(rng, m):
    t = _init(rng, m)
    e = rng.choice(list(t.external_data))
    if e.key == "location":
        e.value = rng.choice(
            ("../model.onnx.data", "/etc/passwd", "model.onnx", "tokenizer.json", "", "model.onnx.data\x00")
        )
    else:
        v = int(e.value)
        e.value = rng.choice(
            (
                str(v + 64),
                str(v - 64),
                str(v + 1),
                str(v + 4),
                "0",
                str(v * 2),
                str(2**63),
                "-64",
                "1e3",
                "abc",
                " 64",
                str(v + rng.randrange(-4096, 4096) // 64 * 64),
            )
        )


@_proto_edit
def m_init_drop(rng, m):
    t = _init(rng, m)
    kind = rng.randrange(3)
    if kind == 0:
        m.graph.initializer.remove(t)
    elif kind == 1:
        m.graph.initializer.add().CopyFrom(t)
    else:
        del t.external_data[:]
        t.data_location = 0
        t.raw_data = bytes(rng.randrange(0, 64))


M_ONNX_BYTES = [
    lambda r, f, p: {"model.onnx": _flip(r, f["model.onnx"])},
    lambda r, f, p: {"model.onnx": _bytes_set(r, f["model.onnx"])},
    lambda r, f, p: {"model.onnx": _truncate(r, f["model.onnx"])},
]


def m_data(rng, files, proto):
    import struct

    data = files["model.onnx.data"]
    kind = rng.randrange(5)
    if kind == 0:
        return {"model.onnx.data": _flip(rng, data, rng.choice((1, 8, 64)))}
    if kind == 1:  # NaN / inf / huge float patterns at aligned places
        b = bytearray(data)
        for _ in range(rng.choice((1, 4))):
            i = rng.randrange(len(b) // 4) * 4
            b[i : i + 4] = struct.pack("<f", rng.choice((float("nan"), float("inf"), -float("inf"), 3e38)))
        return {"model.onnx.data": bytes(b)}
    if kind == 2:
        i = rng.randrange(len(data))
        return {
            "model.onnx.data": data[:i]
            + b"\0" * min(len(data) - i, rng.choice((64, 4096)))
            + data[i + 4096 :][: max(0, len(data) - i - 4096)]
        }
    if kind == 3:
        return {"model.onnx.data": _truncate(rng, data)}
    return {"model.onnx.data": data + os.urandom(rng.choice((1, 64, 4096)))}


def m_side(rng, files, proto):
    name = rng.choice([n for n in SIDE_FILES if n in files])
    data = files[name]
    kind = rng.randrange(6)
    if kind == 0:
        return {name: _flip(rng, data)}
    if kind == 1:
        return {name: _truncate(rng, data)}
    if kind == 2:
        return {name: data[: len(data) // 2] + b"\xff\xfe\xc3" + data[len(data) // 2 :]}
    if kind == 3:
        return {name: None}  # deleted
    if kind == 4 and name.endswith(".jinja"):
        return {
            name: rng.choice(
                (b"{% for %}", b"{{ messages[0].nope.x }}", b"{{ raise_exception('no') }}", b"{% if %}", b"{{ 1/0 }}")
            )
        }
    try:
        obj = json.loads(data)
    except ValueError:
        return {name: _flip(rng, data)}
    return {name: json.dumps(_mutate_json(rng, obj)).encode()}


def m_pickle(rng, files, proto):
    """A booby-trapped pickle beside the weights: unpickling it would create MARKER."""
    import pickle

    class Trap:
        def __reduce__(self):
            return (open, (str(_MARKER[0]), "w"))

    name = rng.choice(("pytorch_model.bin", "model.pkl", "tokenizer.pkl", "model.onnx.data.pkl"))
    return {name: pickle.dumps(Trap())}


MUTATORS = {
    "onnx_bytes": (M_ONNX_BYTES, 12),
    "onnx_varint": ([m_onnx_varint], 6),
    "onnx_tag": ([m_onnx_tag], 4),
    "meta_config": ([m_meta_config], 14),
    "meta_family": ([m_meta_family], 6),
    "meta_quant": ([m_meta_quant], 5),
    "meta_text": ([m_meta_text], 5),
    "init_swap": ([m_init_swap], 5),
    "init_rename": ([m_init_rename], 4),
    "init_dims": ([m_init_dims], 6),
    "init_dtype": ([m_init_dtype], 4),
    "init_external": ([m_init_external], 6),
    "init_drop": ([m_init_drop], 3),
    "data": ([m_data], 12),
    "side": ([m_side], 12),
    "pickle": ([m_pickle], 2),
}


# ----------------------------------------------------------------------------- worker
def _run_cli(job: dict) -> dict:
    """`edgellm run DIR --device ...` in this process: exit 0, or exit 2 with one `error:` line."""
    from typer.testing import CliRunner

    from edgellm.cli import app

    args = ["run", job["dir"], "-p", job.get("prompt", PROMPT), "-t", "0", "-n", str(job.get("tokens", 2))]
    args += ["--device", job.get("device", "cpu"), "--threads", "1"]
    args += ["--ctx", str(job["n_ctx"])] if job.get("n_ctx") else []
    args += ["--verify"] if job.get("verify") else []
    r = CliRunner().invoke(app, args)
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    if r.exit_code == 0:
        return {"status": "accepted", "nan": False, "text": None}
    if r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"):
        return {"status": "rejected", "detail": lines[0][:200]}
    exc = f"{type(r.exception).__name__}: {str(r.exception)[:120]} | " if r.exception else ""
    return {"status": "cli", "detail": f"exit {r.exit_code}: {exc}{' / '.join(lines)[-200:]}"}


def worker_main():
    """Read one job per stdin line ({dir, backend, device, verify, ...}), answer one JSON line per
    job on stdout."""
    import numpy as np

    from edgellm.errors import EdgeLLMError
    from edgellm.runtime import Sampling, load

    out = sys.stdout
    sys.stdout = sys.stderr  # nothing else may write on the answer channel
    for line in sys.stdin:
        job = json.loads(line)
        res = {"status": "accepted", "nan": False}
        try:
            if job.get("cli"):
                res = _run_cli(job)
            else:
                gen = load(
                    job["dir"],
                    backend=job["backend"],
                    threads=1,
                    warmup=False,
                    verify=job.get("verify", False),
                    device=job.get("device", "cpu"),
                    n_ctx=job.get("n_ctx"),
                )
                model, forward = gen.model, gen.model.forward

                def checked(ids, all_logits=False, prompt=False):
                    logits = forward(ids, all_logits, prompt)
                    if not np.isfinite(logits).all():
                        res["nan"] = True
                    return logits

                model.forward = checked
                sampling = Sampling(temperature=0, max_new_tokens=job.get("tokens", 2))
                res["text"] = "".join(gen.stream(job.get("prompt", PROMPT), sampling))
                model.close()
        except EdgeLLMError as exc:
            msg = str(exc)
            res = {"status": "multiline" if "\n" in msg.strip() else "rejected", "detail": msg[:200]}
        except Exception as exc:  # what the fuzzer is hunting for
            res = {"status": "exception", "detail": f"{type(exc).__name__}: {str(exc)[:200]}"}
        from edgellm.benchmarks.environment import proc_kib_field

        res["hwm"] = proc_kib_field("/proc/self/status", "VmHWM")
        out.write(json.dumps(res) + "\n")
        out.flush()


class Worker:
    def __init__(self, env):
        self.env = env
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker"],  # a test tool: run by path
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=self.env,
            text=True,
            bufsize=1,
        )
        self.hwm = None

    def ask(self, job: dict, timeout: float) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not ready:
            self.stop()
            return {"status": "hang"}
        if not line:
            rc = self.proc.wait()
            self.proc = None
            return {"status": "crash", "detail": f"worker exit {rc}"}
        return json.loads(line)

    def stop(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


# ----------------------------------------------------------------------------- campaign
def error_kind(detail: str) -> str:
    """A rejection's message with its particulars (paths, names, numbers) blanked, to count kinds:
    "'...' packs N columns but the layer has N inputs"."""
    kind = re.sub(r"'[^']*'|\"[^\"]*\"", "'...'", detail.removeprefix("error: "))
    kind = re.sub(r"(?<![A-Za-z_\d.])-?\d+(?:[.,]\d+)*(?:e[+-]?\d+)?", "N", kind)  # not sha256
    return kind[:90]


def _load_seed(path: Path):
    import onnx

    files = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    return files, onnx.load_from_string(files["model.onnx"])


def _write_mutant(dst: Path, src: Path, files: dict, changed: dict):
    dst.mkdir()
    for name in files:
        if name not in changed:
            try:
                os.link(src / name, dst / name)
            except OSError:  # another file system
                shutil.copyfile(src / name, dst / name)
    for name, data in changed.items():
        if data is not None:
            (dst / name).write_bytes(data)


def campaign(
    seeds: dict,
    n: int,
    seed: int = 0,
    timeout: float = 20.0,
    minutes: float | None = None,
    max_rss_mb: int = 1500,
    progress=None,
    device: str = "cpu",
    simulator: bool = True,
) -> dict:
    """Run `n` mutants (or until `minutes` pass); counts by outcome and mutator, and examples of failures.
    device="cuda": through the CUDA path (CUDA_SEEDS only), under numba's CUDA simulator unless
    `simulator` is False."""
    rng = random.Random(seed)
    if device == "cuda":
        seeds = {k: v for k, v in seeds.items() if k in CUDA_SEEDS}
    loaded = {k: _load_seed(Path(p)) for k, p in seeds.items()}
    work = Path(tempfile.mkdtemp(prefix="edgellm-fuzz-"))
    marker = work / "UNPICKLED"
    _MARKER[0] = marker
    env = {**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    if device == "cuda" and simulator:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    run = CUDA_RUN if device == "cuda" else {}
    w = Worker(env)
    names, weights = zip(*[(k, v[1]) for k, v in MUTATORS.items()])
    counts = collections.Counter()
    by_class = collections.defaultdict(collections.Counter)
    by_seed = collections.defaultdict(collections.Counter)
    kinds = collections.Counter()  # error_kind of each rejection
    examples = collections.defaultdict(list)
    baseline = {}
    t0 = time.monotonic()
    try:
        for key in seeds:
            res = w.ask({"dir": str(seeds[key]), "backend": "numba", "device": device, **run}, timeout * 5)
            assert res["status"] == "accepted", (key, res)
            baseline[key] = res["text"]
        done = 0
        for i in range(n):
            if minutes is not None and time.monotonic() - t0 > minutes * 60:
                break
            key = rng.choice(list(seeds))
            files, proto = loaded[key]
            cls = rng.choices(names, weights)[0]
            fn = rng.choice(MUTATORS[cls][0])
            try:
                changed = fn(rng, files, proto)
            except (IndexError, ValueError):  # a mutator with nothing to act on (e.g. no external entry)
                changed = {"model.onnx.data": _flip(rng, files["model.onnx.data"])}
                cls = "data"
            # every 8th: the onnxruntime backend (cpu); every 16th: the command line (cuda)
            backend = "onnxruntime" if i % 8 == 7 and device == "cpu" else "numba"
            cli = i % 16 == 7 and device == "cuda"
            verify = i % 16 == 3  # run --verify: flipped weight bytes must be caught too
            d = work / f"m{i}"
            _write_mutant(d, Path(seeds[key]), files, changed)
            job = {"dir": str(d), "backend": backend, "verify": verify, "device": device, "cli": cli, **run}
            res = w.ask(job, timeout)
            status = res["status"]
            if status == "accepted":
                if res.get("nan"):
                    status = "nan"
                elif res.get("text") is not None and res["text"] != baseline[key] and backend == "numba":
                    status = "changed_verified" if verify else "changed"  # the former: --verify missed a change
            if res.get("hwm") and res["hwm"] > max_rss_mb * 1024 * 1024:
                status = "memory"
                w.stop()
            if marker.exists():
                status = "unpickled"
                marker.unlink()
            counts[status] += 1
            by_class[cls][status] += 1
            by_seed[key][status] += 1
            if status == "rejected":
                kinds[error_kind(res.get("detail", ""))] += 1
            if status in FAILURES and len(examples[status]) < 20:
                examples[status].append(
                    {"i": i, "seed": key, "class": cls, "backend": backend, "cli": cli, "detail": res.get("detail", "")}
                )
            shutil.rmtree(d, ignore_errors=True)
            done += 1
            if progress is not None and done % 100 == 0:
                progress(done, counts, time.monotonic() - t0)
    finally:
        w.stop()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "mutants": done,
        "device": device + (" (simulator)" if device == "cuda" and simulator else ""),
        "seconds": round(time.monotonic() - t0, 1),
        "seed": seed,
        "counts": dict(counts),
        "by_class": {k: dict(v) for k, v in sorted(by_class.items())},
        "by_seed": {k: dict(v) for k, v in sorted(by_seed.items())},
        "error_kinds": dict(kinds.most_common()),
        "failures": sum(counts[f] for f in FAILURES),
        "examples": dict(examples),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="mutants to run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=None, help="stop after this many minutes")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds before a mutant counts as a hang")
    ap.add_argument("--seeds-dir", type=Path, default=None, help="reuse (or build) the seed exports here")
    ap.add_argument("--json", type=Path, default=None, help="write the counts here")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="the runtime path each mutant runs on")
    ap.add_argument("--gpu", action="store_true", help="with --device cuda: a real GPU, not numba's CUDA simulator")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker_main()
    root = a.seeds_dir or Path(tempfile.mkdtemp(prefix="edgellm-fuzz-seeds-"))
    seeds = {k: root / k for k in SEEDS}
    if not all((p / "model.onnx").is_file() for p in seeds.values()):
        seeds = make_seeds(root)

    def progress(done, counts, s):
        print(f"{done} mutants, {s:.0f} s: {dict(counts)}", file=sys.stderr, flush=True)

    result = campaign(seeds, a.n, a.seed, a.timeout, a.minutes, progress=progress, device=a.device, simulator=not a.gpu)
    text = json.dumps(result, indent=1)
    if a.json:
        a.json.write_text(text)
    print(text)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
