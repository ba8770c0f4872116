"""Just enough of the ONNX protobuf for the numba runtime: metadata and initializers of a ModelProto.

The runtime needs, from `model.onnx`, the `metadata_props` (edgellm's config) and, for every
initializer, its name, type, shape and where its bytes are (an offset into `model.onnx.data`, or
inline `raw_data`). Importing the `onnx` package for that cost 9 MB of RSS (its C++ extension and
protobuf) in a process whose whole budget is the model plus 150 MB, so this reads the protobuf
wire format directly (https://protobuf.dev/programming-guides/encoding/): varints, fixed 32/64-bit
values and length-delimited fields, skipping every field it does not need (the graph's nodes
included). `tests/test_runtime.py` checks it against `onnx.load` on every export the tests build.

The file is untrusted input: every failure (a varint past the end, a length past its message, a
wire type that does not exist, text that is not UTF-8, a value list larger than the file could
hold) is a ProtoError, nothing else; nothing is allocated beyond the size of the file itself.

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
        if num == 0:
            raise ProtoError("field number 0 (not a protobuf message)")
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


def _str(buf, wt, v) -> str:
    if wt != 2:
        raise ProtoError(f"a string field has wire type {wt}")
    try:
        return bytes(buf[v[0] : v[1]]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtoError(f"a string field is not UTF-8 ({exc.reason} at byte {v[0] + exc.start})") from None


def _entry(buf, wt, span) -> tuple[str, str]:
    if wt != 2:
        raise ProtoError(f"a key/value entry has wire type {wt}")
    key = value = ""
    for num, fwt, v in _fields(buf, *span):
        if num == 1:
            key = _str(buf, fwt, v)
        elif num == 2:
            value = _str(buf, fwt, v)
    return key, value


def _ints(buf, wt, v) -> list:
    """A repeated int field: packed (one length-delimited run of varints) or one varint."""
    if wt == 0:
        vals = [v]
    elif wt == 2:
        vals, i = [], v[0]
        while i < v[1]:
            x, i = _varint(buf, i, v[1])
            vals.append(x)
    else:
        raise ProtoError(f"an integer field has wire type {wt}")
    return [x - (1 << 64) if x >= 1 << 63 else x for x in vals]  # int64 two's complement


def _fixed(buf, wt, v, fmt: str) -> list:
    size = struct.calcsize(fmt)
    if wt not in (1, 2, 5) or (wt == 1 and size != 8) or (wt == 5 and size != 4):
        raise ProtoError(f"a {'float' if fmt == 'f' else 'double'} field has wire type {wt}")
    data = bytes(buf[v[0] : v[1]])
    if len(data) % size:
        raise ProtoError("packed fixed-width field of a wrong length")
    return list(struct.unpack(f"<{len(data) // size}{fmt}", data))


def _tensor(buf, wt, span) -> Tensor:
    if wt != 2:
        raise ProtoError(f"an initializer has wire type {wt}")
    t = Tensor()
    for num, fwt, v in _fields(buf, *span):
        if num == 1:
            t.dims += _ints(buf, fwt, v)
        elif num == 2:
            if fwt != 0:
                raise ProtoError(f"data_type has wire type {fwt}")
            t.data_type = v
        elif num == 8:
            t.name = _str(buf, fwt, v)
        elif num == 9:
            if fwt != 2:
                raise ProtoError(f"raw_data has wire type {fwt}")
            t.raw = bytes(buf[v[0] : v[1]])
        elif num == 13:
            k, val = _entry(buf, fwt, v)
            t.external[k] = val
        elif num == 14:
            if fwt != 0:
                raise ProtoError(f"data_location has wire type {fwt}")
            t.data_location = v
        elif num in (4, 10):  # float_data / double_data: packed (wire type 2) or one fixed value
            t.values = (t.values or []) + _fixed(buf, fwt, v, "f" if num == 4 else "d")
        elif num in (5, 7):  # int32_data / int64_data
            t.values = (t.values or []) + _ints(buf, fwt, v)
    return t


def read_model(data: bytes) -> tuple[dict, list]:
    """(metadata_props as a dict, initializers as Tensors) of a serialized ModelProto."""
    buf = memoryview(data)
    meta, inits = {}, []
    for num, wt, v in _fields(buf, 0, len(buf)):
        if num == 14:
            k, val = _entry(buf, wt, v)
            if k in meta:
                raise ProtoError(f"metadata key '{k}' appears twice")
            meta[k] = val
        elif num == 7:
            if wt != 2:
                raise ProtoError(f"the graph has wire type {wt}")
            for gnum, gwt, gv in _fields(buf, *v):
                if gnum == 5:
                    inits.append(_tensor(buf, gwt, gv))
    return meta, inits
