"""`export_model`: a loaded edgellm model -> an export directory (docs/EXPORT_FORMAT.md).

Build the graph for the model's family, stream the weights into model.onnx.data, add the
tokenizer, generation config, config.json, genai_config.json (export/interop.py) and edgellm.json,
check parity, and only then move the directory into place. A failed check keeps the files in
`<out>.failed-check` so they can be inspected.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgellm import __version__
from edgellm.errors import UnsupportedError
from edgellm.outputs import atomic_output_dir, check_output_dir
from edgellm.record import add_step, write_record
from edgellm.runtime.format.names import LLAMA_LIKE  # noqa: E402

from . import gpt2, llama
from .check import ParityError, check_parity
from .interop import write_side_files
from .weights import Options, check_options, tensor_bits
from .writer import ONNX_NAME, DataSink, sha256_file, write

# one builder for every RMSNorm family (it reads the family's description), one for GPT-2
BUILDERS = {**{a: llama for a in LLAMA_LIKE}, "gpt2": gpt2}
CHECK_PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""'
CHECK_PROMPT_TOKENS = 12


@dataclass
class ExportResult:
    out: Path
    sizes: dict
    seconds: float
    parity: dict | None = None
    quantization: dict | None = field(default=None)
    plan: object | None = None  # export/stream.py ExportPlan: the memory plan and which check ran (streamed)


def _builder(model):
    mt = model.config.model_type
    if mt not in BUILDERS:
        raise UnsupportedError(f"cannot export architecture '{mt}'; supported: {', '.join(sorted(BUILDERS))}")
    return BUILDERS[mt]


def metadata(model, record: dict, opts: Options) -> dict[str, str]:
    cfg = _builder(model).config_metadata(model)
    c = model.config
    cfg.update(
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
    )
    q = record.get("quantization")
    quant = (
        None
        if not q
        else {
            "bits": q["bits"],
            "group_size": q["group_size"],
            "sym": q["sym"],
            "method": q.get("method"),
            "embeddings": bool(q.get("embeddings")),
            "accuracy_level": opts.accuracy_level,
            "format": opts.format,
            "tensor_bits": tensor_bits(model),
        }
    )
    return {
        "edgellm.format_version": "1",
        "edgellm.version": __version__,
        "edgellm.config": json.dumps(cfg),
        "edgellm.quantization": json.dumps(quant),
        "edgellm.source": json.dumps({"source": record.get("source"), "steps": record.get("steps", [])}),
    }


def _prompt_ids(tokenizer, vocab: int) -> list[int]:
    ids = []
    if tokenizer is not None:
        ids = [i for i in tokenizer(CHECK_PROMPT, add_special_tokens=False)["input_ids"] if i < vocab]
    ids = ids[:CHECK_PROMPT_TOKENS]
    return ids if len(ids) >= 4 else [i % vocab for i in range(1, CHECK_PROMPT_TOKENS + 1)]


def _write_extras(model, tokenizer, out: Path) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    gen = getattr(model, "generation_config", None)
    if gen is None:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_model_config(model.config)
    gen.save_pretrained(str(out))


def _keep_failed(tmp: Path, out: Path) -> Path:
    kept = out.with_name(f"{out.name}.failed-check")
    n = 1
    while kept.exists():
        n += 1
        kept = out.with_name(f"{out.name}.failed-check-{n}")
    os.replace(tmp, kept)
    return kept


def export_model(
    loaded,
    out: Path,
    opts: Options | None = None,
    check: bool = True,
    force: bool = False,
    parts=None,
    checker=None,
) -> ExportResult:
    """Export `loaded` (edgellm.modelio.Loaded) to directory `out`. Each weight is written to
    model.onnx.data as the graph builder adds it. The streamed export (export/stream.py) passes
    a meta-device model with `parts` that load it one part at a time, and its `checker`
    (check_parity's signature) in place of the whole-model check."""
    opts = opts or Options()
    check_options(opts)
    out = Path(out)
    check_output_dir(out, force, inputs=[getattr(loaded, "source", None)])
    model = loaded.model
    t0 = time.perf_counter()
    builder = _builder(model)
    meta = metadata(model, loaded.record, opts)
    with atomic_output_dir(out, force, inputs=[getattr(loaded, "source", None)]) as tmp:
        _write_extras(model, loaded.tokenizer, tmp)  # first, so that model.onnx records their sha256
        write_side_files(model, json.loads(meta["edgellm.config"]), tmp)  # config.json, genai_config.json
        sums = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        sink = DataSink(tmp)
        try:
            graph = builder.build(model, opts, sink=sink, **({"parts": parts} if parts is not None else {}))
        finally:
            sink.close()
        sizes = write(graph, tmp, meta, sums)
        seconds = time.perf_counter() - t0
        parity = None
        if check:
            try:
                parity = (checker or check_parity)(tmp, model, _prompt_ids(loaded.tokenizer, model.config.vocab_size))
            except ParityError as exc:
                kept = _keep_failed(tmp, out)
                raise ParityError(f"{exc}; the export is kept at '{kept}' for inspection") from None
        step = dict(
            format=opts.format,
            accuracy_level=opts.accuracy_level,
            time_s=round(seconds, 2),
            sizes=sizes,
            parity=parity,
            sha256={ONNX_NAME: sha256_file(tmp / ONNX_NAME)},
        )  # the other files' are in its metadata
        write_record(tmp, add_step(loaded.record, "export", **step))
    return ExportResult(
        out=out, sizes=sizes, seconds=seconds, parity=parity, quantization=json.loads(meta["edgellm.quantization"])
    )
