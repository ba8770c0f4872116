"""Rotation of the residual stream (QuaRot, Ashkboos et al. 2024; SpinQuant, Liu et al. 2024),
folded into the weights so the exported graph and the runtime do not change.

RMSNorm(x) * g = RMSNorm(x Q) Q^T * g for any orthogonal Q once the scale g is moved out of the
norm. So: (1) fuse every norm's scale into the linears that read it (W <- W diag(g), g <- 1);
(2) rotate the residual stream h -> h Q: the token embeddings E <- E Q, every linear reading the
stream W <- W Q (q/k/v, gate/up, lm_head), every linear writing it W <- Q^T W (o_proj,
down_proj). The model computes the same function in exact arithmetic, but its weights and
activations lose their outlier channels (each is spread over all channels), so 4-bit groups
waste less range on a few large values.

Q = diag(signs) (R_m kron H_b): H_b the normalised Sylvester-Hadamard matrix of the largest power
of two b dividing the width, R_m a random orthogonal m x m matrix for the odd rest (576 = 9 x 64,
384 = 3 x 128), random signs in front (a randomised Hadamard transform).

Tied embeddings: the head of a tied model reads E diag(g_f) after the final norm while the lookup
reads E, and no orthogonal Q (other than a signed permutation) turns diag(g_f) into a diagonal
again, so one stored matrix cannot serve both once the stream is rotated (keeping it tied with
the closest diagonal in the norm was measured: KL 27 nats/token on SmolLM2-135M). Rotation
therefore unties the head (E diag(g_f) Q, stored beside E Q) and records it; the file grows
by one embedding-sized matrix. Untied models are rotated exactly, with no size change.

Only RMSNorm families (Llama, Mistral, Qwen2). LayerNorm (GPT-2) also subtracts the mean, which
a rotation does not commute with; it is refused rather than converted.
"""

from __future__ import annotations

import math

import torch

from ..arch import decoder_layers
from ..errors import UnsupportedError

ROTATABLE = ("llama", "mistral", "qwen2")


def hadamard(n: int) -> torch.Tensor:
    """Normalised Sylvester-Hadamard matrix (n, n), n a power of two: H H^T = I."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard size must be a power of two, got {n}")
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H / math.sqrt(n)


def random_orthogonal(m: int, gen: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal (m, m) matrix (QR of a Gaussian, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).contiguous()


def rotation_matrix(d: int, seed: int = 0) -> torch.Tensor:
    """Orthogonal Q (d, d) float64: diag(random signs) @ (R_m kron H_b), d = m * b, b = 2**k."""
    b = d & -d  # largest power of two dividing d
    m = d // b
    gen = torch.Generator().manual_seed(seed)
    core = hadamard(b) if m == 1 else torch.kron(random_orthogonal(m, gen), hadamard(b))
    signs = torch.randint(0, 2, (d,), generator=gen).double() * 2 - 1
    return signs.unsqueeze(1) * core


def check_rotatable(model) -> None:
    rotatable_config(model.config)


def rotatable_config(config) -> None:
    """--rotate's refusal (one line) for a family it is not exact for; the resident and the
    layer-streaming quantize both ask here, so they refuse alike."""
    from ..arch import family_of

    mt = getattr(config, "model_type", None)
    reason = family_of(config).rotate_refusal
    if reason is not None or mt not in ROTATABLE:
        raise UnsupportedError(
            f"--rotate supports {', '.join(ROTATABLE)}; not '{mt}': {reason}; quantize it without --rotate"
        )


ROT_CHUNK = 4096  # rows (columns for a writer) rotated per product: bounds the float64 temporaries


def rotate_rows(w: torch.Tensor, Q: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
    """A reader of the stream, in place: W (rows, d) <- (W diag(g)) Q, ROT_CHUNK rows at a time
    (each rounded to W's dtype after the scale and after the product). The resident rotation and
    the layer-streaming one (quant/stream_rotate.py) both call this on chunks starting at
    multiples of ROT_CHUNK, so their results are the same bits."""
    for r in range(0, w.shape[0], ROT_CHUNK):
        c = w[r : r + ROT_CHUNK].double()  # (chunk, d)
        if g is not None:
            c = (c * g.unsqueeze(0)).to(w.dtype).double()
        w[r : r + ROT_CHUNK] = (c @ Q).to(w.dtype)
    return w


def rotate_cols(w: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """A writer to the stream, in place: W (d, in) <- Q^T W, ROT_CHUNK columns at a time."""
    for c in range(0, w.shape[1], ROT_CHUNK):
        w[:, c : c + ROT_CHUNK] = (Q.t() @ w[:, c : c + ROT_CHUNK].double()).to(w.dtype)
    return w


def _rot_out(lin, Q: torch.Tensor) -> None:  # a writer to the stream: W <- Q^T W, b <- b Q
    rotate_cols(lin.weight.data, Q)
    if lin.bias is not None:
        lin.bias.data = (lin.bias.data.double() @ Q).to(lin.bias.dtype)


def rotate_block(layer, Q: torch.Tensor) -> None:
    """One decoder block in place: its two norms' scales fused into the linears that read them
    (then set to 1), readers rotated W <- W diag(g) Q, writers W <- Q^T W."""
    a, m = layer.self_attn, layer.mlp
    g1, g2 = layer.input_layernorm.weight.data.double(), layer.post_attention_layernorm.weight.data.double()
    for lin in (a.q_proj, a.k_proj, a.v_proj):
        rotate_rows(lin.weight.data, Q, g1)
    for lin in (m.gate_proj, m.up_proj):
        rotate_rows(lin.weight.data, Q, g2)
    _rot_out(a.o_proj, Q)
    _rot_out(m.down_proj, Q)
    layer.input_layernorm.weight.data.fill_(1.0)
    layer.post_attention_layernorm.weight.data.fill_(1.0)


def record(d: int, seed: int, untied: bool) -> dict:
    """What edgellm.json records of a rotation."""
    return {
        "kind": "hadamard" if d & (d - 1) == 0 else f"R{d // (d & -d)} x hadamard{d & -d}",
        "width": d,
        "seed": seed,
        "untied": untied,
    }


def rotate_model(model, seed: int = 0) -> dict:
    """Fuse norm scales and rotate the residual stream in place (module docstring); a tied head
    is untied. Returns a record of the rotation."""
    check_rotatable(model)
    d = model.config.hidden_size
    Q = rotation_matrix(d, seed)
    with torch.no_grad():
        for layer in decoder_layers(model):
            rotate_block(layer, Q)
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is emb.weight
        norm = model.model.norm
        gf = norm.weight.data.double()
        if tied:  # untie: the head gets its own copy, then absorbs g_f exactly like an untied head
            new = torch.nn.Linear(d, emb.weight.shape[0], bias=False, dtype=emb.weight.dtype)
            new.weight.data = emb.weight.data.clone()
            model.lm_head = head = new
            model.config.tie_word_embeddings = False
            emb.weight.data = emb.weight.data.clone()
        rotate_rows(emb.weight.data, Q)  # (vocab, d) rows live in the stream
        rotate_rows(head.weight.data, Q, gf)
        norm.weight.data.fill_(1.0)
    return record(d, seed, tied)
