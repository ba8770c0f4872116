"""Write a Graph as model.onnx + model.onnx.data (all initializers, one file, 64-byte aligned).

The data file is written by streaming each weight's bytes (no in-memory protobuf of the
weights, so no 2 GB limit); every tensor starts at a multiple of ALIGN so the runtime can
memory-map the file and view each weight in place with aligned SIMD loads. `DataSink` does the
writing: either at the end, over a graph's kept arrays, or as the graph builder adds each weight
(the streamed export: the same bytes in the same order, without holding them).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from .graph import MS_DOMAIN, OPSET, Graph

ONNX_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
ALIGN = 64
IR_VERSION = 10  # opset 21 needs IR 10; ONNX Runtime 1.18+ reads it
SHA256_KEY = "edgellm.sha256"  # metadata: {file: sha256} of the data and side files (runtime/loader.py verify_files)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _external(name: str, elem_type: int, dims: list, offset: int, length: int) -> TensorProto:
    t = TensorProto(name=name, data_type=elem_type, dims=dims)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", DATA_NAME), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = k, v
    return t


class DataSink:
    """model.onnx.data written a weight at a time: each tensor at the next multiple of ALIGN,
    its place and the running sha256 kept."""

    def __init__(self, out_dir: Path):
        self.fh = open(Path(out_dir) / DATA_NAME, "wb")
        self.offset = 0
        self.digest = hashlib.sha256()
        self.placed: dict[str, tuple[int, int]] = {}  # name -> (offset, length)

    def write(self, name: str, arr) -> None:
        pad = -self.offset % ALIGN
        self.fh.write(b"\0" * pad)
        self.digest.update(b"\0" * pad)
        self.offset += pad
        raw = memoryview(arr.reshape(-1)).cast("B")
        self.fh.write(raw)
        self.digest.update(raw)
        self.placed[name] = (self.offset, arr.nbytes)
        self.offset += arr.nbytes

    def close(self) -> None:
        if not self.fh.closed:
            self.fh.close()


def to_model(
    g: Graph, metadata: dict[str, str], out_dir: Path | None = None, checksums: dict[str, str] | None = None
) -> onnx.ModelProto:
    """The ModelProto; with `out_dir`, also writes the weights to out_dir/model.onnx.data and
    records its sha256 (with `checksums`, those of the side files) in the metadata."""
    inits = []
    sink = g.sink
    if sink is None and out_dir is not None:
        sink = DataSink(out_dir)
        try:
            for name, (arr, _, _) in g.weights.items():
                sink.write(name, arr)
        finally:
            sink.close()
    if sink is not None:
        sink.close()
    for name, (arr, elem_type, dims) in g.weights.items():
        if sink is None:
            inits.append(helper.make_tensor(name, elem_type, dims, arr.tobytes(), raw=True))
        else:
            inits.append(_external(name, elem_type, dims, *sink.placed[name]))
    graph = helper.make_graph(g.nodes, g.name, g.inputs, g.outputs, initializer=inits)
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(MS_DOMAIN, 1)] if g.uses_ms else [])
    model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="edgellm")
    if sink is not None:
        metadata = {
            **metadata,
            SHA256_KEY: json.dumps({**(checksums or {}), DATA_NAME: sink.digest.hexdigest()}, sort_keys=True),
        }
    helper.set_model_props(model, metadata)
    return model


def write(g: Graph, out_dir: Path, metadata: dict[str, str], checksums: dict[str, str] | None = None) -> dict:
    """Write model.onnx + model.onnx.data into out_dir; return their sizes in bytes. `checksums`:
    sha256 of side files already written there, recorded beside the data file's."""
    out_dir = Path(out_dir)
    model = to_model(g, metadata, out_dir, checksums)
    with open(out_dir / ONNX_NAME, "wb") as f:
        f.write(model.SerializeToString())
    return {"model.onnx": (out_dir / ONNX_NAME).stat().st_size, "model.onnx.data": (out_dir / DATA_NAME).stat().st_size}
