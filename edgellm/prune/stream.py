"""Layer-streaming unstructured / N:M prune (magnitude, Wanda, SparseGPT): one decoder block in
memory at a time (issue 26), calling the per-block code the resident prune calls (apply.prune_block).

The model is a meta-device skeleton (edgellm/skeleton.py). The embedding is loaded to capture
what reaches block 0 (the calibration batch, and the evaluation windows before and after), then
per block: load it from the checkpoint in fp32, run the "before" states through it, prune it
(on the calibration states), run the calibration and "after" states through the pruned block,
write its tensors to a part file, drop it. The final norm and head score both evaluations (the
head's rows read a chunk at a time) and the parts are joined into one model.safetensors in
fp32, as the resident prune saves it.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from ..arch import family_of, get_path
from ..calibration import capture_layer_inputs, run_block
from ..memory import human, peak_rss
from ..progress import NULL
from .apply import PruneConfig, check_unstructured, label, prune_block, summary


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
    from ..quant.stream import head_logits, join_safetensors, save_atomic, window_nll
    from ..record import read_record
    from ..skeleton import final_logits, materialize, module_names, open_skeleton, release, tied_head

    model, ckpt = open_skeleton(path, config, read_record(path))
    check_unstructured(model, cfg)
    fam = family_of(config)
    names = module_names(model)
    blocks = get_path(model, fam.layers)
    parts_dir = Path(tmp) / ".parts"
    parts_dir.mkdir()
    parts = []

    def load(m):
        materialize(m, names[id(m)], ckpt)

    def save(modules, part: str):
        tensors = {f"{names[id(m)]}.{k}": v for m in modules for k, v in m.state_dict().items()}
        parts.append(parts_dir / f"{part}.safetensors")
        save_atomic(tensors, parts[-1])

    with torch.no_grad():
        emb = model.get_input_embeddings()
        load(emb)
        # what reaches block 0, and every block's own keyword arguments (mask, rotary table)
        inputs, kw_calib = capture_layer_inputs(model, calib) if calib is not None else (None, None)
        before, kw_evals = [], None
        for x, _ in windows or []:
            (st,), kw = capture_layer_inputs(model, x.unsqueeze(0), 1)
            before.append(st)
            kw_evals = kw if kw_evals is None else kw_evals + kw
        after = [(h.clone(), kw) for h, kw in before]
        save([emb], "embedding")
        release(emb)
        report = []
        for bi in progress.track(range(len(blocks)), label(cfg), total=len(blocks)):
            block = blocks[bi]
            load(block)
            if inputs is not None:
                inputs = kw_calib.at(inputs, bi)
            if before:
                before, after = kw_evals.at(before, bi), kw_evals.at(after, bi)
            before = run_block(block, before)
            report += prune_block(block, f"{fam.layers}.{bi}", bi, inputs, cfg)
            if inputs is not None and bi + 1 < len(blocks):
                inputs = run_block(block, inputs)
            after = run_block(block, after)
            save([block], f"layer-{bi:05d}")
            release(block)
            note = getattr(progress, "note", None)
            if note:
                note(f"layer {bi + 1}/{len(blocks)} pruned; peak RSS {human(peak_rss())}")
        norm = get_path(model, fam.final_norm)
        head = model.get_output_embeddings()
        final = [norm] + ([] if tied_head(model) else [head])
        for m in final:
            load(m)
        save(final, "final")
        scores = None
        if windows:
            src = names[id(emb if tied_head(model) else head)] + ".weight"
            V = ckpt.shape(src)[0]

            def rows(r0, r1):
                return ckpt.rows(src, r0, r1).float()

            scores = []
            for states in (before, after):
                nll = count = 0
                for (h, _), (x, first) in zip(states, windows):
                    logits = final_logits(model, norm(h)[0], lambda t: head_logits(t, rows, V))
                    n, c = window_nll(logits.float(), x, first)
                    nll, count = nll + n, count + c
                scores.append((nll, count))
        for m in final:
            release(m)
    join_safetensors(parts, Path(tmp) / "model.safetensors", {"format": "pt"})
    shutil.rmtree(parts_dir)
    config.dtype = "float32"  # as the resident prune saves its fp32 model
    config.save_pretrained(str(tmp))
    before_s, after_s = scores if scores else (None, None)
    return report, summary(cfg, report), count_parameters(model), before_s, after_s


def quality(score):
    """evaluate.Quality of an (nll, tokens) score at the default protocol."""
    from ..evaluate import DEFAULT_CTX, DEFAULT_STRIDE, Quality

    nll, count = score
    return Quality(perplexity=math.exp(nll / count), tokens=count, ctx=DEFAULT_CTX, stride=DEFAULT_STRIDE)
