"""Mixed precision to a bits-per-weight budget (`edgellm quantize --target-bpw 4.5`).

1. Units: linears that the export fuses (q/k/v, gate/up: one MatMulNBits) share a format; every
   other linear is its own unit.
2. Sensitivity: for each unit alone, the KL divergence of the model's next-token distribution
   from the unquantized one on calibration sequences, with only that unit quantized at the probe
   format (4-bit, group 128, clipping search). Blocks before the unit are not re-run: their fp
   outputs are cached. For the other candidate formats the KL is scaled by the ratio of the
   unit's rounding error sum_j d_j ||W_:j - Q(W)_:j||^2 (d_j = mean x_j^2 of its input) to the
   probe's: to second order the KL grows with that error.
3. Allocation: start every unit at its smallest format; repeatedly apply the upgrade with the
   largest KL reduction per added byte that still fits the budget (a greedy knapsack over
   each unit's candidates).
bits/weight is apply.bits_per_weight's: codes + fp16 scales (+ zero points) x 8 / parameters.
"""

from __future__ import annotations

import torch

from ..arch import block_linears, decoder_layers, family_of, get_path, is_linear, linear_weight
from ..errors import EdgeLLMError
from ..skeleton import final_logits
from .formats import QuantFormat, dequantize_codes, mse_group_params, pad_columns, quantize_codes

# (bits, group size, symmetric) a unit may get: asymmetric groups cost a zero-point byte each but
# fit skewed groups better, so e.g. 4-bit g64 asym (4.375 bits/weight) sits between sym g64 and g32.
# 4-bit g16 (5.0) is the step between g32 and 8-bit (8.125) that lets a few sensitive units buy
# precision: without it the tests' trained 2-layer llama measured KL 0.00311 at 4.5 bits/weight
# against uniform g32's 0.00305; with it 0.00289 (2026-12-01).
# Float zero points (fp16, "float": Q4_1-style, the group's [min, max] mapped exactly onto the codes)
# cost one more byte per group than integer ones: 4-bit g32 5.0 bits/weight, g64 4.5. On
# SmolLM2-135M (whose released weights lie on Q4_1's grid) `--target-bpw 4.5` measured KL 0.0699
# without them and 0.0332 with them; on the trained stdlib llama 0.0003 either way (2026-12-01,
# benchmarks/RESULTS.md §3).
CANDIDATES = (
    (4, 128, True, "int"),
    (4, 64, True, "int"),
    (4, 32, True, "int"),
    (4, 16, True, "int"),
    (4, 128, False, "int"),
    (4, 64, False, "int"),
    (4, 32, False, "int"),
    (4, 64, False, "float"),
    (4, 32, False, "float"),
    (8, 128, True, "int"),
)
PROBE = (4, 128, True)
SENS_SAMPLES = 4  # calibration sequences the sensitivity pass scores on
SENS_TOKENS = 256  # tokens of each
MIN_TOKENS = 256  # below this the per-unit KLs are noise


def units(model) -> list[list[str]]:
    """Paths of the linears sharing a format, block by block, in forward order."""
    fam = family_of(model.config)
    out = []
    for bi, block in enumerate(decoder_layers(model)):
        names = list(block_linears(block))
        fused = [list(t) for prev, t in fam.scale_groups if not is_linear(get_path(block, prev)) and len(t) > 1]
        done = {n for g in fused for n in g}
        groups = fused + [[n] for n in names if n not in done]
        groups.sort(key=lambda g: names.index(g[0]))
        out += [[f"{fam.layers}.{bi}.{n}" for n in g] for g in groups]
    return out


def fmt_bytes(shape: tuple[int, int], fmt: QuantFormat) -> int:
    """Stored bytes of an (out, in) linear in `fmt`: codes, fp16 scales, zero points if asymmetric."""
    out_f, in_f = shape
    ng = fmt.padded(in_f) // fmt.group_for(in_f)
    return out_f * (fmt.padded(in_f) * fmt.bits // 8 + ng * (2 + fmt.zero_bytes))


def _formats(sym: bool | None) -> list[QuantFormat]:
    """The candidates; sym=True/False keeps only that kind, None allows both."""
    return [QuantFormat(b, g, s, z) for b, g, s, z in CANDIDATES if sym is None or s == sym]


def _shapes(model, unit: list[str]) -> list[tuple[int, int]]:
    return [tuple(linear_weight(get_path(model, p)).shape) for p in unit]


def check_budget(model, target: float, sym: bool | None = None) -> None:
    """Refuse a budget no plan can meet: below every unit at its smallest format, or above 8."""
    if not target <= 8:
        raise EdgeLLMError(f"--target-bpw {target} is above 8; 8-bit is the widest format (use --bits 8)")
    fmts = _formats(sym)
    params = smallest = 0
    for unit in units(model):
        shapes = _shapes(model, unit)
        params += sum(o * i for o, i in shapes)
        smallest += min(sum(fmt_bytes(s, f) for s in shapes) for f in fmts)
    floor = 8 * smallest / params
    if target < floor:
        raise EdgeLLMError(
            f"--target-bpw {target} cannot be met: the smallest formats "
            f"({', '.join(f.label() for f in fmts)}) need {floor:.3f} bits/weight on this model; "
            f"give at least {floor:.3f}"
        )


def _fake(w: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Quantize-dequantize W (out, in) with the clipping search -> (out, in)."""
    out_f, in_f = w.shape
    g = fmt.group_for(in_f)
    wg = pad_columns(w.float(), fmt.padded(in_f)).reshape(out_f, -1, g)
    s, z = mse_group_params(wg, fmt)
    return dequantize_codes(quantize_codes(wg, s, z, fmt.maxq, fmt.float_zero), s, z).reshape(out_f, -1)[:, :in_f]


def _kl(ref_logp: torch.Tensor, logits: torch.Tensor) -> float:
    logp = torch.log_softmax(logits.float(), -1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()


def unit_errors(unit: list[str], saved: list[torch.Tensor], col_power: dict, fmts: list[QuantFormat]) -> dict:
    """Per format: the unit's rounding error sum_j d_j ||W_:j - Q(W)_:j||^2 (d_j: col_power)."""
    return {
        f: sum(((w - _fake(w, f)).pow(2) * col_power[p].unsqueeze(0)).sum().item() for p, w in zip(unit, saved))
        for f in fmts
    }


def unit_record(unit: list[str], shapes: list[tuple], kl: float, err: dict, fmts: list[QuantFormat]) -> dict:
    """The sensitivity pass's row of a unit: each candidate's bytes and estimated KL (the probe's KL
    scaled by the ratio of rounding errors)."""
    probe = QuantFormat(*PROBE)
    return {
        "unit": unit,
        "shapes": shapes,
        "kl_probe": kl,
        "options": [
            {
                "bits": f.bits,
                "group_size": f.group_size,
                "sym": f.sym,
                "zero": f.zero,
                "bytes": sum(fmt_bytes(s, f) for s in shapes),
                "kl": kl * err[f] / max(err[probe], 1e-30),
            }
            for f in fmts
        ],
    }


def check_tokens(calib: torch.Tensor) -> torch.Tensor:
    """The sensitivity pass's sequences (SENS_SAMPLES x SENS_TOKENS of calib); refuses too few tokens."""
    x = calib[:SENS_SAMPLES, :SENS_TOKENS]
    if x.numel() < MIN_TOKENS:
        raise EdgeLLMError(
            f"the calibration set ({calib.shape[0]} x {calib.shape[1]} tokens) is too small for the sensitivity pass "
            f"of --target-bpw; it needs at least {MIN_TOKENS} tokens (raise --calib-samples or --seq-len)"
        )
    return x


def sensitivity(model, calib: torch.Tensor, sym: bool | None = None, progress=None) -> list[dict]:
    """Per unit: its paths, shapes, bytes and estimated KL for each candidate format."""
    from ..progress import NULL

    progress = progress or NULL
    x = check_tokens(calib)
    blocks = decoder_layers(model)
    fam = family_of(model.config)
    block_in: list = []  # (hidden, kwargs) entering each block
    col_power: dict[str, torch.Tensor] = {}  # linear path -> mean x_j^2 of its input (in,)
    hooks = []
    for bi, block in enumerate(blocks):

        def pre(_m, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            block_in.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))

        hooks.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        for name, lin in block_linears(block).items():

            def lin_pre(_m, args, path=f"{fam.layers}.{bi}.{name}"):
                a = args[0].reshape(-1, args[0].shape[-1]).float()
                col_power[path] = a.pow(2).mean(0)

            hooks.append(lin.register_forward_pre_hook(lin_pre))
    try:
        with torch.no_grad():
            ref_logp = torch.log_softmax(model(input_ids=x, use_cache=False).logits.float(), -1)  # (B, T, vocab)
    finally:
        for h in hooks:
            h.remove()
    norm, head = get_path(model, fam.final_norm), model.get_output_embeddings()
    fmts = _formats(sym)
    probe = QuantFormat(*PROBE)
    out = []
    all_units = units(model)
    with torch.no_grad():
        for unit in progress.track(all_units, "sensitivity", total=len(all_units)):
            bi = int(unit[0].split(".")[len(fam.layers.split("."))])
            mods = [get_path(model, p) for p in unit]
            saved = [linear_weight(m).detach().clone() for m in mods]
            for m, w in zip(mods, saved):
                m.weight.data.copy_(_fake(w, probe).t() if type(m).__name__ == "Conv1D" else _fake(w, probe))
            h = block_in[bi][0]
            for j in range(bi, len(blocks)):  # each block with its own mask and rotary table (Gemma 3)
                o = blocks[j](h, **block_in[j][1])
                h = o[0] if isinstance(o, tuple) else o
            # the logits as the model's forward makes them (Gemma 3's softcapping, Granite's logits_scaling),
            # as the reference's are
            kl = max(_kl(ref_logp, final_logits(model, norm(h), head)), 1e-12)
            for m, w in zip(mods, saved):
                m.weight.data.copy_(w.t() if type(m).__name__ == "Conv1D" else w)
            err = unit_errors(unit, saved, col_power, fmts + [probe])
            out.append(unit_record(unit, [tuple(w.shape) for w in saved], kl, err, fmts))
    return out


def allocate(sens: list[dict], target: float) -> list[int]:
    """Index into each unit's options meeting `target` bits/weight with the least estimated KL."""
    params = sum(o * i for u in sens for o, i in u["shapes"])
    budget = target * params / 8
    choice = [min(range(len(u["options"])), key=lambda k: u["options"][k]["bytes"]) for u in sens]
    used = sum(u["options"][c]["bytes"] for u, c in zip(sens, choice))
    while True:
        best, best_gain = None, 0.0
        for ui, u in enumerate(sens):
            cur = u["options"][choice[ui]]
            for k, opt in enumerate(u["options"]):
                extra = opt["bytes"] - cur["bytes"]
                gain = cur["kl"] - opt["kl"]
                if gain <= 0 or used + extra > budget:
                    continue
                ratio = gain / max(extra, 1)  # a cheaper, better option (extra <= 0) wins outright
                if extra <= 0:
                    ratio = float("inf")
                if ratio > best_gain:
                    best, best_gain = (ui, k, extra), ratio
        if best is None:
            return choice
        ui, k, extra = best
        choice[ui] = k
        used += extra


def plan_formats(
    model, calib: torch.Tensor, target: float, sym: bool | None = None, progress=None
) -> tuple[dict[str, QuantFormat], dict]:
    """The per-linear formats for a budget, and a record of the plan for edgellm.json."""
    check_budget(model, target, sym)
    return plan_from(sensitivity(model, calib, sym, progress), target, sym)


def plan_from(sens: list[dict], target: float, sym: bool | None) -> tuple[dict[str, QuantFormat], dict]:
    """The allocation for `target` from a sensitivity table (resident or streamed pass) and its record."""
    choice = allocate(sens, target)
    plan, rows = {}, []
    for u, c in zip(sens, choice):
        opt = u["options"][c]
        for p in u["unit"]:
            plan[p] = QuantFormat(opt["bits"], opt["group_size"], opt["sym"], opt["zero"])
        rows.append(
            {
                "unit": u["unit"],
                "bits": opt["bits"],
                "group_size": opt["group_size"],
                "sym": opt["sym"],
                "zero": opt["zero"],
                "kl_probe": round(u["kl_probe"], 6),
            }
        )
    params = sum(o * i for u in sens for o, i in u["shapes"])
    planned = 8 * sum(u["options"][c]["bytes"] for u, c in zip(sens, choice)) / params
    return plan, {
        "target_bpw": target,
        "planned_bpw": round(planned, 4),
        "probe": list(PROBE),
        "sym": sym,
        "candidates": [list(c) for c in CANDIDATES],
        "units": rows,
    }
