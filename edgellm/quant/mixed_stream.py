"""The `--target-bpw` sensitivity pass one decoder layer at a time (issue 26).

mixed.sensitivity holds the whole model: for each unit it fake-quantizes the unit at the probe
format and re-runs the blocks from the unit's own to the last. The same computation, turned
inside out so that each block is read once:

    h = what reaches block 0 (the SENS_SAMPLES x SENS_TOKENS sequences, one batch)
    for each block b (loaded, used, dropped):
        reference: h_in = h; h = b(h_in)            (hooks: mean x_j^2 of every linear's input)
        every probe stream s started earlier:  s = b(s)
        for each unit u of b: fake-quantize u; start stream s_u = b(h_in); restore u;
                              u's rounding error for every candidate format
    at the end: KL(ref || head(norm(s_u))) per unit, the same `_kl` on the same tensors

Every stream goes through the same block calls on the same inputs as in the resident pass, so
the table, and the plan allocated from it, are the same (tests/test_stream_modes.py). What stays
between blocks: the reference state and one (B, T, d) fp32 stream per unit started so far (4 per
Llama block); `Streams` keeps them in memory or, when the plan says they do not fit, in raw fp32
files in the work folder (read and written with plain file I/O, so they never count as resident).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..arch import block_linears, family_of, get_path
from ..calibration import capture_layer_inputs
from ..memory import human, peak_rss, trim
from .formats import QuantFormat
from .mixed import PROBE, _fake, _formats, _kl, unit_errors, unit_record, units


class Streams:
    """The probe streams (B, T, d) fp32 by unit index: in memory, or spilled to `folder`."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder
        self.mem: dict[int, torch.Tensor] = {}
        self.shapes: dict[int, tuple] = {}
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def put(self, k: int, t: torch.Tensor) -> None:
        if self.folder is None:
            self.mem[k] = t
            return
        self.shapes[k] = tuple(t.shape)
        with open(self.folder / f"s{k}.f32", "wb") as fh:
            fh.write(t.detach().float().contiguous().numpy().tobytes())

    def get(self, k: int) -> torch.Tensor:
        if self.folder is None:
            return self.mem[k]
        buf = bytearray(4 * int(torch.Size(self.shapes[k]).numel()))
        with open(self.folder / f"s{k}.f32", "rb", buffering=0) as fh:
            fh.readinto(buf)
        return torch.frombuffer(buf, dtype=torch.float32).reshape(self.shapes[k])

    def pop(self, k: int) -> torch.Tensor:
        t = self.get(k)
        self.mem.pop(k, None)
        if self.folder is not None:
            (self.folder / f"s{k}.f32").unlink(missing_ok=True)
        return t

    def keys(self) -> list[int]:
        return sorted(self.mem if self.folder is None else self.shapes)


def _out(o):
    return o[0] if isinstance(o, tuple) else o


def sensitivity_streamed(shell, load, drop, x, final, sym: bool | None, streams: Streams, note, progress) -> list[dict]:
    """mixed.sensitivity's table, one block resident at a time. `shell`: the model on the meta
    device with a real embedding (what the capture needs); `load(bi)` -> block bi in fp32 (rotated
    when --rotate), `drop(bi)` frees it; `x` (B, T) ids; `final()` -> a function h -> logits (built
    once, after the last block: the head is resident only then); `note(line)` per block."""
    fam = family_of(shell.config)
    fmts, probe = _formats(sym), QuantFormat(*PROBE)
    all_units = units(shell)
    by_block: dict[int, list[int]] = {}
    depth = len(fam.layers.split("."))
    for ui, unit in enumerate(all_units):
        by_block.setdefault(int(unit[0].split(".")[depth]), []).append(ui)
    ((h, _),), layer_kw = capture_layer_inputs(shell, x, len(x))  # (B, T, d): the one batch the resident forward runs
    n_layers = shell.config.num_hidden_layers
    rows: dict[int, tuple] = {}  # unit index -> (shapes, errors per format)
    t_start = time.perf_counter()
    for bi in progress.track(range(n_layers), "sensitivity", total=n_layers):
        t0 = time.perf_counter()
        prefix = f"{fam.layers}.{bi}."
        kw = layer_kw.table[0][bi]  # this block's own mask and rotary table
        block = load(bi)
        col_power: dict[str, torch.Tensor] = {}  # linear path -> mean x_j^2 of its input (in,)
        hooks = []
        for name, lin in block_linears(block).items():

            def lin_pre(_m, args, path=prefix + name):
                a = args[0].reshape(-1, args[0].shape[-1]).float()
                col_power[path] = a.pow(2).mean(0)

            hooks.append(lin.register_forward_pre_hook(lin_pre))
        try:
            h_in, h = h, _out(block(h, **kw))
        finally:
            for hk in hooks:
                hk.remove()
        for k in streams.keys():
            streams.put(k, _out(block(streams.get(k), **kw)))
        for ui in by_block.get(bi, []):
            unit = all_units[ui]
            mods = [get_path(block, p[len(prefix) :]) for p in unit]
            saved = [m.weight.detach().clone() for m in mods]
            for m, w in zip(mods, saved):
                m.weight.data.copy_(_fake(w, probe))
            streams.put(ui, _out(block(h_in, **kw)))
            for m, w in zip(mods, saved):
                m.weight.data.copy_(w)
            rows[ui] = ([tuple(w.shape) for w in saved], unit_errors(unit, saved, col_power, fmts + [probe]))
            del saved
        del block, h_in
        drop(bi)
        trim()
        # a later block carries more probe streams: the ETA assumes the cost grows with the block's index
        done = (bi + 1) * (bi + 2) / 2
        eta = int((time.perf_counter() - t_start) / done * (n_layers * (n_layers + 1) / 2 - done))
        note(
            f"sensitivity layer {bi + 1}/{n_layers} done in {time.perf_counter() - t0:.1f}s; "
            f"eta {eta // 60}m{eta % 60:02d}s; peak RSS {human(peak_rss())}"
        )
    head = final()
    ref_logp = torch.log_softmax(head(h).float(), -1)  # (B, T, vocab)
    out = []
    for ui, unit in enumerate(all_units):
        kl = max(_kl(ref_logp, head(streams.pop(ui))), 1e-12)
        shapes, err = rows[ui]
        out.append(unit_record(unit, shapes, kl, err, fmts))
    return out
