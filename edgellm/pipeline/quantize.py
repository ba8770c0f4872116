"""Quantize a model's linear weights to 4 or 8 bits (RTN, GPTQ or AWQ), stored packed."""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..errors import EdgeLLMError
from .common import SEED_MAX, calib_data, check_context, check_range, data_tokens, load
from .options import option


class Embeddings(str, Enum):
    eight = "8"
    four = "4"
    keep = "keep"


class Method(str, Enum):
    rtn = "rtn"
    gptq = "gptq"
    awq = "awq"


@dataclass
class QuantizeOptions:
    bits: int = option(4, "--bits")
    method: Method = option(Method.gptq, "--method")  # the most accurate of the three at 4 bits
    group_size: int = option(128, "--group-size")  # -1: per channel
    sym: bool = option(True, "--sym")
    float_zero: bool = option(False, "--float-zero")  # with sym=False: fp16 zero points (Q4_1 style)
    embeddings: Embeddings = option(Embeddings.eight, "--embeddings")  # 8-bit, as llama.cpp's Q8_0
    quantize_embeddings: bool | None = option(None, "--quantize-embeddings")  # old spelling of `embeddings`
    rotate: bool = option(False, "--rotate")
    target_bpw: float | None = option(None, "--target-bpw")  # mixed precision to this many bits/weight
    clip_search: bool = option(True, "--clip-search")
    act_order: bool = option(True, "--act-order")
    damp: float = option(0.01, "--damp", min=0.0, max=1.0)  # GPTQ: fraction of mean(diag H)
    data: str | None = option(None, "--data")  # None: the built-in corpus
    calib_samples: int = option(32, "--calib-samples", min=1)
    seq_len: int = option(512, "--seq-len", min=8)
    evaluate: bool = option(True, "--eval")  # perplexity before and after
    eval_tokens: int = option(4096, "--eval-tokens", min=64)
    seed: int = option(0, "--seed")


@dataclass
class QuantizeResult:
    output: Path
    layers: list[dict]  # per linear: layer, shape, bits, group_size, sym, zero, rel_error
    info: dict  # edgellm.json's "quantization" entry
    seconds: float  # the quantization itself (without loading and evaluation)
    before: object | None  # evaluate.Quality of the input, when measured
    after: object | None


def quant_config(o: QuantizeOptions):
    """The QuantConfig the options describe (checked before any heavy work)."""
    from ..quant.apply import QuantConfig
    from ..quant.formats import QuantFormat

    if o.float_zero and o.sym:
        raise EdgeLLMError("--float-zero needs --asym (symmetric formats store no zero points)")
    fmt = QuantFormat(o.bits, o.group_size, o.sym, "float" if o.float_zero else "int")
    check_range("--damp", o.damp, 0.0, 1.0)
    check_range("--seed", o.seed, 0, SEED_MAX)
    if o.quantize_embeddings is None:
        emb = Embeddings(o.embeddings).value
    else:
        emb = str(o.bits) if o.quantize_embeddings else "keep"
    return QuantConfig(
        fmt=fmt,
        method=Method(o.method).value,
        damp=o.damp,
        act_order=o.act_order,
        embeddings=emb,
        rotate=o.rotate,
        target_bpw=o.target_bpw,
        clip_search=o.clip_search,
        seed=o.seed,
    )


def _check_model(loaded, spec: str, o: QuantizeOptions) -> None:
    """What the loaded model must allow: context, not quantized yet, rotation, the mixed budget."""
    check_context(loaded.model, "--seq-len", o.seq_len)
    if loaded.record.get("quantization"):
        raise EdgeLLMError(f"'{spec}' is already quantized; quantize the unquantized model instead")
    if o.rotate:
        from ..quant.rotation import check_rotatable

        check_rotatable(loaded.model)
    if o.target_bpw is not None:
        from ..quant.mixed import MIN_TOKENS, SENS_SAMPLES, SENS_TOKENS, check_budget

        check_budget(loaded.model, o.target_bpw)
        if min(o.calib_samples, SENS_SAMPLES) * min(o.seq_len, SENS_TOKENS) < MIN_TOKENS:
            raise EdgeLLMError(
                f"--calib-samples {o.calib_samples} x --seq-len {o.seq_len} is too small for the sensitivity pass "
                f"of --target-bpw; it needs at least {MIN_TOKENS} tokens"
            )


def run_quantize(
    model: str, output: Path, options: QuantizeOptions, progress=None, force: bool = False
) -> QuantizeResult:
    """Quantize `model` into the model directory `output` (written whole at the end)."""
    from ..data import calibration_batch, split_tokens
    from ..evaluate import evaluate as measure
    from ..modelio import save_model
    from ..outputs import atomic_output_dir, check_output_dir
    from ..progress import NULL
    from ..quant.apply import quantize_model
    from ..record import add_step

    o, progress = options, progress or NULL
    cfg = quant_config(o)
    inputs = [model, o.data]
    check_output_dir(output, force, inputs)
    loaded = load(model, progress=progress)
    _check_model(loaded, model, o)
    ids = data_tokens(loaded.tokenizer, o.data)
    calib = calibration_batch(ids, o.calib_samples, o.seq_len, seed=o.seed)
    eval_ids = split_tokens(ids, "eval")

    def quality():
        return measure(loaded.model, eval_ids, max_tokens=o.eval_tokens, progress=progress) if o.evaluate else None

    before = quality()
    t0 = time.perf_counter()
    layers, info = quantize_model(loaded.model, cfg, calib, progress=progress)
    seconds = time.perf_counter() - t0
    after = quality()
    record = add_step(
        loaded.record,
        "quantize",
        params=cfg.to_dict(),
        time_s=round(seconds, 2),
        data=calib_data(o.data, calib, o.seed),
        quality={"before": before.to_dict(), "after": after.to_dict()} if o.evaluate else None,
    )
    record["quantization"] = info
    with atomic_output_dir(output, force, inputs) as tmp:
        save_model(loaded.model, loaded.tokenizer, tmp, record)
    return QuantizeResult(output, layers, info, seconds, before, after)
