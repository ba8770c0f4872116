"""The decoder graph of every RMSNorm family (llama, mistral, qwen2, qwen3, smollm3, granite,
olmo2, phi3, gemma3_text), built from the family's description, not one builder per family:
edgellm/arch.py says which checkpoint modules are the layer's linears and norms, `features`
below reads the config into the per-layer description the runtime also reads
(runtime/features.py: norm placement, q/k norm, rope table per layer, partial rotary,
multipliers, soft-caps).

Per block (h: residual stream, B x S x D; [..] where the description has it):
    x = [rms(h)] ; q,k,v = split(x @ Wqkv^T + b) ; [q,k = rms(q), rms(k)] ; [rope(q, k)]
    h += res_mult * [rms](attn(q, k, v) @ Wo^T)
    x = [rms(h)] ; g,u = split(x @ Wgate_up^T) ; h += res_mult * [rms]((act(g) * u) @ Wdown^T)
then logits = cap(rms(h) @ Wlm^T / logits_scaling), with h0 = embed * emb_mult.
"""

from __future__ import annotations

import math

import numpy as np

from edgellm.arch import family_of, get_path
from edgellm.errors import UnsupportedError
from edgellm.runtime.format.names import HEAD, LLAMA, tensor

from .decoder import DecoderIO, attention, rotary, split_last
from .graph import FLOAT, Graph
from .weights import Options, embedding_spec, emit_embedding, emit_linear, linear_spec

ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # of the gate: SwiGLU, GeGLU


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


def _activation(c) -> str:
    act = getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise UnsupportedError(
            f"config hidden_act '{act}' is not supported for {c.model_type}; supported: {', '.join(ACTIVATIONS)}"
        )
    return act


def _rope_tables(model) -> dict[str, tuple]:
    """{"global" / "local": (inv_freq, attention scaling, long)} from HF's own rotary module; long:
    None, or LongRoPE's (long inv_freq, original_max_position_embeddings): a call whose largest
    position id reaches past it rotates with the long set (runtime/rope.py)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rot = model.model.rotary_emb
    kinds = getattr(rot, "rope_type", "default")
    out = {}
    for key, attr in (("global", "full_attention_"), ("local", "sliding_attention_")):
        prefix = attr if hasattr(rot, f"{attr}inv_freq") else ""
        if not prefix and (key == "local" or not hasattr(rot, "inv_freq")):
            continue  # no such layers (a Gemma 3 student of sliding layers only has no global table)
        kind = kinds.get(attr[:-1], "default") if isinstance(kinds, dict) else kinds
        if "dynamic" in kind:
            raise UnsupportedError(
                f"rope type '{kind}' changes with sequence length; export supports static rope types (default, "
                "linear, llama3, yarn, longrope)"
            )
        long = None
        inv = getattr(rot, f"{prefix}inv_freq")
        if kind == "longrope":  # the short set (a forward may have left the long one in inv_freq)
            inv = getattr(rot, f"{prefix}original_inv_freq")
            orig = model.config.rope_parameters["original_max_position_embeddings"]
            long_inv, _ = ROPE_INIT_FUNCTIONS["longrope"](model.config, None, seq_len=orig + 1)
            long = (_np(long_inv), int(orig))
        out[key] = (_np(inv), float(getattr(rot, f"{prefix}attention_scaling", 1.0)), long)
    return out


def _layer_rope(c, i: int) -> str:
    """Which rotary table layer i uses: none (SmolLM3's NoPE layers), local (Gemma 3's sliding layers)."""
    no_rope = getattr(c, "no_rope_layers", None)
    if no_rope is not None and not no_rope[i]:
        return "none"
    if c.model_type == "gemma3_text" and c.layer_types[i] == "sliding_attention":
        return "local"
    return "global"


def features(model) -> dict:
    """The family's per-layer description as export metadata (runtime/features.py KEYS)."""
    c, fam, d = model.config, family_of(model.config), dims(model)
    roles = dict(fam.norms)
    pre, post = "attn" in roles, "attn_out" in roles
    layer0 = get_path(model, fam.layers)[0]
    rope = [_layer_rope(c, i) for i in range(d["layers"])]
    tables = _rope_tables(model)
    rot = 2 * len(next(iter(tables.values()))[0])  # every table rotates the same dims
    scale = float(layer0.self_attn.scaling)
    emb = float(np.float32(getattr(model.get_input_embeddings(), "scalar_embed_scale", 1.0)))  # Gemma: sqrt(hidden)
    return dict(
        norm_placement="both" if pre and post else "post" if post else "pre",
        qk_norm=None if "q" not in roles else "head" if layer0.self_attn.q_norm.weight.numel() == d["hd"] else "proj",
        rope_dims=None if rot == d["hd"] else rot,
        layer_rope=None if all(r == "global" for r in rope) else rope,
        rope_local_theta=_local_theta(c) if "local" in rope else None,
        embedding_multiplier=emb * float(getattr(c, "embedding_multiplier", 1.0)),  # Granite's
        residual_multiplier=float(getattr(c, "residual_multiplier", 1.0)),
        attention_scale=None if math.isclose(scale, d["hd"] ** -0.5, rel_tol=1e-7) else scale,
        logits_scaling=float(getattr(c, "logits_scaling", 1.0)),
        # transformers' Gemma 3 attention never passes its config's attn_logit_softcapping on (Gemma 2
        # did); the runtimes implement the cap for a family whose layer applies it
        attn_logit_softcapping=getattr(c, "attn_logit_softcapping", None) if fam.attn_softcap else None,
        final_logit_softcapping=getattr(c, "final_logit_softcapping", None),
    )


def _local_theta(c) -> float:
    rp = c.rope_parameters["sliding_attention"]
    if rp.get("rope_type", "default") != "default":
        raise UnsupportedError(
            f"config rope_parameters sliding_attention rope_type '{rp.get('rope_type')}' is not supported; "
            "supported: default"
        )
    return float(rp["rope_theta"])


def build(model, opts: Options, sink=None, parts=None) -> Graph:
    """The graph of `model`. The streamed export (export/stream.py) passes a `sink` that writes
    each weight as it is added and `parts` that load one part of a meta-device model at a time
    (the embedding, layer i, the final norm and head) and drop the one before."""
    c, fam = model.config, family_of(model.config)
    act = _activation(c)
    d = dims(model)
    nh, nkv, hd = d["nh"], d["nkv"], d["hd"]
    f = features(model)
    parts = parts or RESIDENT
    g = Graph(f"edgellm-{c.model_type}", sink)
    io = DecoderIO(g, d["layers"], nkv, hd)
    tables = {k: rotary(g, io.pos, inv, sc, long) for k, (inv, sc, long) in _rope_tables(model).items()}
    rot = f["rope_dims"]
    eps = float(c.rms_norm_eps)
    off = fam.norm_offset  # Gemma's x * (1 + w): the file holds 1 + w (exact in float32)
    res_mult = f["residual_multiplier"]

    emb = model.get_input_embeddings()
    names = LLAMA  # runtime/format/names.py: the tensors' names in the export
    parts.load("embedding")
    emb_spec = embedding_spec(emb, names.embed)
    h = emit_embedding(g, io.ids, emb_spec, names.embed, opts, tied=head_tied(model))
    emb_spec = parts.hollow(emb_spec)  # a tied head needs only its shape and format from here on
    if f["embedding_multiplier"] != 1.0:
        h = g.op("Mul", [h, g.const(f["embedding_multiplier"], np.float32, "emb_mult")], name="model/emb_scaled")
    parts.boundary(0, h)
    for i, layer in enumerate(get_path(model, fam.layers)):
        parts.load("layer", i)
        p = names.layer.format(i)  # graph node names

        def norm(x, role, layer=layer, i=i, p=p):
            """RMSNorm `role` of this layer (format/names.py NORM_ROLES) applied to x, or x when absent."""
            path = dict(fam.norms).get(role)
            if path is None:
                return x
            w = _np(get_path(layer, path).weight) + np.float32(off)
            return g.rms_norm(x, g.weight(tensor(names.norm(i, role), "weight"), w), eps, f"{p}/{role}_norm")

        def linear(x, role, layer=layer, i=i):
            mods = [get_path(layer, m) for m in fam.role_modules()[role]]
            return emit_linear(g, x, linear_spec(mods, names.linear(i, role)), names.linear(i, role), opts)

        def residual(h, y, name, p=p):
            if res_mult != 1.0:
                y = g.op("Mul", [y, g.const(res_mult, np.float32, "res_mult")], name=f"{name}_scaled")
            return g.op("Add", [h, y], name=name)

        qk = None
        if f["qk_norm"]:
            a = layer.self_attn
            wq, wk = (
                g.weight(tensor(names.norm(i, r), "weight"), _np(m.weight) + np.float32(off))
                for r, m in (("q", a.q_norm), ("k", a.k_norm))
            )
            qk = (f["qk_norm"], wq, wk, eps)
        kind = (f["layer_rope"] or ["global"] * d["layers"])[i]
        o = attention(
            g,
            io,
            i,
            linear(norm(h, "attn"), "qkv"),
            nh=nh,
            nkv=nkv,
            hd=hd,
            scale=float(layer.self_attn.scaling),
            rope=None if kind == "none" else tables[kind],
            window=_window(c, i),
            name=f"{p}/attn",
            rot=rot,
            qk_norm=qk,
            softcap=f["attn_logit_softcapping"],
        )
        h = residual(h, norm(linear(o, "o"), "attn_out"), f"{p}/attn_residual")
        gu = linear(norm(h, "mlp"), "up")
        inter = c.intermediate_size
        gate, up = split_last(g, gu, [inter, inter], f"{p}/gate_up_split")
        if act == "silu":
            gate = g.op("Mul", [gate, g.op("Sigmoid", [gate], name=f"{p}/sigmoid")], name=f"{p}/silu")
        else:
            gate = g.op("Gelu", [gate], name=f"{p}/gelu", approximate="tanh")
        h = residual(
            h, norm(linear(g.op("Mul", [gate, up], name=f"{p}/gated"), "down"), "mlp_out"), f"{p}/mlp_residual"
        )
        parts.boundary(i + 1, h)
    parts.load("final")
    final = _np(get_path(model, fam.final_norm).weight) + np.float32(off)
    h = g.rms_norm(h, g.weight(tensor(names.final_norm, "weight"), final), eps, "model/final_norm")
    logits = lm_head(g, model, h, emb_spec, names.embed, opts)
    if f["logits_scaling"] != 1.0:
        logits = g.op("Div", [logits, g.const(f["logits_scaling"], np.float32, "logits_scaling")], name="model/scaled")
    if f["final_logit_softcapping"]:
        cap = g.const(f["final_logit_softcapping"], np.float32, "final_cap")
        logits = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits, cap], name="model/cap")], name="model/tanh"), cap])
    g.output(logits, "logits", FLOAT, ["batch", "seq", c.vocab_size], first=True)
    parts.load(None)
    return g


class Resident:
    """`build`'s parts when the whole model is in memory: nothing to load or drop."""

    def load(self, part: str | None, i: int | None = None) -> None:
        pass

    def hollow(self, spec):
        return spec

    def boundary(self, i: int, h: str) -> None:
        """The graph tensor holding the residual stream before layer i (after the last: the final norm's input)."""


RESIDENT = Resident()


def head_tied(model) -> bool:
    """The lm_head reads the embedding's tensors (a TiedQuantLinear, or the same float weight)."""
    from edgellm.quant.modules import TiedQuantLinear

    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return isinstance(head, TiedQuantLinear) or (
        getattr(head, "weight", None) is not None and head.weight is getattr(emb, "weight", None)
    )


def lm_head(g: Graph, model, h: str, emb_spec, emb_path: str, opts: Options) -> str:
    """The lm_head; a tied head multiplies by the embedding's own tensors (one copy in the file)."""
    head = model.get_output_embeddings()
    if head_tied(model):
        spec = emb_spec
        if head.__class__.__name__ == "Linear" and head.bias is not None:
            spec = linear_spec([head], HEAD)
        return emit_linear(g, h, spec, HEAD, opts, weight_name=emb_path)
    return emit_linear(g, h, linear_spec([head], HEAD), HEAD, opts)


def _qkv_bias(model) -> bool:
    """q/k/v have biases (Qwen2 has them without saying so in its config)."""
    fam = family_of(model.config)
    layer0 = get_path(model, fam.layers)[0]
    return getattr(get_path(layer0, fam.role_modules()["qkv"][0]), "bias", None) is not None


def config_metadata(model) -> dict:
    c = model.config
    d = dims(model)
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None)
    if isinstance(rope, dict) and "full_attention" in rope:  # per layer type (Gemma 3): the global table's
        rope = rope["full_attention"]
    theta = (rope or {}).get("rope_theta", getattr(c, "rope_theta", None))
    scaling = (
        None
        if not rope or rope.get("rope_type", "default") == "default"
        else {k: v for k, v in rope.items() if k != "rope_theta"}
    )
    if scaling is not None and scaling.get("rope_type") == "longrope":  # resolved as HF resolved it
        scaling["attention_factor"] = next(iter(_rope_tables(model).values()))[1]
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
        activation=_activation(c),
        mlp="gated",
        attention_bias=_qkv_bias(model),
        sliding_window=[_window(c, i) for i in range(d["layers"])]
        if any(_window(c, i) for i in range(d["layers"]))
        else None,
        **features(model),
    )
