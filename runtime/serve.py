"""`edgellm serve`: the runtime behind an OpenAI-compatible HTTP API (starlette on uvicorn).

    POST /v1/chat/completions   messages -> the model's chat template; stream: true -> SSE chunks
    POST /v1/completions        prompt text (or token ids)
    GET  /v1/models             the one model served
    GET  /health                liveness and queue depth (never needs the API key)

Requests run one at a time from a bounded FIFO queue (engine.py), or with `parallel` > 1 up to that
many decoded together in one batched step per token (slot_engine.py); the wire format is in
openai_schema.py. Needs the `edgellm[serve]` extra (uvicorn, starlette); never imports torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import socket
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from . import openai_schema as schema
from .constrain import ConstraintError
from .engine import Engine, Job, QueueFull, Result
from .errors import EdgeLLMError
from .generate import Generator
from .guided import Plan, plan
from .openai_schema import APIError, bad
from .tools import ToolParser
from .tools import template_messages as tools_messages

log = logging.getLogger("edgellm.serve")

MAX_BODY = 1 << 20  # bytes; a request body over this is answered 413
DRAIN_LIMIT = 16 << 20  # read (and drop) at most this much of an oversized body, so the client sees the 413


def create_app(
    gen: Generator,
    model_id: str,
    api_key: str | None = None,
    max_queue: int = 16,
    reuse_prefix: bool = True,
    max_body: int = MAX_BODY,
    log_prompts: bool = False,
    created: int | None = None,
    parallel: int = 1,
) -> Starlette:
    """The ASGI app serving `gen` as `model_id`. Its model worker starts now and stops at shutdown.
    `parallel`: requests decoded together (slots); 1 runs them one at a time."""
    if parallel != 1:
        from .slot_engine import SlotEngine

        engine = SlotEngine(gen, parallel, max_queue=max_queue, reuse_prefix=reuse_prefix)
    else:
        engine = Engine(gen, max_queue=max_queue, reuse_prefix=reuse_prefix)
    n_ctx = gen.model.n_ctx
    vocab = gen.model.config.vocab_size
    created = created or schema.now()

    def tokens(req: schema.Request, tools: list | None = None) -> list[int]:
        try:
            if req.kind == "chat":
                messages = req.messages if not req.tools else tools_messages(req.messages)
                text = gen.tokenizer.apply_chat_template(messages, tools, **(req.template_options or {}))
                return gen.tokenizer.encode(text, special=False)
            if isinstance(req.prompt, str):
                return gen.tokenizer.encode(req.prompt)
        except EdgeLLMError as exc:
            raise bad(str(exc), "messages" if req.kind == "chat" else "prompt") from None
        if min(req.prompt) < 0 or max(req.prompt) >= vocab:
            raise bad(f"'prompt' holds token ids outside [0, {vocab})", "prompt")
        return req.prompt

    def budget(req: schema.Request, n_prompt: int) -> int:
        """max_tokens, checked against the context (default: the rest of it)."""
        param = "messages" if req.kind == "chat" else "prompt"
        if req.max_tokens is None:
            if n_prompt >= n_ctx:
                raise bad(
                    f"the prompt has {n_prompt} tokens; the context holds {n_ctx}, leaving no room for a reply",
                    param,
                    "context_length_exceeded",
                )
            return n_ctx - n_prompt
        if n_prompt + req.max_tokens > n_ctx:
            raise bad(
                f"the prompt has {n_prompt} tokens and max_tokens is {req.max_tokens}: {n_prompt + req.max_tokens} "
                f"tokens exceed the context of {n_ctx} tokens (shorten the prompt or lower max_tokens)",
                "max_tokens",
                "context_length_exceeded",
            )
        return req.max_tokens

    async def complete(request: Request, kind: str):
        req = schema.parse(await read_json(request, max_body), kind, model_id)
        guide = plan(gen, req)  # structured output and tools (runtime/guided.py)
        req.sampling.grammar, req.sampling.keep_special = guide.grammar, guide.keep_special
        ids = tokens(req, guide.tools)
        if not ids:
            raise bad("the prompt encodes to no tokens", "messages" if kind == "chat" else "prompt")
        req.sampling.max_new_tokens = budget(req, len(ids))
        rid = schema.new_id(kind)
        note = f"prompt={json.dumps(req.messages if kind == 'chat' else req.prompt)}" if log_prompts else ""
        job = Job(
            rid,
            ids,
            req.sampling,
            asyncio.get_running_loop(),
            note=note,
            logprobs=req.logprobs,
            echo=req.echo and req.logprobs is not None,
        )
        try:
            engine.submit(job)
        except QueueFull as full:
            raise APIError(
                429,
                f"the server is busy: {full.waiting} requests are waiting (--max-queue {engine.max_queue}); "
                f"retry in {full.retry_after} s",
                None,
                "queue_full",
                {"Retry-After": str(full.retry_after)},
            ) from None
        except EdgeLLMError as exc:
            raise APIError(503, str(exc), None, "shutting_down") from None
        headers = {"x-request-id": rid}
        echoed = echo_text(req, ids)
        if req.stream:
            headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return StreamingResponse(sse(req, job, rid, echoed, guide), media_type="text/event-stream", headers=headers)
        return await whole(request, req, job, rid, headers, echoed, guide)

    def echo_text(req: schema.Request, ids: list[int]) -> str:
        """The prompt as the answer repeats it (completions with `echo`)."""
        if not req.echo:
            return ""
        return req.prompt if isinstance(req.prompt, str) else gen.tokenizer.decode(ids)

    def text_of(token: int) -> str:
        return gen.tokenizer.decode([token])

    def logprobs(req: schema.Request, entries: list, offset: int = 0) -> dict | None:
        if req.logprobs is None:
            return None
        if req.kind == "chat":
            return schema.chat_logprobs(entries, text_of)
        return schema.completion_logprobs(entries, text_of, offset)

    async def sse(req: schema.Request, job: Job, rid: str, echoed: str, guide: Plan):
        """Server-sent events: a role chunk (chat) or the echoed prompt (completions with echo),
        one chunk per text piece (with its tokens' logprobs when asked for), tool_calls deltas
        (a call's head once its name is known, then its arguments piece by piece), the final chunk, [DONE]."""
        finished = False
        parser = ToolParser(guide.fmt) if guide.fmt is not None else None
        n_calls = 0

        def events(kind_text: list):  # the parser's events -> SSE payloads
            nonlocal n_calls
            for kind, v in kind_text:
                if kind == "content":
                    yield schema.chunk(req, rid, created_at(job), text=v)
                else:
                    yield schema.chunk(req, rid, created_at(job), tool_calls=schema.tool_call_delta(kind, v))
                    n_calls += kind == "call"

        pending: list = []  # logprobs of the tokens behind the next piece
        offset = 0  # completions' text_offset: characters sent so far
        try:
            if req.kind == "chat":
                yield _event(schema.chunk(req, rid, created_at(job), first=True))
            elif echoed and not job.echo:  # echo without logprobs: the prompt's text, nothing to score
                yield _event(schema.chunk(req, rid, created_at(job), text=echoed))
                offset = len(echoed)
            while True:
                kind, value = await job.events.get()
                if kind == "done":
                    finished = True
                    break
                if kind == "logprobs":
                    pending.extend(value)
                    continue
                text = echoed if kind == "prompt" else value
                if parser is not None:
                    for payload in events(parser.feed(text)):
                        yield _event(payload)
                    continue
                lp = logprobs(req, value if kind == "prompt" else pending, offset)
                pending = []
                offset += len(text)
                yield _event(schema.chunk(req, rid, created_at(job), text=text, logprobs=lp))
            result: Result = value
            if parser is not None and result.error is None:
                for payload in events(parser.finish()):
                    yield _event(payload)
            if pending and result.error is None:  # tokens without text of their own (end of sequence)
                yield _event(schema.chunk(req, rid, created_at(job), text="", logprobs=logprobs(req, pending, offset)))
            if isinstance(result.error, ConstraintError):  # the grammar allowed no token: a 400 naming it
                yield _event(bad(f"'{guide.field}': {result.error}", guide.field, "grammar_dead_end").body())
            elif result.error is not None:
                yield _event(
                    APIError(
                        500,
                        f"generation failed: {type(result.error).__name__}: {result.error}",
                        None,
                        "generation_failed",
                    ).body()
                )
            else:
                use = schema.usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens)
                finish = schema.finish_reason(result.stop_reason, n_calls > 0)
                yield _event(schema.chunk(req, rid, created_at(job), finish=finish, use=use))
                if req.include_usage:
                    yield _event(schema.chunk(req, rid, created_at(job), use=use, usage_only=True))
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away mid-stream (starlette cancelled us): stop the generation
                engine.abandon(job)

    async def whole(request: Request, req: schema.Request, job: Job, rid: str, headers: dict, echoed: str, guide: Plan):
        """Collect the answer; a client that disconnects while waiting abandons its job."""

        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            engine.abandon(job)

        watcher = asyncio.create_task(watch())
        try:
            pieces, entries = [], []
            while True:
                kind, value = await job.events.get()
                if kind == "done":
                    break
                if kind in ("prompt", "logprobs"):
                    entries.extend(value)
                else:
                    pieces.append(value)
        finally:
            watcher.cancel()
        result: Result = value
        if isinstance(result.error, ConstraintError):  # the grammar allowed no token: a 400 naming it
            raise bad(f"'{guide.field}': {result.error}", guide.field, "grammar_dead_end")
        if result.error is not None:
            raise APIError(
                500, f"generation failed: {type(result.error).__name__}: {result.error}", None, "generation_failed"
            )
        use = schema.usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens)
        text, calls = echoed + "".join(pieces), None
        if guide.fmt is not None:  # tool calls parsed out of the answer (runtime/tools.py)
            text, calls = ToolParser.collect(guide.fmt, text)
            calls = calls or None
        body = schema.response(
            req,
            rid,
            created_at(job),
            text,
            schema.finish_reason(result.stop_reason, bool(calls)),
            use,
            logprobs(req, entries),
            calls,
        )
        return JSONResponse(body, headers=headers)

    async def chat(request: Request):
        return await complete(request, "chat")

    async def completions(request: Request):
        return await complete(request, "completion")

    async def models(request: Request):
        return JSONResponse(schema.models(model_id, created))

    async def model(request: Request):
        if request.path_params["name"] != model_id:
            raise APIError(
                404,
                f"model '{request.path_params['name']}' is not served here; this server serves '{model_id}'",
                "model",
                "model_not_found",
            )
        return JSONResponse(schema.model_card(model_id, created))

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": model_id, **engine.load()})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.close)

    routes = [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    handlers = {
        APIError: _api_error,
        HTTPException: _http_error,
        ClientDisconnect: _client_gone,
        Exception: _internal_error,
    }
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.engine = engine
    if api_key:
        app.add_middleware(_RequireKey, key=api_key)
    return app


def created_at(job: Job) -> int:
    return int(job.wall)


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def read_json(request: Request, limit: int):
    """The body as JSON: 413 over `limit` bytes, 400 when it does not parse."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > DRAIN_LIMIT:
        raise _too_large(int(declared), limit)
    buf, size = bytearray(), 0
    async for part in request.stream():
        size += len(part)
        if size <= limit:
            buf += part
        elif size > DRAIN_LIMIT:
            break
    if size > limit:
        raise _too_large(size, limit)
    try:
        return json.loads(buf)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"the request body is not valid JSON: {exc}", None, "invalid_json") from None


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the request body has {size} bytes or more; the limit is {limit}", None, "request_too_large")


def _error_response(request, exc: APIError) -> JSONResponse:
    log.info(f"{request.method} {request.url.path} {exc.status} {exc.code or ''}".rstrip())
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _api_error(request, exc: APIError):
    return _error_response(request, exc)


async def _http_error(request, exc: HTTPException):
    msg = {
        404: f"no route {request.method} {request.url.path}; see /v1/chat/completions, /v1/completions, /v1/models, "
        "/health",
        405: f"method {request.method} is not allowed on {request.url.path}",
    }.get(exc.status_code, str(exc.detail))
    return _error_response(
        request,
        APIError(
            exc.status_code,
            msg,
            None,
            {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code),
            dict(exc.headers or {}),
        ),
    )


async def _client_gone(request, exc):
    return JSONResponse(APIError(400, "the client disconnected").body(), status_code=400)


async def _internal_error(request, exc: Exception):
    log.error(f"{request.method} {request.url.path} 500 {type(exc).__name__}: {exc}")
    return JSONResponse(
        APIError(500, f"internal error: {type(exc).__name__}: {exc}", None, "internal_error").body(), status_code=500
    )


class _RequireKey:
    """Every route but /health needs `Authorization: Bearer KEY` (constant-time compare)."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, b"Bearer " + key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization")
            if given is None or not hmac.compare_digest(given, self.expected):
                msg = (
                    "no API key given; send the header 'Authorization: Bearer KEY'"
                    if given is None
                    else "the API key is wrong"
                )
                err = APIError(401, msg, None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
                log.info(f"{scope['method']} {scope['path']} 401 invalid_api_key")
                await JSONResponse(err.body(), status_code=401, headers=err.headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ----------------------------------------------------------------------------- process runner
def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: an ephemeral one; read it back with getsockname)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise EdgeLLMError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve_on(app, sock: socket.socket, log_config: dict | None = None):
    """Serve `app` on `sock` until SIGTERM or SIGINT; in-flight requests finish first, then it returns."""
    import uvicorn

    # uvicorn re-raises the signal it handled once it has shut down gracefully; with these no-op
    # handlers in place beforehand, that re-raise is a no-op and the process exits 0.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        config = uvicorn.Config(app, access_log=False, lifespan="on", log_config=log_config, timeout_keep_alive=5)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def model_name(path) -> str:
    """The id a client passes as `model`: the export directory's name."""
    return Path(path).resolve().name
