"""Read an export directory (docs/EXPORT_FORMAT.md) without torch: metadata, tensors by name.

`onnx_proto.read_model` gives the metadata and, for every initializer, where its bytes lie in
`model.onnx.data` (without importing the onnx package); the data file is memory-mapped once and
each tensor is a read-only numpy view into it (no copy; pages load on first touch).

Everything here treats the directory as untrusted: every initializer's type, shape and byte
range is checked before a view is made (the range inside the data file, aligned, not overlapping
another tensor's), and every failure is an EdgeLLMError with a one-line reason. What the tensors
must look like for the model the metadata describes is `validate.py`'s job.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import EdgeLLMError, UnsupportedError
from .format.dtypes import INT4, UINT4
from .format.dtypes import NUMPY_OF as _NP_OF
from .onnx_proto import EXTERNAL, ProtoError, read_model

ONNX_NAME, DATA_NAME = "model.onnx", "model.onnx.data"
FORMAT_VERSION = "1"
ALIGN = 64  # every external tensor starts at a multiple of this (export/writer.py)
MAX_ONNX_BYTES = 1 << 30  # model.onnx holds the graph and metadata only; the weights are external
SHA256_KEY = "edgellm.sha256"  # metadata: {file name: hex digest} of the data and side files


@dataclass(frozen=True)
class TensorInfo:
    """What an initializer declares: ONNX data type, shape, and where its bytes are."""

    data_type: int
    shape: tuple
    external: bool
    offset: int = 0
    nbytes: int = 0


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
    infos: dict[str, TensorInfo] = field(default_factory=dict, repr=False)  # every initializer, viewable or not

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise EdgeLLMError(
                f"'{self.path / ONNX_NAME}' has no initializer '{name}' that the model needs "
                "(a damaged export, or one from another tool or version?)"
            )
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


def _json_meta(meta: dict, key: str, onnx_path: Path, default: str | None = None):
    text = meta.get(key, default)
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise EdgeLLMError(f"'{onnx_path}' has malformed metadata '{key}': {exc}") from None


def _byte_count(data_type: int, count: int) -> int | None:
    if data_type in _NP_OF:
        return count * np.dtype(_NP_OF[data_type]).itemsize
    if data_type in (UINT4, INT4):
        return (count + 1) // 2
    return None


def _int_field(t, key: str) -> int:
    text = t.external.get(key)
    if text is None or not text.isascii() or not text.isdigit() or len(text) > 19:
        raise EdgeLLMError(f"initializer '{t.name}' has external-data {key} {text!r}; expected a non-negative integer")
    return int(text)


def read_metadata(path) -> tuple[Path, dict, list]:
    """(model.onnx path, metadata_props, initializers) of an export directory, after the checks
    every reader needs: the files exist, model.onnx parses, the format version is this one."""
    path = Path(path)
    if not path.is_dir():
        raise EdgeLLMError(f"'{path}' is not a directory; give an export directory written by 'edgellm export'")
    onnx_path = path / ONNX_NAME
    if not onnx_path.is_file():
        raise EdgeLLMError(f"'{path}' has no {ONNX_NAME}; give an export directory written by 'edgellm export'")
    size = onnx_path.stat().st_size
    if size > MAX_ONNX_BYTES:
        raise EdgeLLMError(
            f"'{onnx_path}' is {size} bytes; an export keeps its weights in {DATA_NAME}, so model.onnx "
            f"should be far below {MAX_ONNX_BYTES} bytes"
        )
    try:
        meta, inits = read_model(onnx_path.read_bytes())
    except ProtoError as exc:  # a damaged or foreign file
        raise EdgeLLMError(f"cannot read '{onnx_path}': not a valid ONNX model ({exc})") from None
    version = meta.get("edgellm.format_version")
    if version is None or "edgellm.config" not in meta:
        raise UnsupportedError(
            f"'{onnx_path}' has no edgellm metadata (not written by 'edgellm export'); "
            "both edgellm backends need it to size the model and its KV cache"
        )
    if version != FORMAT_VERSION:
        raise UnsupportedError(
            f"'{onnx_path}' uses export format version {version!r}; this runtime reads version {FORMAT_VERSION}"
        )
    return onnx_path, meta, inits


def verify_files(path, meta: dict | None = None) -> list[str]:
    """Check the sha256 that `edgellm export` recorded for each data and side file; the names
    checked. A mismatch or a missing file is an EdgeLLMError."""
    path = Path(path)
    if meta is None:
        _, meta, _ = read_metadata(path)
    sums = _json_meta(meta, SHA256_KEY, path / ONNX_NAME, "null")
    if sums is None:
        raise EdgeLLMError(
            f"'{path / ONNX_NAME}' records no checksums (exported by an older edgellm); nothing to verify"
        )
    if not isinstance(sums, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sums.items()):
        raise EdgeLLMError(f"'{path / ONNX_NAME}' has malformed metadata '{SHA256_KEY}': expected {{file: sha256}}")
    sums = {**sums, **_record_sums(path)}
    for name, want in sorted(sums.items()):
        f = path / name
        if "/" in name or "\\" in name or name in ("", ".", "..") or not f.is_file():
            raise EdgeLLMError(f"'{f}' is missing; the export recorded its checksum (copy the whole export directory)")
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != want.lower():
            raise EdgeLLMError(
                f"'{f}' does not match the sha256 recorded at export (damaged or modified); export or copy it again"
            )
    return sorted(sums)


def _record_sums(path: Path) -> dict:
    """model.onnx's own sha256, which `edgellm export` keeps in edgellm.json (its export step)."""
    rec = path / "edgellm.json"
    if not rec.is_file():
        return {}
    try:
        steps = json.loads(rec.read_text(encoding="utf-8")).get("steps", [])
        sums = [s["sha256"] for s in steps if isinstance(s, dict) and s.get("step") == "export" and "sha256" in s][-1:]
    except (ValueError, AttributeError, TypeError, RecursionError):
        raise EdgeLLMError(f"'{rec}' is damaged, so {ONNX_NAME} cannot be verified; export again") from None
    if sums and not (isinstance(sums[0], dict) and set(sums[0]) == {ONNX_NAME} and isinstance(sums[0][ONNX_NAME], str)):
        raise EdgeLLMError(f"'{rec}' has a malformed sha256 record; export again")
    return sums[0] if sums else {}


def open_export(path, verify: bool = False) -> Export:
    """Open `path` and check every initializer's bytes; every problem is an EdgeLLMError with a
    one-line reason. `verify`: also check the files' sha256 against the export's record."""
    path = Path(path)
    onnx_path, meta, inits = read_metadata(path)
    if verify:
        verify_files(path, meta)
    config = _json_meta(meta, "edgellm.config", onnx_path)
    quant = _json_meta(meta, "edgellm.quantization", onnx_path, "null")
    if not isinstance(config, dict):
        raise EdgeLLMError(f"'{onnx_path}' metadata 'edgellm.config' is a JSON {type(config).__name__}, not an object")
    if quant is not None and not isinstance(quant, dict):
        raise EdgeLLMError(
            f"'{onnx_path}' metadata 'edgellm.quantization' is a JSON {type(quant).__name__}, not an object or null"
        )
    infos: dict[str, TensorInfo] = {}
    for t in inits:
        if not t.name:
            raise EdgeLLMError(f"'{onnx_path}' has an initializer without a name")
        if t.name in infos:
            raise EdgeLLMError(f"'{onnx_path}' has two initializers named '{t.name}'")
        infos[t.name] = _tensor_info(t)
    mm, size = _map_data(path / DATA_NAME, onnx_path, infos)
    tensors = {}
    for t in inits:
        dtype = _NP_OF.get(t.data_type)
        if dtype is not None:  # UINT4/INT4 of a qdq graph: ONNX Runtime reads them, the numba runtime never views them
            tensors[t.name] = _view(t, infos[t.name], dtype, mm)
    return Export(
        path=path,
        config=config,
        quantization=quant,
        metadata=meta,
        tensors=tensors,
        data_size=size,
        _mmap=mm,
        infos=infos,
    )


def _tensor_info(t) -> TensorInfo:
    """What initializer `t` declares, checked: shape, data type, and its bytes (external: the
    range in the data file, aligned; inline: exactly what the shape needs)."""
    if any(d < 0 for d in t.dims) or len(t.dims) > 8:
        raise EdgeLLMError(
            f"initializer '{t.name}' has shape {tuple(t.dims)}; expected at most 8 non-negative dimensions"
        )
    shape = tuple(int(d) for d in t.dims)
    nbytes = _byte_count(t.data_type, math.prod(shape))
    if nbytes is None:
        raise UnsupportedError(f"initializer '{t.name}' has ONNX data type {t.data_type}, which no edgellm export uses")
    if t.data_location == EXTERNAL:
        if t.external.get("location") != DATA_NAME:
            raise EdgeLLMError(f"initializer '{t.name}' lives in {t.external.get('location')!r}, not {DATA_NAME}")
        off, n = _int_field(t, "offset"), _int_field(t, "length")
        if n != nbytes:
            raise EdgeLLMError(f"initializer '{t.name}' says {n} bytes but its shape {shape} needs {nbytes}")
        if off % ALIGN:
            raise EdgeLLMError(f"initializer '{t.name}' starts at byte {off} of {DATA_NAME}, not a multiple of {ALIGN}")
        return TensorInfo(t.data_type, shape, True, off, n)
    if t.data_location != 0:
        raise EdgeLLMError(
            f"initializer '{t.name}' has data_location {t.data_location}; expected 0 (inline) or 1 (external)"
        )
    held = len(t.raw) if t.raw is not None else _byte_count(t.data_type, len(t.values or []))
    if t.raw is not None and t.values:
        raise EdgeLLMError(f"initializer '{t.name}' holds both raw_data and typed values")
    if held != nbytes:
        raise EdgeLLMError(f"initializer '{t.name}' holds {held} bytes but its shape {shape} needs {nbytes}")
    return TensorInfo(t.data_type, shape, False, 0, nbytes)


def _map_data(data_path: Path, onnx_path: Path, infos: dict[str, TensorInfo]) -> tuple[mmap.mmap | None, int]:
    """Memory-map the data file once every external range is known to lie inside it, apart."""
    external = sorted((i.offset, i.offset + i.nbytes, name) for name, i in infos.items() if i.external)
    if not external:
        return None, 0
    if not data_path.is_file():
        raise EdgeLLMError(
            f"'{data_path}' is missing; the weights of '{onnx_path}' live there (copy the whole export directory)"
        )
    size = data_path.stat().st_size
    need = max(e for _, e, _ in external)
    if size < need:
        raise EdgeLLMError(
            f"'{data_path}' is truncated: {size} bytes, but the model's weights need {need} bytes "
            "(an interrupted copy? export again or copy the file again)"
        )
    for (_, e0, a), (s1, _, b) in zip(external, external[1:]):
        if s1 < e0:
            raise EdgeLLMError(
                f"initializers '{a}' and '{b}' overlap in {DATA_NAME} (bytes {s1}..{e0}); the file is damaged"
            )
    if not size:
        return None, 0
    with open(data_path, "rb") as fh:
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ), size


def _view(t, info: TensorInfo, dtype, mm) -> np.ndarray:
    """A read-only view of initializer `t` (into the memory map, or its inline bytes)."""
    count = math.prod(info.shape)
    if info.external:
        if count == 0:
            return np.zeros(info.shape, dtype)
        return np.frombuffer(mm, dtype=dtype, count=count, offset=info.offset).reshape(info.shape)
    if t.raw is not None:
        return np.frombuffer(t.raw, dtype=dtype).reshape(info.shape)
    vals = t.values or []
    try:
        if dtype == np.float16:  # stored as the uint16 bits in int32_data
            arr = np.array(vals, np.int64).astype(np.uint16).view(np.float16)
        else:
            arr = np.array(vals, np.float64 if np.dtype(dtype).kind == "f" else np.int64).astype(dtype)
    except (OverflowError, ValueError, TypeError) as exc:
        raise EdgeLLMError(f"initializer '{t.name}' holds values that do not fit its type: {exc}") from None
    return arr.reshape(info.shape)
