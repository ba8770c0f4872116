"""A model directory as a meta-device skeleton whose parts load one at a time (issue 26).

`open_skeleton` builds the model on the meta device (no memory) with the packed modules its
edgellm.json names swapped in, and checks every tensor the skeleton holds against the
checkpoint's headers (names, shapes) before anything heavy runs. `materialize` fills one module
from the checkpoint (edgellm/checkpoint.py: a tensor at a time, in its stored dtype, widened
exactly as the resident load widens it); `release` drops it again. The streamed export and the
streamed evaluation walk a model this way: the embedding, layer i, the final norm and head.
"""

from __future__ import annotations

from pathlib import Path

from .errors import EdgeLLMError


def open_skeleton(path: Path, config, record: dict):
    """(model on meta with a real rotary table, Checkpoint) of the directory `path`."""
    import torch

    from .checkpoint import Checkpoint

    path = Path(path)
    info = record.get("quantization")
    ckpt = Checkpoint(path)
    model = skeleton_model(config)
    if info:
        from .quant.apply import swap_for_loading

        with torch.device("meta"):
            swap_for_loading(model, info, torch.float32)
        _check_packed(ckpt, model, info, path)
    else:
        ckpt.check_against(config)
        _keep_tied(model)
    return model.eval(), ckpt


def skeleton_model(config):
    """The model on the meta device with its non-persistent buffers real (they are computed, not
    stored, so no checkpoint holds them): the rotary tables, rebuilt from the config, and an
    embedding's scale (Gemma 3's sqrt(hidden), HF's `embed_scale` beside `scalar_embed_scale`).
    `materialize` and `release` keep them. A buffer left on meta is refused here, in one line:
    a part loaded later would compute with garbage."""
    import torch

    from .checkpoint import meta_model

    model = meta_model(config)
    inner = model.base_model
    if hasattr(inner, "rotary_emb"):
        inner.rotary_emb = type(inner.rotary_emb)(config=config)  # small, computed from the config
    emb = model.get_input_embeddings()
    if getattr(emb, "embed_scale", None) is not None and hasattr(emb, "scalar_embed_scale"):
        emb.embed_scale = torch.tensor(emb.scalar_embed_scale)  # as the module's __init__ computes it
    for mname, m in model.named_modules():
        for b in m._non_persistent_buffers_set:
            t = m._buffers.get(b)
            if t is not None and t.is_meta:
                raise EdgeLLMError(
                    f"the {config.model_type} family computes buffer '{mname}.{b}' at load time, which the "
                    "layer-streaming path cannot rebuild; report it"
                )
    return model


def _keep_tied(model) -> None:
    """A float head tied to the embedding becomes a `TiedHead` that reads the embedding's current
    table: parts load and drop one at a time, and `to_empty` / `to("meta")` give the embedding a new
    parameter, which would leave a plain tied Linear holding the old one (and ask the checkpoint for
    an lm_head it does not store)."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    w = getattr(head, "weight", None)
    if w is not None and w is getattr(emb, "weight", None) and getattr(head, "bias", None) is None:
        model.set_output_embeddings(_tied_head_module(emb))


def _tied_head_module(emb):
    import torch.nn.functional as F
    from torch import nn

    class TiedHead(nn.Module):
        """(..., dim) -> (..., vocab) by the embedding's own table (nothing of its own to load)."""

        def __init__(self, embedding):
            super().__init__()
            self.embedding = [embedding]  # a list: not registered, so nothing is loaded or saved twice
            self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
            self.bias = None

        @property
        def weight(self):
            return self.embedding[0].weight

        @weight.setter
        def weight(self, value):  # transformers' tie_weights sets it to the embedding's: already so
            pass

        def forward(self, x):
            return F.linear(x, self.embedding[0].weight.to(x.dtype))

    return TiedHead(emb)


def _check_packed(ckpt, model, info: dict, path: Path) -> None:
    """Every tensor the skeleton holds is in the checkpoint with its shape (as load_quantized checks)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in ckpt.entries and not (k.startswith("lm_head.") and info.get("tied"))]
    unexpected = [k for k in ckpt.entries if k not in expected]
    if missing or unexpected:
        raise EdgeLLMError(
            f"'{path}' does not match its edgellm.json (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "re-run edgellm quantize"
        )
    for k, shape in expected.items():
        if k in ckpt.entries and ckpt.shape(k) != shape:
            raise EdgeLLMError(
                f"'{ckpt.entries[k][0]}': tensor '{k}' has shape {list(ckpt.shape(k))} but its edgellm.json implies "
                f"{list(shape)}; re-run edgellm quantize"
            )


def module_names(model) -> dict[int, str]:
    """id(module) -> its dotted path (the checkpoint's tensor prefix)."""
    return {id(m): n for n, m in model.named_modules()}


def materialize(module, name: str, ckpt) -> None:
    """Fill `module` (on meta) from the checkpoint tensors under `name`."""
    import torch

    module._apply(lambda t: torch.empty_like(t, device="cpu") if t.is_meta else t)  # computed buffers stay
    with torch.no_grad():
        for k, t in module.state_dict(keep_vars=True).items():
            t.copy_(ckpt.get(f"{name}.{k}"))


def release(module) -> None:
    """Back to the meta device: its memory is freed (and given back to the OS)."""
    from .memory import trim

    keep = {id(t) for m in module.modules() for b, t in m._buffers.items() if b in m._non_persistent_buffers_set}
    module._apply(lambda t: t if id(t) in keep else t.to("meta"))
    trim()


def tied_head(model) -> bool:
    """The head multiplies by the embedding's own table (nothing of its own to load)."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    w = getattr(head, "weight", None)
    return type(head).__name__ == "TiedQuantLinear" or (w is not None and w is getattr(emb, "weight", None))


def final_logits(model, h, head):
    """The logits (T, V) the CausalLM's own forward makes of the final-normed hidden states h (T, d)
    (or (B, T, V) of (B, T, d)),
    with `head` ((..., d) -> (..., V), e.g. the rows of a head read a chunk at a time) as its lm_head:
    whatever the family does after the head (Gemma 3's final_logit_softcapping, Granite's
    logits_scaling) comes from the model's code, not from a copy of it here."""
    import torch
    from torch import nn
    from transformers.modeling_outputs import BaseModelOutputWithPast

    class _Hidden(nn.Module):
        """The base model, replaced by what it computed: h."""

        def forward(self, *args, **kwargs):
            return BaseModelOutputWithPast(last_hidden_state=batch)

    class _Head(nn.Module):
        def forward(self, x):
            return head(x)

    batch = h if h.dim() == 3 else h.unsqueeze(0)  # (B, T, d)
    prefix = model.base_model_prefix
    base, out = getattr(model, prefix), model.get_output_embeddings()
    setattr(model, prefix, _Hidden())
    model.set_output_embeddings(_Head())
    try:
        ids = torch.zeros(batch.shape[:2], dtype=torch.long)
        logits = model(input_ids=ids, use_cache=False).logits
        return logits if h.dim() == 3 else logits[0]
    finally:
        setattr(model, prefix, base)
        model.set_output_embeddings(out)
