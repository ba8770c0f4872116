"""`edgellm run`: stream tokens from an exported model on the torch-free runtime."""

from __future__ import annotations

import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated, List, Optional

import typer

# `run` and `serve` take it alike (serve imports it)
DraftPMinOpt = Annotated[
    float,
    typer.Option(
        "--draft-p-min",
        help="The draft stops proposing at a token its own probability puts below this (0: never). Helps a "
        "weak draft: a rejected draft costs a verify pass more than a plain step.",
    ),
]


class Backend(str, Enum):
    numba = "numba"
    onnxruntime = "onnxruntime"


class Kernels(str, Enum):
    auto = "auto"
    avx512_vnni = "avx512-vnni"
    avx_vnni = "avx-vnni"
    avx2 = "avx2"
    neon_dotprod = "neon-dotprod"
    neon = "neon"
    generic = "generic"


class KVCache(str, Enum):
    auto = "auto"
    fp16 = "fp16"
    fp32 = "fp32"


def run(
    model: Annotated[Path, typer.Argument(help="Export directory written by 'edgellm export'.", show_default=False)],
    prompt: Annotated[
        Optional[str], typer.Option("--prompt", "-p", help="Prompt text (with --chat: the first message).")
    ] = None,
    chat: Annotated[
        bool,
        typer.Option(
            "--chat",
            help="Interactive chat with the model's chat template; the conversation stays in the KV cache. One "
            "message per line; end with Ctrl-D.",
        ),
    ] = False,
    no_think: Annotated[
        bool,
        typer.Option(
            "--no-think",
            help="With --chat: ask a thinking model (Qwen3, SmolLM3) to answer without reasoning first (its chat "
            "template's enable_thinking=False). Without it, the reply shows the model's <think> block.",
        ),
    ] = False,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate per reply.")
    ] = 128,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="Sampling temperature; 0 = greedy.")] = 0.7,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample from the k most likely tokens; 0 = off.")] = 40,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass; 1 = off.")] = 0.95,
    repetition_penalty: Annotated[
        float, typer.Option("--repetition-penalty", help="> 1 discourages repeating tokens already in the context.")
    ] = 1.0,
    seed: Annotated[
        Optional[int], typer.Option("--seed", help="Random seed: the same seed gives the same text.")
    ] = None,
    stop: Annotated[
        Optional[List[str]], typer.Option("--stop", help="Stop when this string appears (repeatable).")
    ] = None,
    ignore_eos: Annotated[
        bool,
        typer.Option(
            "--ignore-eos",
            help="Do not stop at end-of-sequence tokens: generate exactly --max-new-tokens (or until --stop or the "
            "context is full).",
        ),
    ] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: all cores).")] = None,
    backend: Annotated[
        Backend,
        typer.Option(
            "--backend", help="numba (the edgellm runtime) or onnxruntime (same interface over ONNX Runtime)."
        ),
    ] = Backend.numba,
    ctx: Annotated[Optional[int], typer.Option("--ctx", help="Context length (default: the model's maximum).")] = None,
    kv_cache: Annotated[
        KVCache,
        typer.Option(
            "--kv-cache",
            help="KV cache precision (numba backend): auto = fp16 for quantized exports (half the memory), fp32 for "
            "float ones.",
        ),
    ] = KVCache.auto,
    kernels: Annotated[
        Kernels,
        typer.Option(
            "--kernels",
            help="Kernel tier (numba backend): auto = the best the CPU has; a lower one for comparisons. One the CPU "
            "lacks is an error.",
        ),
    ] = Kernels.auto,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Say which backend, kernel tier, KV cache and threads run.")
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="First check every file against the sha256 recorded at export (reads the whole model once).",
        ),
    ] = False,
    json_schema: Annotated[
        Optional[Path],
        typer.Option(
            "--json-schema",
            help="Constrain the output to JSON valid against this JSON Schema file (constrained decoding; needs the "
            "'chat' or 'serve' extra).",
        ),
    ] = None,
    grammar: Annotated[
        Optional[Path],
        typer.Option("--grammar", help="Constrain the output to this Lark or GBNF grammar file (as --json-schema)."),
    ] = None,
    device: Annotated[
        str,
        typer.Option(
            "--device",
            help="cpu (numba CPU kernels) or cuda (an NVIDIA GPU through numba's CUDA target, from the same export; "
            "fp16 compute, fp16 KV cache).",
        ),
    ] = "cpu",
    lookup: Annotated[
        bool,
        typer.Option(
            "--lookup",
            help="Speculative decoding by prompt lookup: draft the tokens that followed the context's last words "
            "earlier in the context, verify them in one pass. Same output; faster where the reply copies from the "
            "prompt (edits, summaries, answers from a document); switches itself off where it does not pay.",
        ),
    ] = False,
    draft: Annotated[
        Optional[Path],
        typer.Option(
            "--draft",
            help="Speculative decoding with a draft model: a smaller export with the same tokenizer (edgellm "
            "distill --draft-for) proposes tokens, this model verifies them in one pass. Same output. With --lookup: "
            "prompt lookup where the context has a copy to follow, the draft elsewhere.",
        ),
    ] = None,
    draft_max: Annotated[
        int, typer.Option("--draft-max", help="Most drafted tokens per verify pass (1-15; adapts below it).")
    ] = 8,
    draft_p_min: DraftPMinOpt = 0.0,
):
    """Stream tokens from an exported model on the torch-free runtime.

    Example: edgellm run q4-onnx/ -p "The capital of France is" --temperature 0
    """
    from ..console import console
    from ..errors import EdgeLLMError
    from ..runtime.generate import Sampling, load

    if threads is not None and threads < 1:
        raise EdgeLLMError(f"--threads {threads} is invalid; give at least 1")
    if ctx is not None and ctx < 2:
        raise EdgeLLMError(f"--ctx {ctx} is invalid; give at least 2")
    if max_new_tokens < 1:
        raise EdgeLLMError(f"--max-new-tokens {max_new_tokens} is invalid; give at least 1")
    if any(not s for s in stop or ()):
        raise EdgeLLMError("--stop '' is invalid; give a non-empty stop string")
    if not chat and (prompt is None or not prompt.strip()):
        raise EdgeLLMError("the prompt is empty; give some text with -p (or use --chat)")
    params = Sampling(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        max_new_tokens=max_new_tokens,
        stop=tuple(stop or ()),
        ignore_eos=ignore_eos,
    )
    params.check()
    if json_schema is not None and grammar is not None:
        raise EdgeLLMError("give --json-schema or --grammar, not both")
    if no_think and not chat:
        raise EdgeLLMError("--no-think applies to the chat template: add --chat")
    constraint = _constraint_spec(json_schema, grammar)  # read and parsed before the load
    speculate = lookup or draft is not None
    if speculate:
        from ..runtime.speculate import check_options

        check_options(lookup, draft, draft_max, backend.value, device, draft_p_min)
    if chat:
        from .._deps import require

        require("jinja2", "--chat (the model's chat template)")  # before the load, not after it
    with (
        console.status(f"loading {model} ({backend.value}{', ' + device if device != 'cpu' else ''})"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", RuntimeWarning)  # a tier's self-check fallback: printed as one line below
        gen = load(
            model,
            backend=backend.value,
            threads=threads,
            n_ctx=ctx,
            kv_cache=kv_cache.value,
            kernels=kernels.value,
            verify=verify,
            device=device,
        )
    if speculate:
        from ..runtime.speculate import attach

        with console.status(f"loading the draft {draft}" if draft else "prompt lookup"):
            attach(gen, lookup=lookup, draft=draft, k_max=draft_max, p_min=draft_p_min)
    if gen.model.kernel_warning:  # every backend states it (runtime/backend.py Backend)
        console.print(f"[yellow]warning:[/] {gen.model.kernel_warning}", highlight=False)
    if verbose:
        m = gen.model
        console.print(
            f"[dim]{backend.value}: kernels {m.kernels}, KV cache {m.kv_cache}, threads {m.threads or threads}"
            + (f", weights on {m.weight_pages}" if hasattr(m, "weight_pages") else "")
            + "[/]",
            highlight=False,
        )

    if constraint is not None:
        from ..runtime.constrain import compile_grammar

        kind, spec, where = constraint
        try:
            params.grammar = compile_grammar(gen.tokenizer, gen.model.config.vocab_size, gen.eos_ids, kind, spec)
        except EdgeLLMError as exc:
            raise EdgeLLMError(f"{where}: {exc}") from None

    def emit(pieces):
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        st = gen.stats
        spec = f" | {st.spec.line()}" if verbose and st.spec is not None else ""
        console.print(f"[dim]{st.line()}{spec}[/]", highlight=False)

    if not chat:
        emit(gen.stream(prompt, params))
        return
    if no_think:
        gen.template_options["enable_thinking"] = False
    gen.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])  # fail early without a template
    if prompt:
        emit(gen.chat(prompt, params))
    for line in sys.stdin:
        if line.strip():
            emit(gen.chat(line.rstrip("\n"), params))


def _constraint_spec(json_schema: Path | None, grammar: Path | None):
    """(grammar kind, spec, what to name in errors) from --json-schema / --grammar, or None."""
    import json

    from .._deps import require
    from ..errors import EdgeLLMError

    path = json_schema or grammar
    if path is None:
        return None
    require("llguidance", "--json-schema / --grammar (constrained decoding)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgeLLMError(f"cannot read '{path}': {getattr(exc, 'strerror', None) or exc}") from None
    if grammar is not None:
        return "grammar", text, f"--grammar '{path}'"
    try:
        schema = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise EdgeLLMError(f"--json-schema '{path}' is not valid JSON: {exc}") from None
    if not isinstance(schema, (dict, bool)):
        raise EdgeLLMError(f"--json-schema '{path}' holds a JSON {type(schema).__name__}; expected a schema object")
    return "json_schema", schema, f"--json-schema '{path}'"
