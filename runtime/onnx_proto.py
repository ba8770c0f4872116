"""Just enough of the ONNX protobuf for the numba runtime: metadata and initializers of a ModelProto.

The runtime needs, from `model.onnx`, the `metadata_props` (edgellm's config) and, for every
initializer, its name, type, shape and where its bytes are (an offset into `model.onnx.data`, or
inline `raw_data`). Importing the `onnx` package for that cost 9 MB of RSS (its C++ extension and
protobuf) in a process whose whole budget is the model plus 150 MB, so this reads the protobuf
wire format directly (https://protobuf.dev/programming-guides/encoding/): varints, fixed 32/64-bit
values and length-delimited fields, skipping every field it does not need (the graph's nodes
included). `tests/test_runtime.py` checks it against `onnx.load` on every export the tests build.

Field numbers (onnx/onnx.proto3): ModelProto.graph = 7, ModelProto.metadata_props = 14;
GraphProto.initializer = 5; TensorProto: dims 1, data_type 2, float_data 4, int32_data 5,
int64_data 7, name 8, raw_data 9, double_data 10, external_data 13, data_location 14;
StringStringEntryProto: key 1, value 2.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


class ProtoError(ValueError):
    """The bytes are not a well-formed protobuf message."""


@dataclass
class Tensor:
    name: str = ""
    data_type: int = 0
    dims: list = field(default_factory=list)
    external: dict = field(default_factory=dict)  # location, offset, length
    data_location: int = 0
    raw: bytes | None = None
    values: list | None = None  # float_data / int32_data / int64_data / double_data, when not raw


def _varint(buf, i: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= end or shift > 63:
            raise ProtoError("truncated or overlong varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value) of one message; length-delimited values are (start, end)."""
    i = start
    while i < end:
        key, i = _varint(buf, i, end)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i, end)
        elif wt == 1:
            v, i = (i, i + 8), i + 8
        elif wt == 2:
            n, i = _varint(buf, i, end)
            v, i = (i, i + n), i + n
        elif wt == 5:
            v, i = (i, i + 4), i + 4
        else:
            raise ProtoError(f"unsupported wire type {wt}")
        if i > end:
            raise ProtoError("a field runs past the end of its message")
        yield num, wt, v


def _str(buf, span) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8")


def _entry(buf, span) -> tuple[str, str]:
    key = value = ""
    for num, wt, v in _fields(buf, *span):
        if num == 1 and wt == 2:
            key = _str(buf, v)
        elif num == 2 and wt == 2:
            value = _str(buf, v)
    return key, value


def _ints(buf, wt, v) -> list:
    """A repeated int field: packed (one length-delimited run of varints) or one varint."""
    if wt == 0:
        vals = [v]
    else:
        vals, i = [], v[0]
        while i < v[1]:
            x, i = _varint(buf, i, v[1])
            vals.append(x)
    return [x - (1 << 64) if x >= 1 << 63 else x for x in vals]  # int64 two's complement


def _fixed(buf, wt, v, fmt: str) -> list:
    size = struct.calcsize(fmt)
    data = bytes(buf[v[0]:v[1]])
    if len(data) % size:
        raise ProtoError("packed fixed-width field of a wrong length")
    return list(struct.unpack(f"<{len(data) // size}{fmt}", data))


def _tensor(buf, span) -> Tensor:
    t = Tensor()
    for num, wt, v in _fields(buf, *span):
        if num == 1:
            t.dims += _ints(buf, wt, v)
        elif num == 2 and wt == 0:
            t.data_type = v
        elif num == 8 and wt == 2:
            t.name = _str(buf, v)
        elif num == 9 and wt == 2:
            t.raw = bytes(buf[v[0]:v[1]])
        elif num == 13 and wt == 2:
            k, val = _entry(buf, v)
            t.external[k] = val
        elif num == 14 and wt == 0:
            t.data_location = v
        elif num in (4, 10):  # float_data / double_data: packed (wire type 2) or one fixed value
            t.values = (t.values or []) + _fixed(buf, wt, v, "f" if num == 4 else "d")
        elif num in (5, 7):  # int32_data / int64_data
            t.values = (t.values or []) + _ints(buf, wt, v)
    return t


def read_model(data: bytes) -> tuple[dict, list]:
    """(metadata_props as a dict, initializers as Tensors) of a serialized ModelProto."""
    buf = memoryview(data)
    meta, inits = {}, []
    for num, wt, v in _fields(buf, 0, len(buf)):
        if num == 14 and wt == 2:
            k, val = _entry(buf, v)
            meta[k] = val
        elif num == 7 and wt == 2:
            for gnum, gwt, gv in _fields(buf, *v):
                if gnum == 5 and gwt == 2:
                    inits.append(_tensor(buf, gv))
    return meta, inits
