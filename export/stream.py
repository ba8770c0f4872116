"""The streamed export (issue 26): a checkpoint directory -> an export with one part of the model
in memory at a time.

The model is a meta-device skeleton (no memory) with the packed modules edgellm.json names
swapped in; `Parts` loads one part of it from the checkpoint (edgellm/checkpoint.py: a tensor at
a time, in its stored dtype, widened exactly as the resident load widens it) when the graph
builder reaches it (the embedding, layer i, the final norm and head) and drops the part before.
The graph builder hands each weight to a writer.DataSink the moment it adds it, so
model.onnx.data is written tensor by tensor: the same bytes, order and alignment as the resident
export (a test holds the two files equal).

The parity check: a model whose weights and check fit `--max-memory` and FULL_CHECK_MAX_BYTES is
loaded whole and checked as the resident export checks it (check.check_parity); a larger one is
checked layer by layer (check_layers.check_layers); the record says which one ran.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgellm.errors import EdgeLLMError
from edgellm.memory import human, rss
from edgellm.skeleton import materialize, release, tied_head

# The whole-model check holds the model in torch and the export in two ONNX Runtime sessions
# (the shipped graph and its accuracy_level 0 twin, each with prepacked weights): about 6x the
# weights. Above this many bytes of weights the layer-by-layer check runs instead.
FULL_CHECK_MAX_BYTES = 512 * 10**6
FULL_CHECK_FACTOR = 6


def not_streamed(path: Path, config) -> str | None:
    """Why the export of `path` loads the model whole (None: it streams)."""
    if not Path(path).is_dir():
        return "a GGUF file or hub id"
    from edgellm.arch import stream_refusal

    return stream_refusal(config)


@dataclass
class Source:
    """What export_model reads from a loaded model (modelio.Loaded's fields), with the model on
    the meta device and the checkpoint it is loaded from part by part."""

    model: object
    tokenizer: object
    source: str
    record: dict
    ckpt: object


def open_source(path: Path, config) -> Source:
    """The skeleton of the checkpoint directory `path` (edgellm/skeleton.py), checked against its
    tensors (names, shapes) before anything is written."""
    import transformers

    from edgellm.record import read_record
    from edgellm.skeleton import open_skeleton

    path = Path(path)
    record = read_record(path)
    model, ckpt = open_skeleton(path, config, record)
    if not record.get("quantization") and model.can_generate():  # as from_pretrained reads it
        try:
            model.generation_config = transformers.GenerationConfig.from_pretrained(str(path))
        except OSError:
            pass
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    record.setdefault("source", {"kind": "directory", "path": str(path.resolve())})
    return Source(model=model, tokenizer=tokenizer, source=str(path), record=record, ckpt=ckpt)


class Parts:
    """llama.build's parts of a meta-device model, loaded from the checkpoint one at a time."""

    def __init__(self, model, ckpt):
        from edgellm.arch import family_of, get_path
        from edgellm.skeleton import module_names

        self.model, self.ckpt = model, ckpt
        self.family = family_of(model.config)
        self.layers = get_path(model, self.family.layers)
        self.final_norm = get_path(model, self.family.final_norm)
        self.names = module_names(model)
        self.loaded: list = []
        self.boundaries: dict[int, str] = {}  # i -> graph tensor of the residual stream before layer i

    def modules(self, part: str, i: int | None = None) -> list:
        if part == "embedding":
            return [self.model.get_input_embeddings()]
        if part == "layer":
            return [self.layers[i]]
        if part == "final":
            return [self.final_norm] + ([] if tied_head(self.model) else [self.model.get_output_embeddings()])
        raise ValueError(part)

    def load(self, part: str | None, i: int | None = None) -> None:
        """Drop what is loaded, then load `part` (None: nothing)."""
        for m in self.loaded:
            release(m)
        self.loaded = []
        if part is not None:
            for m in self.modules(part, i):
                self.materialize(m)

    def load_all(self) -> None:
        """Every part at once (the whole-model check)."""
        self.load(None)
        for m in self.modules("embedding") + list(self.layers) + self.modules("final"):
            self.materialize(m)

    def materialize(self, module) -> None:
        materialize(module, self.names[id(module)], self.ckpt)
        self.loaded.append(module)

    def hollow(self, spec):
        """`spec` with its arrays replaced by zero-stride views: shapes and dtypes, no memory."""

        def shape_only(a):
            if a is None:
                return None
            return np.lib.stride_tricks.as_strided(np.zeros(1, a.dtype), a.shape, (0,) * a.ndim, writeable=False)

        return replace(spec, w=shape_only(spec.w), qweight=shape_only(spec.qweight), scales=shape_only(spec.scales))

    def boundary(self, i: int, h: str) -> None:
        self.boundaries[i] = h

    def part_bytes(self) -> dict[str, int]:
        """Bytes each part takes loaded (fp32 for float tensors, stored bytes for packed ones)."""

        def size(modules):
            return sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())

        out = {"embedding": size(self.modules("embedding")), "final": size(self.modules("final"))}
        out["layer"] = max(size([m]) for m in self.layers)
        return out


@dataclass
class ExportPlan:
    check: str  # "whole model", "layer by layer" or "none"
    need: int  # bytes at the peak
    parts: dict  # stage -> bytes


def plan_export(source: Source, parts: Parts, check: bool, budget: int, how: str) -> ExportPlan:
    """The memory the export and its check need, the check that fits; refuses (naming the need)
    when not even one part fits `budget`."""
    sizes = parts.part_bytes()
    weights = sum(sizes.values()) + (len(parts.layers) - 1) * sizes["layer"]
    c = source.model.config
    base = rss()
    # a part in torch, its specs (fused copies) and the bytes being written
    export = base + 3 * max(sizes.values())
    # torch's dequantized fp32 head for the logits, 20 tokens
    head = 4 * c.vocab_size * c.hidden_size + 4 * 20 * c.vocab_size * 3
    whole = base + weights * (1 + FULL_CHECK_FACTOR) + head
    # one part in torch and in two ONNX Runtime sessions (prepacked), a linear dequantized in fp32
    d, i_f = c.hidden_size, c.intermediate_size
    # (ONNX Runtime may widen an 8-bit head to fp32 when it prepacks it: V x d x 4 bytes)
    layers = base + 5 * max(sizes.values()) + 4 * max(d, i_f) * d * 2 + 4 * c.vocab_size * (d + 60)
    stages = {"process": base, "export": export, "whole-model check": whole, "layer-by-layer check": layers}
    if not check:
        mode, need = "none", export
    elif whole <= budget and weights <= FULL_CHECK_MAX_BYTES:
        mode, need = "whole model", whole
    else:
        mode, need = "layer by layer", max(layers, export)
    if need > budget:
        what = "exporting" if mode == "none" else f"exporting and checking {mode}"
        raise EdgeLLMError(
            f"{what} needs about {human(need)} (the largest part, {human(max(sizes.values()))}, loaded with its "
            f"checks), more than the budget of {human(budget)} ({how}); raise --max-memory"
        )
    return ExportPlan(mode, need, stages)


def export_streamed(
    path: Path, config, out: Path, opts, check: bool, force: bool, budget: int, how: str, progress=None
):
    """Export the checkpoint directory `path` part by part; returns exporter.ExportResult with
    `parity["check"]` saying which check ran."""
    from .check import check_parity
    from .check_layers import check_layers
    from .exporter import export_model

    source = open_source(path, config)
    parts = Parts(source.model, source.ckpt)
    plan = plan_export(source, parts, check, budget, how)

    def checker(tmp, model, prompt_ids):
        if plan.check == "whole model":
            parts.load_all()
            try:
                return check_parity(tmp, model, prompt_ids)
            finally:
                parts.load(None)
        return check_layers(tmp, model, parts, prompt_ids, progress=progress)

    result = export_model(source, out, opts, check=check, force=force, parts=parts, checker=checker)
    result.plan = plan
    return result
