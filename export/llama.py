"""Llama-family decoder graph (llama, mistral, qwen2): RMSNorm, RoPE, GQA, gated SiLU MLP.

Per block (h: residual stream, B x S x D):
    x = rms(h) ; q,k,v = split(x @ Wqkv^T + b) ; h += attn(q, k, v) @ Wo^T
    x = rms(h) ; g,u = split(x @ Wgate_up^T) ; h += (silu(g) * u) @ Wdown^T
then logits = rms(h) @ Wlm^T.
"""

from __future__ import annotations

import numpy as np

from edgellm.errors import UnsupportedError
from edgellm.runtime.format.names import HEAD, LLAMA, tensor

from .decoder import DecoderIO, attention, rotary, split_last
from .graph import FLOAT, Graph
from .weights import Options, embedding_spec, emit_embedding, emit_linear, linear_spec


def _np(t) -> np.ndarray:
    return t.detach().cpu().float().contiguous().numpy()


def dims(model) -> dict:
    c = model.config
    nh = c.num_attention_heads
    hd = getattr(c, "head_dim", None) or c.hidden_size // nh
    return dict(nh=nh, nkv=getattr(c, "num_key_value_heads", None) or nh, hd=hd, layers=c.num_hidden_layers)


def _window(config, i: int) -> int | None:
    """Sliding-window size of layer i (None: full attention), as HF's masks apply it."""
    types = getattr(config, "layer_types", None)
    w = getattr(config, "sliding_window", None)
    if types is not None:
        return w if types[i] == "sliding_attention" and w else None
    return w if config.model_type == "mistral" and w else None


def _rope(model) -> tuple[np.ndarray, float]:
    rot = model.model.rotary_emb
    rope_type = getattr(rot, "rope_type", "default")
    if "dynamic" in rope_type:
        raise UnsupportedError(
            f"rope type '{rope_type}' changes with sequence length; export supports static rope types (default, "
            "linear, llama3, yarn ...)"
        )
    return _np(rot.inv_freq), float(getattr(rot, "attention_scaling", 1.0))


def build(model, opts: Options) -> Graph:
    c = model.config
    if getattr(c, "hidden_act", "silu") != "silu":
        raise UnsupportedError(f"hidden_act '{c.hidden_act}' is not supported for {c.model_type}; supported: silu")
    d = dims(model)
    nh, nkv, hd = d["nh"], d["nkv"], d["hd"]
    g = Graph(f"edgellm-{c.model_type}")
    io = DecoderIO(g, d["layers"], nkv, hd)
    inv_freq, scaling = _rope(model)
    rope = rotary(g, io.pos, inv_freq, scaling)
    eps = float(c.rms_norm_eps)

    emb = model.get_input_embeddings()
    names = LLAMA  # runtime/format/names.py: the tensors' names in the export
    emb_spec = embedding_spec(emb, names.embed)
    h = emit_embedding(g, io.ids, emb_spec, names.embed, opts)
    for i, layer in enumerate(model.model.layers):
        p = names.layer.format(i)  # graph node names
        lin = {role: names.linear(i, role) for role in names.linears}
        a, m = layer.self_attn, layer.mlp
        x = g.rms_norm(
            h,
            g.weight(tensor(names.norm(i, "attn"), "weight"), _np(layer.input_layernorm.weight)),
            eps,
            f"{p}/input_norm",
        )
        qkv = emit_linear(
            g,
            x,
            linear_spec([a.q_proj, a.k_proj, a.v_proj], lin["qkv"]),
            lin["qkv"],
            opts,
        )
        o = attention(
            g,
            io,
            i,
            qkv,
            nh=nh,
            nkv=nkv,
            hd=hd,
            scale=float(a.scaling),
            rope=rope,
            window=_window(c, i),
            name=f"{p}/attn",
        )
        h = g.op(
            "Add",
            [h, emit_linear(g, o, linear_spec([a.o_proj], lin["o"]), lin["o"], opts)],
            name=f"{p}/attn_residual",
        )
        x = g.rms_norm(
            h,
            g.weight(tensor(names.norm(i, "mlp"), "weight"), _np(layer.post_attention_layernorm.weight)),
            eps,
            f"{p}/post_norm",
        )
        inter = m.gate_proj.out_features
        gu = emit_linear(g, x, linear_spec([m.gate_proj, m.up_proj], lin["up"]), lin["up"], opts)
        gate, up = split_last(g, gu, [inter, inter], f"{p}/gate_up_split")
        act = g.op(
            "Mul",
            [g.op("Mul", [gate, g.op("Sigmoid", [gate], name=f"{p}/sigmoid")], name=f"{p}/silu"), up],
            name=f"{p}/gated",
        )
        h = g.op(
            "Add",
            [h, emit_linear(g, act, linear_spec([m.down_proj], lin["down"]), lin["down"], opts)],
            name=f"{p}/mlp_residual",
        )
    h = g.rms_norm(
        h, g.weight(tensor(names.final_norm, "weight"), _np(model.model.norm.weight)), eps, "model/final_norm"
    )
    logits = lm_head(g, model, h, emb_spec, names.embed, opts)
    g.output(logits, "logits", FLOAT, ["batch", "seq", c.vocab_size], first=True)
    return g


def lm_head(g: Graph, model, h: str, emb_spec, emb_path: str, opts: Options) -> str:
    """The lm_head; a tied head multiplies by the embedding's own tensors (one copy in the file)."""
    from edgellm.quant.modules import TiedQuantLinear

    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    tied = isinstance(head, TiedQuantLinear) or (
        getattr(head, "weight", None) is not None and head.weight is getattr(emb, "weight", None)
    )
    if tied:
        spec = emb_spec
        if head.__class__.__name__ == "Linear" and head.bias is not None:
            spec = linear_spec([head], HEAD)
        return emit_linear(g, h, spec, HEAD, opts, weight_name=emb_path)
    return emit_linear(g, h, linear_spec([head], HEAD), HEAD, opts)


def config_metadata(model) -> dict:
    c = model.config
    d = dims(model)
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None)
    theta = (rope or {}).get("rope_theta", getattr(c, "rope_theta", None))
    scaling = (
        None
        if not rope or rope.get("rope_type", "default") == "default"
        else {k: v for k, v in rope.items() if k != "rope_theta"}
    )
    return dict(
        architecture=c.model_type,
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_layers=d["layers"],
        num_heads=d["nh"],
        num_kv_heads=d["nkv"],
        head_dim=d["hd"],
        norm="rms",
        norm_eps=float(c.rms_norm_eps),
        position="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=c.max_position_embeddings,
        activation="silu",
        mlp="gated",
        attention_bias=model.model.layers[0].self_attn.q_proj.bias is not None,
        sliding_window=[_window(c, i) for i in range(d["layers"])]
        if any(_window(c, i) for i in range(d["layers"]))
        else None,
    )
