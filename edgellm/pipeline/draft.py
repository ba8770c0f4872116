"""`edgellm distill --draft-for TARGET`: a small draft model for speculative decoding (`run --draft`),
trained on the target's own greedy continuations and log-probs (edgellm.distill.draft).

Defaults are a draft's, not a student's: 2 layers, the target's embeddings and head copied and
frozen, short prompts continued by the target, KL on the generated positions only, a higher
learning rate than a student heal (few layers, little data). Quantize and export the draft like
any model afterwards (recipes/smollm2-draft.yaml does target and draft end to end).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..distill.draft import DraftInit, PromptStyle
from ..errors import EdgeLLMError
from .common import check_range, data_tokens, load_spec
from .distill import Device, check_training_ranges
from .options import option


@dataclass
class DraftOptions:
    draft_layers: int = option(2, "--draft-layers", min=1)  # a few layers: the draft runs k times per verify pass
    draft_init: DraftInit = option(DraftInit.first, "--draft-init")  # first: measured best (NOTES-draft.md)
    prompts: int = option(512, "--prompts", min=2)  # prompts the target continues (1/8 held out to measure)
    prompt_style: PromptStyle = option(PromptStyle.auto, "--prompt-style")  # auto: requests for a chat model
    prompt_tokens: int = option(32, "--prompt-tokens", min=1)  # tokens of data per prompt (before the chat frame)
    gen_tokens: int = option(64, "--gen-tokens", min=1)  # greedy tokens the target writes per prompt
    kl_top_k: int = option(64, "--kl-top-k", min=1)  # target log-probs kept per position (+ one rest bucket)
    temperature: float = option(1.0, "--temperature")
    data: str | None = option(None, "--data")  # None: the built-in corpus
    batch_size: int = option(16, "--batch-size", min=1)  # sequences per training step
    steps: int = option(300, "--steps", min=1)
    lr: float = option(1e-3, "--lr")
    warmup_steps: int = option(-1, "--warmup-steps")  # -1: 5% of steps
    weight_decay: float = option(0.01, "--weight-decay")
    clip: float = option(1.0, "--clip", min=0.0)
    device: Device = option(Device.cpu, "--device")
    evaluate: bool = option(True, "--eval")  # agreement with the target on held-out continuations
    seed: int = option(0, "--seed")


@dataclass
class DraftResult:
    output: Path
    target_layers: int = 0
    kept: list = field(default_factory=list)
    parameters: dict = field(default_factory=dict)  # target, draft, trained
    data: dict = field(default_factory=dict)  # prompts, tokens, chat, seconds
    quality: dict = field(default_factory=dict)  # initial / draft: agreement, kl, tokens
    seconds: float = 0.0  # training


def check_options(o: DraftOptions) -> None:
    check_training_ranges(o)
    for name, value, lo, lo_open in (
        ("--draft-layers", o.draft_layers, 1, False),
        ("--prompts", o.prompts, 2, False),
        ("--prompt-tokens", o.prompt_tokens, 1, False),
        ("--gen-tokens", o.gen_tokens, 1, False),
        ("--kl-top-k", o.kl_top_k, 1, False),
        ("--batch-size", o.batch_size, 1, False),
        ("--steps", o.steps, 1, False),
    ):
        check_range(name, value, lo, lo_open=lo_open)
    if Device(o.device) is Device.cuda:
        import torch

        if not torch.cuda.is_available():
            raise EdgeLLMError("--device cuda: no CUDA device is available; use --device cpu")


def _load_target(target: str, o: DraftOptions, progress):
    """The target, after the checks that need only its config and edgellm.json (before loading it)."""
    from ..distill.student import num_layers
    from ..modelio import load_config, resolve_spec
    from ..record import read_record

    path = Path(resolve_spec(target))
    if (path / "model.onnx").is_file():
        raise EdgeLLMError(
            f"--draft-for '{target}' is an edgellm export (model.onnx), not a model directory; give the unquantized "
            "model it was made from"
        )
    if path.is_dir() and (path / "config.json").is_file() and read_record(path).get("quantization"):
        raise EdgeLLMError(
            f"--draft-for '{target}' is quantized; give the unquantized target (the model you quantized), "
            "then quantize the draft and the target separately"
        )
    config = load_config(target)
    n = num_layers(config)
    if o.draft_layers >= n:
        raise EdgeLLMError(
            f"--draft-layers {o.draft_layers} must be smaller than the target's {n} layers "
            f"(a draft must be cheaper than its target); give at most {n - 1}"
        )
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    extra = 64 if PromptStyle(o.prompt_style) is PromptStyle.continue_ else 128  # the chat frame (+ a request)
    if limit and o.prompt_tokens + o.gen_tokens + extra > limit:
        raise EdgeLLMError(
            f"--prompt-tokens {o.prompt_tokens} + --gen-tokens {o.gen_tokens} (+ the chat template and the request) "
            f"exceed the target's {limit} positions; give fewer"
        )
    return load_spec(target, "loading target", progress=progress)


def run_draft(target: str, output: Path, options: DraftOptions, progress=None, train_progress=None, force=False):
    """Distil a draft for `target` into the model directory `output` (written whole at the end)."""
    import json
    import time

    from ..data import BUILTIN, split_tokens
    from ..distill import draft as D
    from ..distill.checkpoint import model_identity
    from ..distill.train import TrainConfig
    from ..modelio import count_parameters, save_model
    from ..outputs import atomic_output_dir, check_output_dir
    from ..progress import NULL
    from ..record import add_step
    from .common import status

    o = options
    progress = progress or NULL
    check_options(o)
    output = Path(output)
    inputs = [target, o.data]
    check_output_dir(output, force, inputs)
    cfg = TrainConfig(
        steps=o.steps,
        batch_size=o.batch_size,
        lr=o.lr,
        warmup_steps=o.warmup_steps,
        weight_decay=o.weight_decay,
        clip=o.clip,
        seed=o.seed,
        checkpoint_every=0,
    )
    t = _load_target(target, o, progress)
    draft, kept, frozen = D.draft_from_target(t.model, o.draft_layers, DraftInit(o.draft_init), o.seed)

    ids = split_tokens(data_tokens(t.tokenizer, o.data), "calib")
    prompt_ids, chat, style = D.prompts(
        t.tokenizer, ids, o.prompts, o.prompt_tokens, o.seed, style=PromptStyle(o.prompt_style)
    )
    eos = _eos_ids(t)
    device = Device(o.device).value
    t0 = time.perf_counter()
    t.model.to(device)
    data = D.continuations(
        t.model,
        prompt_ids.to(device),
        o.gen_tokens,
        top_k=o.kl_top_k,
        batch_size=max(o.batch_size, D.GEN_BATCH),
        eos_ids=eos,
        chat=chat,
        progress=progress,
    ).to("cpu")
    t.model.to("cpu")
    gen_s = time.perf_counter() - t0
    n_eval = max(1, len(data) // 8) if o.evaluate else 0
    held, train_data = data.take(slice(0, n_eval)), data.take(slice(n_eval, None))

    quality = {}
    if o.evaluate:
        with status(progress, "measuring the initial draft"):
            quality["initial"] = D.agreement(draft, held, o.temperature, o.batch_size)
    t1 = time.perf_counter()
    summary = D.train_draft(draft, train_data, cfg, o.temperature, device, progress=train_progress or NULL)
    seconds = time.perf_counter() - t1
    if o.evaluate:
        with status(progress, "measuring the draft"):
            quality["draft"] = D.agreement(draft, held, o.temperature, o.batch_size)

    curve = summary.pop("curve")
    counts = {
        "target": count_parameters(t.model),
        "draft": count_parameters(draft),
        "trained": sum(p.numel() for p in draft.parameters() if p.requires_grad),
    }
    data_info = {
        "spec": o.data or BUILTIN,
        "prompts": len(data),
        "held_out": n_eval,
        "prompt_len": data.prompt_len,
        "chat_template": chat,
        "prompt_style": style.value,
        "gen_tokens": o.gen_tokens,
        "train_tokens": train_data.tokens,
        "generate_s": round(gen_s, 2),
    }
    record = add_step(
        t.record,
        "distill",
        draft_for=model_identity(target),
        student={"from_target_layers": kept, "init": DraftInit(o.draft_init).value, "frozen": frozen},
        params={**_jsonable(o), "loss": "sparse_kl (forward KL, target top-k + rest)"},
        data=data_info,
        training={**summary, "this_run_s": round(seconds, 2)},
        parameters=counts,
        quality=quality or None,
    )
    with atomic_output_dir(output, force, inputs) as tmp:
        save_model(draft, t.tokenizer, tmp, record)
        _copy_side_files(target, tmp)
        (tmp / "distill_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
    return DraftResult(
        output=output,
        target_layers=int(t.model.config.num_hidden_layers),
        kept=kept,
        parameters=counts,
        data=data_info,
        quality=quality,
        seconds=seconds,
    )


def _eos_ids(loaded) -> list[int]:
    ids = set()
    for src in (loaded.model.config, getattr(loaded.model, "generation_config", None), loaded.tokenizer):
        e = getattr(src, "eos_token_id", None)
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    return sorted(ids)


def _copy_side_files(target: str, out: Path) -> None:
    """The target's generation config and chat template travel with the draft (same tokenizer)."""
    import shutil

    from ..modelio import resolve_spec

    src = Path(resolve_spec(target))
    if not src.is_dir():
        return
    for name in ("generation_config.json", "chat_template.jinja"):
        if (src / name).is_file() and not (out / name).exists():
            shutil.copyfile(src / name, out / name)


def _jsonable(o: DraftOptions) -> dict:
    import dataclasses
    import enum

    return {
        f.name: (getattr(o, f.name).value if isinstance(getattr(o, f.name), enum.Enum) else getattr(o, f.name))
        for f in dataclasses.fields(o)
    }
