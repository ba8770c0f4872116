"""Read an export directory (docs/EXPORT_FORMAT.md) without torch: metadata, tensors by name.

`onnx_proto.read_model` gives the metadata and, for every initializer, where its bytes lie in
`model.onnx.data` (without importing the onnx package); the data file is memory-mapped once and
each tensor is a read-only numpy view into it (no copy; pages load on first touch).
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgellm.errors import EdgeLLMError, UnsupportedError

from .onnx_proto import EXTERNAL, ProtoError, read_model

ONNX_NAME, DATA_NAME = "model.onnx", "model.onnx.data"
FORMAT_VERSION = "1"
ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt2")

_NP_OF = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64, 10: np.float16, 11: np.float64}


@dataclass
class Export:
    """An opened export directory: config, quantization, tokenizer files and named tensors."""

    path: Path
    config: dict
    quantization: dict | None
    metadata: dict
    tensors: dict[str, np.ndarray] = field(repr=False)
    data_size: int = 0
    _mmap: mmap.mmap | None = field(default=None, repr=False)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise UnsupportedError(f"'{self.path / ONNX_NAME}' has no initializer '{name}' that the numba runtime needs "
                                   "(an export from another tool or version?); --backend onnxruntime may still run it")
        return self.tensors[name]

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())

    def drop_pages(self, arr: np.ndarray):
        """Let go of the resident file pages under `arr` (a view into the data file) once the
        runtime has made its own copy (fp32 scales -> fp16): they would otherwise count in RSS
        for the life of the model. The view stays valid; a later read faults the pages back in."""
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED") or arr.size == 0:
            return
        base = np.frombuffer(self._mmap, np.uint8, count=1).ctypes.data
        start = arr.ctypes.data - base
        if not 0 <= start < len(self._mmap):
            return
        page = mmap.PAGESIZE
        lo = start // page * page
        hi = min(len(self._mmap), -(-(start + arr.nbytes) // page) * page)
        self._mmap.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self):
        self.tensors.clear()
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # views still alive elsewhere; the map closes when they go
                pass
            self._mmap = None


def open_export(path) -> Export:
    """Open and validate `path`; every problem is an EdgeLLMError with a one-line reason."""
    path = Path(path)
    if not path.is_dir():
        raise EdgeLLMError(f"'{path}' is not a directory; give an export directory written by 'edgellm export'")
    onnx_path, data_path = path / ONNX_NAME, path / DATA_NAME
    if not onnx_path.is_file():
        raise EdgeLLMError(f"'{path}' has no {ONNX_NAME}; give an export directory written by 'edgellm export'")
    try:
        meta, inits = read_model(onnx_path.read_bytes())
    except (ProtoError, UnicodeDecodeError) as exc:  # a damaged or foreign file
        raise EdgeLLMError(f"cannot read '{onnx_path}': not a valid ONNX model ({exc})") from None
    version = meta.get("edgellm.format_version")
    if version is None or "edgellm.config" not in meta:
        raise UnsupportedError(f"'{onnx_path}' has no edgellm metadata (not written by 'edgellm export'); "
                               "the numba runtime needs it; --backend onnxruntime may still run it")
    if version != FORMAT_VERSION:
        raise UnsupportedError(f"'{onnx_path}' uses export format version {version}; this runtime reads version {FORMAT_VERSION}")
    try:
        config = json.loads(meta["edgellm.config"])
        quant = json.loads(meta.get("edgellm.quantization", "null"))
    except json.JSONDecodeError as exc:
        raise EdgeLLMError(f"'{onnx_path}' has malformed edgellm metadata: {exc}") from None
    arch = config.get("architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedError(f"architecture '{arch}' is not supported by the numba runtime (supported: {', '.join(ARCHITECTURES)}); "
                               "--backend onnxruntime may still run it")

    external = [t for t in inits if t.data_location == EXTERNAL]
    need = 0
    for t in external:
        info = t.external
        if info.get("location") != DATA_NAME:
            raise UnsupportedError(f"initializer '{t.name}' lives in '{info.get('location')}', not {DATA_NAME}")
        need = max(need, int(info.get("offset", 0)) + int(info["length"]))
    mm, size = None, 0
    if external:
        if not data_path.is_file():
            raise EdgeLLMError(f"'{data_path}' is missing; the weights of '{onnx_path}' live there (copy the whole export directory)")
        size = data_path.stat().st_size
        if size < need:
            raise EdgeLLMError(f"'{data_path}' is truncated: {size} bytes, but the model's weights need {need} bytes "
                               "(an interrupted copy? export again or copy the file again)")
        with open(data_path, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    tensors = {}
    for t in inits:
        dtype = _NP_OF.get(t.data_type)
        if dtype is None:
            continue  # a type the runtime never reads by name (e.g. UINT4 of a qdq graph)
        shape = tuple(int(d) for d in t.dims)
        count = int(np.prod(shape, dtype=np.int64))
        if t.data_location == EXTERNAL:
            off, n = int(t.external.get("offset", 0)), int(t.external["length"])
            if n != count * np.dtype(dtype).itemsize:
                raise EdgeLLMError(f"initializer '{t.name}' says {n} bytes but its shape {shape} needs a different size")
            tensors[t.name] = np.frombuffer(mm, dtype=dtype, count=n // np.dtype(dtype).itemsize, offset=off).reshape(shape)
        elif t.raw is not None:
            if len(t.raw) != count * np.dtype(dtype).itemsize:
                raise EdgeLLMError(f"initializer '{t.name}' holds {len(t.raw)} bytes but its shape {shape} needs a different size")
            tensors[t.name] = np.frombuffer(t.raw, dtype=dtype).reshape(shape)
        else:
            vals = t.values or []
            if len(vals) != count:
                raise EdgeLLMError(f"initializer '{t.name}' holds {len(vals)} values but its shape {shape} needs {count}")
            if dtype == np.float16:  # stored as the uint16 bits in int32_data
                tensors[t.name] = np.array(vals, np.uint16).view(np.float16).reshape(shape)
            else:
                tensors[t.name] = np.array(vals, dtype).reshape(shape)
    return Export(path=path, config=config, quantization=quant, metadata=meta, tensors=tensors, data_size=size, _mmap=mm)
