"""`--rotate` in the layer-streaming quantize (issue 26): the embedding and head rotated as they
are read, a ROW_CHUNK of rows at a time.

rotation.rotate_model rotates a resident model: every block (rotation.rotate_block), the
embedding E <- E Q and the head W <- W diag(g_f) Q (untied when tied), the final norm set to 1.
Streamed, each block is rotated when it is loaded (quant/stream.py calls rotate_block), and
`embed_pass` reads the embedding and the head (the embedding again when tied) in chunks,
rotates each chunk with the same `rotate_rows` on the same chunk boundaries, and

- quantizes it into the packed embedding / head (--embeddings 8/4), or writes it in fp32 into
  the output part (--embeddings keep), a chunk at a time (`RowFile`);
- keeps the rotated rows of the token ids the run looks up (calibration, evaluation and the
  sensitivity pass's sequences) for `RotatedLookup`, which the calibration capture embeds with.

Nothing of the embedding's size is resident beyond the packed tensors (and one chunk).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..arch import LLAMA_PARTS
from . import rotation
from .modules import QuantEmbedding, QuantLinear
from .rotation import rotate_rows

EMB, HEAD, NORM = LLAMA_PARTS  # the rotation serves the llama layout only (rotation.ROTATABLE)


class RotatedLookup(nn.Module):
    """The rotated embedding's rows for a known set of ids: (...) ids -> (..., d) fp32."""

    def __init__(self, ids: torch.Tensor, rows: torch.Tensor, vocab: int):
        super().__init__()
        self.ids, self.rows = ids, rows  # (k,) sorted unique, (k, d)
        self.index = torch.full((vocab,), -1, dtype=torch.long)
        self.index[ids] = torch.arange(len(ids))

    def forward(self, x):
        pos = self.index[x]
        if (pos < 0).any():
            raise KeyError("a token id outside the looked-up set")  # a bug, not bad input
        return self.rows[pos]


def needed_ids(*batches) -> torch.Tensor:
    """The sorted unique token ids of every tensor given (None skipped)."""
    flat = [b.reshape(-1) for b in batches if b is not None]
    return torch.unique(torch.cat(flat)) if flat else torch.empty(0, dtype=torch.long)


class RowFile:
    """A safetensors file of fp32 matrices written a row range at a time (temp name, renamed on close)."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, int]]):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        header, off = {}, 0
        self.offsets = {}
        for name, (r, c) in shapes.items():
            header[name] = {"dtype": "F32", "shape": [r, c], "data_offsets": [off, off + 4 * r * c]}
            self.offsets[name] = (off, 4 * c)
            off += 4 * r * c
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.start = 8 + len(raw)
        self.fh = open(self.tmp, "wb")
        self.fh.write(len(raw).to_bytes(8, "little") + raw)
        self.fh.truncate(self.start + off)

    def write(self, name: str, r0: int, rows: torch.Tensor) -> None:
        off, row = self.offsets[name]
        self.fh.seek(self.start + off + r0 * row)
        self.fh.write(rows.float().contiguous().numpy().tobytes())

    def close(self) -> None:
        self.fh.close()
        os.replace(self.tmp, self.path)


def file_rows(path: Path, name: str, r0: int, r1: int) -> torch.Tensor:
    """Rows [r0, r1) of an fp32 matrix in a safetensors file, read with plain file I/O (no map)."""
    from ..checkpoint import read_header

    header, start = read_header(path)
    cols = header[name]["shape"][1]
    buf = bytearray(4 * (r1 - r0) * cols)
    with open(path, "rb", buffering=0) as fh:
        fh.seek(start + header[name]["data_offsets"][0] + 4 * r0 * cols)
        fh.readinto(buf)
    return torch.frombuffer(buf, dtype=torch.float32).reshape(r1 - r0, cols)


def head_source(ckpt) -> str:
    """The head's stored matrix: lm_head, or the embedding when tied."""
    return HEAD if HEAD in ckpt.entries else EMB


def rotated_chunks(ckpt, name: str, Q: torch.Tensor, g: torch.Tensor | None):
    """(first row, rows (chunk, d) fp32 rotated) over a stored matrix, ROT_CHUNK rows at a time."""
    n, step = ckpt.shape(name)[0], rotation.ROT_CHUNK  # the chunks rotate_model's rotate_rows takes
    for r in range(0, n, step):
        yield r, rotate_rows(ckpt.rows(name, r, min(r + step, n)).float(), Q, g)


def embed_pass(ckpt, Q: torch.Tensor, emb_fmt, ids: torch.Tensor, part: Path, lookup_part: Path, fill):
    """One pass over the embedding and head rows (module docstring). `fill(module, r0, rows)` packs
    rows into a packed module (stream._quantize_rows' step). Returns (lookup, packed embedding,
    packed head); the packed ones are None with --embeddings keep."""
    from .stream import save_atomic

    V, d = ckpt.shape(EMB)
    src = head_source(ckpt)
    Vh = ckpt.shape(src)[0]
    gf = ckpt.get(NORM).float().double()
    rows = torch.empty(len(ids), d)
    qe = qh = out = None
    if emb_fmt is not None:
        qe, qh = QuantEmbedding(V, d, emb_fmt), QuantLinear(d, Vh, False, emb_fmt)
    else:
        out = RowFile(part, {EMB: (V, d), HEAD: (Vh, d)})
    for r, w in rotated_chunks(ckpt, EMB, Q, None):  # w (chunk, d)
        sel = (ids >= r) & (ids < r + len(w))
        rows[sel] = w[ids[sel] - r]
        fill(qe, r, w) if qe is not None else out.write(EMB, r, w)
    for r, w in rotated_chunks(ckpt, src, Q, gf):
        fill(qh, r, w) if qh is not None else out.write(HEAD, r, w)
    if qe is not None:
        tensors = {f"model.embed_tokens.{k}": v for k, v in qe.state_dict().items()}
        tensors.update({f"lm_head.{k}": v for k, v in qh.state_dict().items()})
        save_atomic(tensors, part)
    else:
        out.close()
    save_atomic({"ids": ids, "rows": rows}, lookup_part)
    return RotatedLookup(ids, rows, V), qe, qh


def load_lookup(lookup_part: Path, vocab: int) -> RotatedLookup:
    from safetensors.torch import load_file

    t = load_file(str(lookup_part))
    return RotatedLookup(t["ids"], t["rows"], vocab)


def rotated_head(ckpt, Q: torch.Tensor) -> torch.Tensor:
    """The rotated head W diag(g_f) Q in fp32 (V, d), built a chunk at a time (the sensitivity
    pass's KL needs the unquantized head, as the resident pass has it)."""
    src = head_source(ckpt)
    W = torch.empty(ckpt.shape(src))
    gf = ckpt.get(NORM).float().double()
    for r, w in rotated_chunks(ckpt, src, Q, gf):
        W[r : r + len(w)] = w
    return W
