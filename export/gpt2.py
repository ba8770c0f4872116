"""GPT-2 decoder graph: learned positions, LayerNorm, fused c_attn, GELU (tanh) MLP, tied head.

Per block: h += c_proj(attn(split(c_attn(ln_1(h))))) ; h += c_proj(gelu(c_fc(ln_2(h)))).
Conv1D stores weights (in, out); linear_spec reads them as (out, in) like every other layer.
"""

from __future__ import annotations

import numpy as np

from edgellm.errors import UnsupportedError
from edgellm.runtime.format.names import GPT2, tensor

from .decoder import DecoderIO, attention
from .graph import FLOAT, Graph
from .llama import head_tied, lm_head
from .weights import Options, embedding_spec, emit_embedding, emit_linear, linear_spec

_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


def _np(t) -> np.ndarray:
    return t.detach().cpu().float().contiguous().numpy()


def build(model, opts: Options, sink=None) -> Graph:
    """The graph of `model`; `sink`: writer.DataSink writing each weight as it is added."""
    c = model.config
    if c.activation_function not in _GELU:
        raise UnsupportedError(
            f"GPT-2 activation '{c.activation_function}' is not supported; supported: {', '.join(_GELU)}"
        )
    if getattr(c, "scale_attn_by_inverse_layer_idx", False) or getattr(c, "reorder_and_upcast_attn", False):
        raise UnsupportedError("GPT-2 with scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn is not supported")
    nh, d = c.n_head, c.n_embd
    hd = d // nh
    scale = 1.0 / float(hd) ** 0.5 if getattr(c, "scale_attn_weights", True) else 1.0
    g = Graph("edgellm-gpt2", sink)
    io = DecoderIO(g, c.n_layer, nh, hd)
    tr = model.transformer
    names = GPT2  # runtime/format/names.py: the tensors' names in the export
    emb_spec = embedding_spec(tr.wte, names.embed)
    tok = emit_embedding(g, io.ids, emb_spec, names.embed, opts, tied=head_tied(model))
    pos = g.op(
        "Gather",
        [g.weight(names.positions, _np(tr.wpe.weight)), io.pos],
        name="transformer.wpe/gather",
        axis=0,
    )
    h = g.op("Add", [tok, pos], name="transformer/embed")
    eps = float(c.layer_norm_epsilon)

    def ln(x, mod, path):
        return g.layer_norm(
            x,
            g.weight(tensor(path, "weight"), _np(mod.weight)),
            g.weight(tensor(path, "bias"), _np(mod.bias)),
            eps,
            f"{path}/ln",
        )

    for i, blk in enumerate(tr.h):
        p = names.layer.format(i)  # graph node names
        lin = {role: names.linear(i, role) for role in names.linears}
        x = ln(h, blk.ln_1, names.norm(i, "attn"))
        qkv = emit_linear(g, x, linear_spec([blk.attn.c_attn], lin["qkv"]), lin["qkv"], opts)
        o = attention(g, io, i, qkv, nh=nh, nkv=nh, hd=hd, scale=scale, rope=None, window=None, name=f"{p}/attn")
        h = g.op(
            "Add",
            [h, emit_linear(g, o, linear_spec([blk.attn.c_proj], lin["o"]), lin["o"], opts)],
            name=f"{p}/attn_residual",
        )
        x = ln(h, blk.ln_2, names.norm(i, "mlp"))
        f = emit_linear(g, x, linear_spec([blk.mlp.c_fc], lin["up"]), lin["up"], opts)
        f = g.op("Gelu", [f], name=f"{p}/gelu", approximate=_GELU[c.activation_function])
        h = g.op(
            "Add",
            [h, emit_linear(g, f, linear_spec([blk.mlp.c_proj], lin["down"]), lin["down"], opts)],
            name=f"{p}/mlp_residual",
        )
    h = ln(h, tr.ln_f, names.final_norm)
    g.output(
        lm_head(g, model, h, emb_spec, names.embed, opts),
        "logits",
        FLOAT,
        ["batch", "seq", c.vocab_size],
        first=True,
    )
    return g


def config_metadata(model) -> dict:
    c = model.config
    return dict(
        architecture="gpt2",
        vocab_size=c.vocab_size,
        hidden_size=c.n_embd,
        intermediate_size=c.n_inner or 4 * c.n_embd,
        num_layers=c.n_layer,
        num_heads=c.n_head,
        num_kv_heads=c.n_head,
        head_dim=c.n_embd // c.n_head,
        norm="layer",
        norm_eps=float(c.layer_norm_epsilon),
        position="learned",
        rope_theta=None,
        rope_scaling=None,
        max_position_embeddings=c.n_positions,
        activation=c.activation_function,
        mlp="plain",
        attention_bias=True,
        sliding_window=None,
    )
