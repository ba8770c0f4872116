"""`edgellm serve`: an OpenAI-compatible HTTP server on the torch-free runtime."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Optional

import typer

from .run import Backend, DraftPMinOpt, KVCache


def serve(
    model: Annotated[Path, typer.Argument(help="Export directory written by 'edgellm export'.", show_default=False)],
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on; 0.0.0.0 exposes the server to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port; 0 picks a free one (printed at start).")] = 8000,
    api_key: Annotated[
        Optional[str],
        typer.Option("--api-key", help="Require 'Authorization: Bearer KEY' on every endpoint but /health."),
    ] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: all cores).")] = None,
    ctx: Annotated[
        Optional[int],
        typer.Option("--ctx", help="Context length: prompt + max_tokens per request (default: the model's maximum)."),
    ] = None,
    max_queue: Annotated[
        int,
        typer.Option(
            "--max-queue", help="Requests that may wait while one runs; more are answered 429 with Retry-After."
        ),
    ] = 16,
    backend: Annotated[
        Backend, typer.Option("--backend", help="numba (the edgellm runtime) or onnxruntime.")
    ] = Backend.numba,
    kv_cache: Annotated[
        KVCache, typer.Option("--kv-cache", help="KV cache precision (numba backend), as for 'edgellm run'.")
    ] = KVCache.auto,
    prefix_cache: Annotated[
        bool,
        typer.Option(
            "--prefix-cache/--no-prefix-cache",
            help="Reuse the KV cache of the prompt prefix a request shares with the previous one (a continuing chat "
            "prefills only its new tokens).",
        ),
    ] = True,
    parallel: Annotated[
        int,
        typer.Option(
            "--parallel",
            help="Requests decoded together, each in its own slot (KV cache): one batched step per token for all, "
            "new requests join between steps (numba backend). 1: one at a time.",
        ),
    ] = 1,
    log_prompts: Annotated[
        bool,
        typer.Option(
            "--log-prompts",
            help="Also log each request's prompt text (off: logs hold ids, token counts and timings only).",
        ),
    ] = False,
    lookup: Annotated[
        bool, typer.Option("--lookup", help="Speculative decoding by prompt lookup, as in 'edgellm run' (same output).")
    ] = False,
    draft: Annotated[
        Optional[Path],
        typer.Option(
            "--draft",
            help="Speculative decoding with a draft export, as for 'edgellm run' (same output; with --lookup: "
            "lookup first, the draft elsewhere).",
        ),
    ] = None,
    draft_max: Annotated[int, typer.Option("--draft-max", help="Most drafted tokens per verify pass (1-15).")] = 8,
    draft_p_min: DraftPMinOpt = 0.0,
):
    """Serve an exported model over an OpenAI-compatible HTTP API (needs the 'serve' extra).

    POST /v1/chat/completions (stream: true for server-sent events), POST /v1/completions, GET /v1/models, GET /health.

    Requests run one at a time, first come first served; with --parallel N up to N are decoded
    together (one batched step per token; prompts read in chunks between the running streams'
    tokens). Unset sampling fields take 'edgellm run' defaults (temperature 0.7, top_p 0.95,
    top_k 40); max_tokens defaults to the rest of the context.
    logprobs: chat logprobs + top_logprobs (up to 20), completions logprobs (up to 5) + echo.
    Structured output (constrained decoding, llguidance): response_format json_schema / json_object, and the
    extensions guided_json, guided_regex, guided_grammar (Lark or GBNF; llama.cpp's name 'grammar' too).
    Tools: tools, tool_choice (auto, none, required, a named function), parallel_tool_calls, through the
    model's chat template (Qwen2/3, Llama 3.x, SmolLM3, Mistral, Phi-4-mini, Granite formats).

    One log line per request on stderr. Ctrl-C or SIGTERM: running and queued requests finish, then it exits.

    Example: edgellm serve q4-onnx/ --port 8000, then the openai client with
    base_url="http://127.0.0.1:8000/v1", model="q4-onnx".
    """
    from ..console import console
    from ..errors import EdgeLLMError

    missing = [m for m in ("uvicorn", "starlette", "jinja2") if importlib.util.find_spec(m) is None]
    if missing:
        raise EdgeLLMError(
            f"'edgellm serve' needs {', '.join(missing)}, which is not installed; install it with: pip install "
            "'edgellm[serve]'"
        )
    if not 0 <= port <= 65535:
        raise EdgeLLMError(f"--port {port} is invalid; give 0 to 65535")
    if max_queue < 0:
        raise EdgeLLMError(f"--max-queue {max_queue} is invalid; give 0 or more")
    if threads is not None and threads < 1:
        raise EdgeLLMError(f"--threads {threads} is invalid; give at least 1")
    if ctx is not None and ctx < 2:
        raise EdgeLLMError(f"--ctx {ctx} is invalid; give at least 2")
    if api_key is not None and not api_key.strip():
        raise EdgeLLMError("--api-key is empty; give a key or leave the option out")
    if parallel < 1:
        raise EdgeLLMError(f"--parallel {parallel} is invalid; give 1 or more (requests decoded together)")
    if parallel > 1 and backend != Backend.numba:
        raise EdgeLLMError(f"--parallel {parallel} runs on the numba backend; give --backend numba or --parallel 1")

    from ..runtime import serve as server
    from ..runtime.generate import load
    from ..runtime.speculate import attach, check_options

    if lookup or draft is not None:
        check_options(lookup, draft, draft_max, backend.value, p_min=draft_p_min)
        if parallel > 1:  # the slot engine decodes its own batched steps, without a drafter
            raise EdgeLLMError("--lookup/--draft run with --parallel 1 (one request at a time); drop one of them")

    if parallel > 1:  # before loading: slots whose KV caches do not fit are refused at once
        from ..runtime.batched import check_parallel

        check_parallel(model, parallel, ctx, kv_cache.value)
    sock = server.bind(host, port)  # before loading: a taken port fails at once
    try:
        with console.status(f"loading {model} ({backend.value})"):
            gen = load(model, backend=backend.value, threads=threads, n_ctx=ctx, kv_cache=kv_cache.value)
            attach(gen, lookup=lookup, draft=draft, k_max=draft_max, p_min=draft_p_min)
        name = server.model_name(model)
        app = server.create_app(
            gen,
            name,
            api_key=api_key,
            max_queue=max_queue,
            reuse_prefix=prefix_cache,
            log_prompts=log_prompts,
            parallel=parallel,
            created=int(Path(model).stat().st_mtime),
        )
        addr = sock.getsockname()
        url_host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
        console.print(
            f"serving [bold]{name}[/] ({backend.value}, ctx {gen.model.n_ctx}, "
            f"{f'{parallel} slots, ' if parallel > 1 else ''}queue {max_queue}"
            f"{', API key required' if api_key else ''}) on http://{url_host}:{addr[1]}/v1",
            highlight=False,
            soft_wrap=True,
        )
        if not (api_key or host == "localhost" or host == "::1" or host.startswith("127.")):
            console.print(
                f"[yellow]warning:[/] listening on {host} without --api-key: anyone who can reach this port can use "
                "the model",
                highlight=False,
                soft_wrap=True,
            )
        server.serve_on(app, sock, log_config=_log_config())
    finally:
        sock.close()
    console.print(f"stopped after {app.state.engine.served} requests", highlight=False)


def _log_config() -> dict:
    """uvicorn's messages and the per-request lines of edgellm.serve, timestamped on stderr."""
    fmt = {"format": "%(asctime)s %(levelname)s %(message)s", "datefmt": "%Y-%m-%dT%H:%M:%S"}
    handler = {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": fmt},
        "handlers": {"stderr": handler},
        "loggers": {
            name: {"handlers": ["stderr"], "level": "INFO", "propagate": False} for name in ("uvicorn", "edgellm.serve")
        },
    }
