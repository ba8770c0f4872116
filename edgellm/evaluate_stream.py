"""Perplexity, and KL / top-1 against a reference, with each model one decoder layer at a time
(issue 26): the same protocol and maths as evaluate.evaluate, for models larger than memory.

Both models are meta-device skeletons (edgellm/skeleton.py). The evaluation windows are embedded
and captured where they reach block 0; then, per layer, the model's block is loaded from its
checkpoint, runs every window's hidden states, and is dropped (the reference's likewise); at
the end the final norm and the head score each window, the head's rows a chunk at a time (a
float head read from the checkpoint, a packed one dequantized ROW_CHUNK rows at a time), so an
8B model's 2 GB fp32 head is never whole in memory. Hidden states stay fp32: the result equals
the resident evaluation to float noise (a test holds them to 4 digits).
"""

from __future__ import annotations

import math
from pathlib import Path

from .errors import EdgeLLMError
from .evaluate import Quality, windows
from .memory import human, rss
from .progress import NULL


class _Walked:
    """A model directory walked part by part."""

    def __init__(self, path: Path, config):
        from .arch import family_of, get_path
        from .record import read_record
        from .skeleton import module_names, open_skeleton

        self.model, self.ckpt = open_skeleton(Path(path), config, read_record(Path(path)))
        fam = family_of(config)
        self.layers = get_path(self.model, fam.layers)
        self.norm = get_path(self.model, fam.final_norm)
        self.names = module_names(self.model)

    def load(self, module) -> None:
        from .skeleton import materialize

        materialize(module, self.names[id(module)], self.ckpt)

    def block0_inputs(self, wins: list) -> list:
        """(hidden (1, T, d), block kwargs) reaching block 0, per window ids (T,); every block's
        own keyword arguments are kept for run_layer (calibration.LayerKwargs)."""
        from .calibration import capture_layer_inputs
        from .skeleton import release

        emb = self.model.get_input_embeddings()
        self.load(emb)
        try:
            states, self.layer_kw = [], None
            for x in wins:
                (st,), kw = capture_layer_inputs(self.model, x.unsqueeze(0), 1)
                states.append(st)
                self.layer_kw = kw if self.layer_kw is None else self.layer_kw + kw
            return states
        finally:
            release(emb)

    def run_layer(self, i: int, states: list) -> list:
        from .skeleton import release

        block = self.layers[i]
        self.load(block)
        try:
            outs = []
            for h, kw in self.layer_kw.at(states, i):
                out = block(h, **kw)
                outs.append(((out[0] if isinstance(out, tuple) else out).detach(), kw))
            return outs
        finally:
            release(block)

    def head_rows(self):
        """(rows(r0, r1) -> the head's rows in fp32, V, release()) with the final norm loaded."""
        from .quant.modules import PackedMatrix, TiedQuantLinear
        from .quant.stream import packed_rows
        from .skeleton import release, tied_head

        self.load(self.norm)
        head = self.model.get_output_embeddings()
        m = self.model.get_input_embeddings() if tied_head(self.model) else head
        m = m.embedding[0] if isinstance(m, TiedQuantLinear) else m
        if isinstance(m, PackedMatrix):
            self.load(m)
            return (lambda r0, r1: packed_rows(m, r0, r1)), m.out_features, lambda: (release(m), release(self.norm))
        name = f"{self.names[id(m)]}.weight"
        return (
            (lambda r0, r1: self.ckpt.rows(name, r0, r1).float()),
            self.ckpt.shape(name)[0],
            lambda: release(self.norm),
        )


def streamable(path: Path, config) -> bool:
    from .arch import stream_refusal

    return Path(path).is_dir() and stream_refusal(config) is None


def plan_eval(config, ref_config, n_tokens: int, ctx: int, budget: int, how: str) -> int:
    """Bytes the streamed evaluation needs; refuses (naming the need) above `budget`."""
    need = rss()
    for c in filter(None, (config, ref_config)):
        d, i_f, V = c.hidden_size, c.intermediate_size, c.vocab_size
        hd = getattr(c, "head_dim", None) or d // c.num_attention_heads
        kv = (getattr(c, "num_key_value_heads", None) or c.num_attention_heads) * hd
        q = c.num_attention_heads * hd  # Qwen3, Gemma 3: heads x head_dim need not be the width
        layer = 4 * (2 * d * q + 2 * d * kv + 3 * d * i_f)  # fp32 (a float checkpoint widened)
        states = 2 * 4 * n_tokens * d
        forward = 4 * ctx * (3 * i_f + 6 * d) + 4 * c.num_attention_heads * ctx * ctx
        need += states + max(layer + forward, 4 * 4096 * d + 3 * 4 * ctx * V)
    if need > budget:
        raise EdgeLLMError(
            f"evaluating layer by layer needs about {human(need)} (hidden states of {n_tokens} tokens, one layer, "
            f"the head's logits of one window), more than the budget of {human(budget)} ({how}); "
            "raise --max-memory or lower --eval-tokens / --ctx"
        )
    return need


def evaluate_streamed(
    path: Path,
    config,
    ids,
    *,
    reference: Path | None = None,
    ref_config=None,
    ctx: int,
    stride: int,
    max_tokens: int | None,
    progress=NULL,
) -> Quality:
    """evaluate.evaluate of the model directory `path` (and `reference`), one layer at a time."""
    import torch
    import torch.nn.functional as F

    from .quant.stream import head_logits
    from .skeleton import final_logits

    if max_tokens:
        ids = ids[:max_tokens]
    wins = windows(len(ids), ctx, stride)
    if not wins:
        raise EdgeLLMError(f"the evaluation data has {len(ids)} tokens, too few to score; give more text")
    xs = [ids[start:end] for start, end, _ in wins]
    models = [_Walked(path, config)] + ([_Walked(reference, ref_config)] if reference is not None else [])
    n_layers = [m.model.config.num_hidden_layers for m in models]
    with torch.inference_mode():
        states = [m.block0_inputs(xs) for m in models]
        for i in progress.track(range(max(n_layers)), "evaluating layer by layer", total=max(n_layers)):
            for k, m in enumerate(models):
                if i < n_layers[k]:
                    states[k] = m.run_layer(i, states[k])
        heads = [m.head_rows() for m in models]
        try:
            nll, kl, agree, count = 0.0, 0.0, 0, 0
            for j, ((_, _, first), x) in enumerate(zip(wins, xs)):
                target = x[first + 1 :]
                logps = []
                for m, (rows, V, _), st in zip(models, heads, states):
                    h = m.norm(st[j][0])[0]  # (T, d)
                    # the model's own forward after its head (Gemma 3's softcapping, Granite's logits_scaling)
                    logits = final_logits(m.model, h, lambda t, rows=rows, V=V: head_logits(t, rows, V))
                    logits = logits[first:-1].float()
                    logps.append(F.log_softmax(logits, dim=-1))
                logp = logps[0]
                nll += -logp.gather(-1, target.unsqueeze(-1)).sum().item()
                count += target.numel()
                if reference is not None:
                    ref_logp = logps[1]
                    kl += (ref_logp.exp() * (ref_logp - logp)).sum().item()
                    agree += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
        finally:
            for _, _, release in heads:
                release()
    q = Quality(perplexity=math.exp(nll / count), tokens=count, ctx=ctx, stride=stride)
    if reference is not None:
        q.kl, q.top1 = kl / count, agree / count
    return q
