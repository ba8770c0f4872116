"""Layer-streaming prune: unstructured / N:M (magnitude, Wanda, SparseGPT) and structured (layers,
KV groups, MLP channels), one decoder block in memory at a time (issue 26), calling the per-block
code the resident prune calls (apply.prune_block, apply.prune_structured_block, apply.choose_layers).

The model is a meta-device skeleton (edgellm/skeleton.py). The embedding is loaded to capture
what reaches block 0 (the calibration batch, and the evaluation windows before and after), then
per block: load it from the checkpoint in fp32, run the "before" states through it, prune it
(on the calibration states), run the calibration and "after" states through the pruned block,
write its tensors to a part file, drop it. The final norm and head score both evaluations (the
head's rows read a chunk at a time) and the parts are joined into one model.safetensors in
fp32, as the resident prune saves it. Structured pruning walks the same way (see
prune_structured_streamed for the second pass that removing whole layers needs).
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import torch

from ..arch import family_of, get_path
from ..calibration import capture_layer_inputs, run_block
from ..memory import human, peak_rss
from ..progress import NULL, duration
from . import structured as st
from .apply import (
    PruneConfig,
    check_unstructured,
    choose_layers,
    config_changes,
    config_view,
    head_dims,
    label,
    plan_structured,
    prune_block,
    prune_structured_block,
    set_structured_config,
    summary,
)


class _Walk:
    """One streamed prune: the meta skeleton, its checkpoint, and the part files written so far.
    `start` loads the embedding and captures what reaches block 0 (the calibration batch and the
    evaluation windows) with every block's own keyword arguments; `finish` scores the windows
    before and after with the final norm and head and joins the parts."""

    def __init__(self, path: Path, config, tmp: Path):
        from ..record import read_record
        from ..skeleton import module_names, open_skeleton

        self.model, self.ckpt = open_skeleton(path, config, read_record(path))
        self.config, self.tmp = config, Path(tmp)
        self.fam = family_of(config)
        self.names = module_names(self.model)
        self.blocks = get_path(self.model, self.fam.layers)
        self.parts_dir = self.tmp / ".parts"
        self.parts: list[Path] = []

    def load(self, m) -> None:
        from ..skeleton import materialize

        materialize(m, self.names[id(m)], self.ckpt)

    def save(self, modules, part: str, prefix: str | None = None) -> None:
        """Write `modules` to a part file (under `prefix` instead of their own path, when given)."""
        from ..quant.stream import save_atomic

        tensors = {f"{prefix or self.names[id(m)]}.{k}": v for m in modules for k, v in m.state_dict().items()}
        self.parts.append(self.parts_dir / f"{part}.safetensors")
        save_atomic(tensors, self.parts[-1])

    def start(self, calib: torch.Tensor | None, windows: list | None):
        """(calibration states or None, their LayerKwargs, evaluation states, their LayerKwargs)."""
        from ..skeleton import release

        self.parts_dir.mkdir()
        emb = self.model.get_input_embeddings()
        self.load(emb)
        inputs, kw_calib = capture_layer_inputs(self.model, calib) if calib is not None else (None, None)
        evals, kw_evals = [], None
        for x, _ in windows or []:
            (h0,), kw = capture_layer_inputs(self.model, x.unsqueeze(0), 1)
            evals.append(h0)
            kw_evals = kw if kw_evals is None else kw_evals + kw
        self.save([emb], "embedding")
        release(emb)
        self.t_start = self.t_last = time.perf_counter()
        self.done = 0
        return inputs, kw_calib, evals, kw_evals

    def note(self, progress, message: str, left: int) -> None:
        """One line per block: `message`, its time, the ETA of the `left` blocks still to walk, peak RSS."""
        now = time.perf_counter()
        self.done += 1
        took, self.t_last = now - self.t_last, now
        eta = (now - self.t_start) / self.done * left
        note = getattr(progress, "note", None)
        if note:
            note(f"{message} in {took:.1f}s; eta {duration(eta)}; peak RSS {human(peak_rss())}")

    def finish(self, windows: list | None, states: list):
        """Write the final norm and head, score each of `states` (evaluation states at the end of the
        decoder) on `windows`, join the parts into model.safetensors (fp32, as the resident prune
        saves it) and save the config; [(nll, tokens)] per entry of `states`, or None."""
        from ..quant.stream import head_logits, join_safetensors, window_nll
        from ..skeleton import final_logits, release, tied_head

        model, ckpt = self.model, self.ckpt
        emb = model.get_input_embeddings()
        norm = get_path(model, self.fam.final_norm)
        head = model.get_output_embeddings()
        final = [norm] + ([] if tied_head(model) else [head])
        with torch.no_grad():
            for m in final:
                self.load(m)
            self.save(final, "final")
            scores = None
            if windows:
                src = self.names[id(emb if tied_head(model) else head)] + ".weight"
                V = ckpt.shape(src)[0]

                def rows(r0, r1):
                    return ckpt.rows(src, r0, r1).float()

                scores = []
                for hs in states:
                    nll = count = 0
                    for (h, _), (x, first) in zip(hs, windows):
                        logits = final_logits(model, norm(h)[0], lambda t: head_logits(t, rows, V))
                        n, c = window_nll(logits.float(), x, first)
                        nll, count = nll + n, count + c
                    scores.append((nll, count))
            for m in final:
                release(m)
        join_safetensors(self.parts, self.tmp / "model.safetensors", {"format": "pt"})
        shutil.rmtree(self.parts_dir)
        self.config.dtype = "float32"  # as the resident prune saves its fp32 model
        self.config.save_pretrained(str(self.tmp))
        return scores


def prune_streamed(
    path: Path,
    config,
    tmp: Path,
    cfg: PruneConfig,
    calib: torch.Tensor | None,
    windows: list | None,
    progress=NULL,
):
    """Prune the checkpoint directory `path` into the directory `tmp` (model.safetensors and
    config.json); `windows`: [(ids (T,), first scored position)] to score before and after, or
    None. Returns (report, info, parameters, before, after); before/after: (nll, tokens) or None."""
    from ..modelio import count_parameters
    from ..skeleton import release

    w = _Walk(path, config, tmp)
    check_unstructured(w.model, cfg)
    blocks = w.blocks
    with torch.no_grad():
        inputs, kw_calib, before, kw_evals = w.start(calib, windows)
        after = [(h.clone(), kw) for h, kw in before]
        report = []
        for bi in progress.track(range(len(blocks)), label(cfg), total=len(blocks)):
            block = blocks[bi]
            w.load(block)
            if inputs is not None:
                inputs = kw_calib.at(inputs, bi)
            if before:
                before, after = kw_evals.at(before, bi), kw_evals.at(after, bi)
            before = run_block(block, before)
            report += prune_block(block, f"{w.fam.layers}.{bi}", bi, inputs, cfg)
            if inputs is not None and bi + 1 < len(blocks):
                inputs = run_block(block, inputs)
            after = run_block(block, after)
            w.save([block], f"layer-{bi:05d}")
            release(block)
            w.note(progress, f"layer {bi + 1}/{len(blocks)} pruned", len(blocks) - bi - 1)
    scores = w.finish(windows, [before, after])
    before_s, after_s = scores if scores else (None, None)
    return report, summary(cfg, report), count_parameters(w.model), before_s, after_s


def prune_structured_streamed(
    path: Path, config, tmp: Path, kind: str, ratio: float, calib: torch.Tensor, windows: list | None, progress=NULL
):
    """Structured pruning (apply.prune_structured's choices, its per-block code) of the checkpoint
    directory `path` into `tmp`, one decoder block in memory at a time. Layers: one pass scores
    every block on the unpruned flow (and the "before" windows), a second loads the kept blocks
    again, runs the "after" windows and writes them renumbered. KV groups / MLP channels: one pass
    that slices each block on the flow of the blocks already pruned. Returns (info, parameters
    before, parameters after, before, after); before/after: (nll, tokens) or None."""
    from ..modelio import count_parameters
    from ..skeleton import release

    w = _Walk(path, config, tmp)
    plan = plan_structured(w.model, kind, ratio)
    blocks, n = w.blocks, len(w.blocks)
    params_before = count_parameters(w.model)
    cfg_before = config_view(config)
    with torch.no_grad():
        inputs, kw_calib, before, kw_evals = w.start(calib, windows)
        after = [(h.clone(), kw) for h, kw in before]
        if kind == "layers":
            scores = []
            for bi in progress.track(range(n), "scoring layers", total=n):
                w.load(blocks[bi])
                inputs = kw_calib.at(inputs, bi)
                outputs = run_block(blocks[bi], inputs)
                scores.append(st.block_influence(inputs, outputs))
                inputs = outputs
                before = run_block(blocks[bi], kw_evals.at(before, bi)) if before else before
                release(blocks[bi])
                w.note(progress, f"layer {bi + 1}/{n} scored", n - bi - 1 + plan["keep"])
            removed = choose_layers(scores, plan)
            keep = [i for i in range(n) if i not in set(removed)]
            for new_idx, bi in enumerate(progress.track(keep, "writing kept layers", total=len(keep))):
                w.load(blocks[bi])
                after = run_block(blocks[bi], kw_evals.at(after, bi)) if after else after
                w.save([blocks[bi]], f"layer-{new_idx:05d}", prefix=f"{w.fam.layers}.{new_idx}")
                release(blocks[bi])
                w.note(progress, f"kept layer {bi} written as {new_idx + 1}/{len(keep)}", len(keep) - new_idx - 1)
            st.remove_layers(w.model, removed)
        else:
            removed_per_block, dims = [], head_dims(config)
            for bi in progress.track(range(n), f"pruning {plan['unit']}", total=n):
                block = blocks[bi]
                w.load(block)
                inputs = kw_calib.at(inputs, bi)
                if before:
                    before, after = kw_evals.at(before, bi), kw_evals.at(after, bi)
                before = run_block(block, before)
                removed_per_block.append(prune_structured_block(block, kind, inputs, plan["remove"], dims))
                if bi + 1 < n:
                    inputs = run_block(block, inputs)
                after = run_block(block, after)
                w.save([block], f"layer-{bi:05d}")
                release(block)
                w.note(progress, f"layer {bi + 1}/{n} pruned", n - bi - 1)
            set_structured_config(config, kind, plan, dims)
            plan["removed"] = removed_per_block
    plan["config"] = config_changes(cfg_before, config)
    scores = w.finish(windows, [before, after])
    before_s, after_s = scores if scores else (None, None)
    return plan, params_before, count_parameters(w.model), before_s, after_s


def quality(score):
    """evaluate.Quality of an (nll, tokens) score at the default protocol."""
    from ..evaluate import DEFAULT_CTX, DEFAULT_STRIDE, Quality

    nll, count = score
    return Quality(perplexity=math.exp(nll / count), tokens=count, ctx=DEFAULT_CTX, stride=DEFAULT_STRIDE)
