"""The OpenAI-compatible HTTP server: `build_app` wires the routes, `run_server` serves them.

Routes: `/v1/models`, `/v1/completions`, `/v1/chat/completions`, `/tokenize`,
`/detokenize` (behind the API key when one is set), and `/health`, `/version`,
`/metrics` and the web page at `/` (always open).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import json.scanner
import logging
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import pagedllm
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.entrypoints.openai.drain import Drain, DrainMiddleware
from pagedllm.entrypoints.openai.errors import (
    APIError,
    GuardMiddleware,
    bad_request,
    host_name,
    install_error_handlers,
    validation_error,
)
from pagedllm.entrypoints.openai.openapi import (
    SSE_OR_JSON,
    anthropic_error_responses,
    describe_bodies,
    error_responses,
)
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    CountTokensRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    MessagesRequest,
    ResponsesRequest,
    TokenizeRequest,
)
from pagedllm.entrypoints.openai.serving_chat import ChatServing
from pagedllm.entrypoints.openai.serving_completion import CompletionServing
from pagedllm.entrypoints.openai.serving_embedding import EmbeddingServing
from pagedllm.entrypoints.openai.serving_messages import MessagesServing
from pagedllm.entrypoints.openai.serving_responses import ResponsesServing
from pagedllm.entrypoints.serve import DEFAULT_MAX_BODY_BYTES
from pagedllm.metrics import PrometheusMetrics, StatsLine

logger = logging.getLogger(__name__)

WEBUI_DIR = Path(__file__).resolve().parent.parent / "webui"
# The chat page loads only its own script and style and talks only to this server;
# no other page may frame it.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
_NOSNIFF = (b"x-content-type-options", b"nosniff")

Body = TypeVar("Body", bound=BaseModel)


# Bodies up to this size are validated on the event loop (well under a millisecond).
_INLINE_BODY_BYTES = 65_536
# Bodies with up to this many JSON values (counted by commas and brackets) go to
# pydantic's Rust parser, which holds the GIL for about 10 ms at this count.
_FAST_PARSE_VALUES = 100_000


async def parse(request: Request, model: type[Body]) -> Body:
    """Read the body (size-limited by the guard) and validate it; errors become 400s.

    A big body is parsed in a worker thread. One made of very many small values
    (a million-item list) is decoded by the pure-Python JSON decoder, which lets
    other threads run between values: the C and Rust parsers hold the GIL for their
    whole run (half a second and more on 4 MB of tiny arrays), and `/health` would
    wait that long. The decoded data is then validated by pydantic, which refuses
    an over-long list from its length before reading its items.
    """
    body = await request.body()

    def validate_json() -> Body:
        try:
            return model.model_validate_json(body)
        except ValidationError as e:
            raise validation_error(e) from None

    if len(body) <= _INLINE_BODY_BYTES:
        return validate_json()
    values = body.count(b",") + body.count(b"[") + body.count(b"{")
    if values <= _FAST_PARSE_VALUES:
        return await asyncio.to_thread(validate_json)

    def decode_and_validate() -> Body:
        try:
            data = _GIL_FRIENDLY_JSON.decode(body.decode("utf-8"))
            _refuse_lone_surrogates(data)
        except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, NaN, deep nesting
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None

    return await asyncio.to_thread(decode_and_validate)


def _refuse_lone_surrogates(data: object) -> None:
    """Raise UnicodeEncodeError for a string holding half a surrogate pair (`"\\ud800"`).

    Python's decoder accepts them and pydantic's refuses them; such text could never be
    sent back as UTF-8. A loop, not recursion, and Python-level, so the GIL is shared.
    """
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            value.encode("utf-8")
        elif isinstance(value, dict):
            stack.extend(value)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


_GIL_FRIENDLY_JSON = json.JSONDecoder(parse_constant=_reject_constant)
_GIL_FRIENDLY_JSON.scan_once = json.scanner.py_make_scanner(_GIL_FRIENDLY_JSON)  # type: ignore[attr-defined]


def install_guards(
    app: FastAPI,
    max_body_bytes: int,
    api_key: str | None,
    allowed_origins: Sequence[str],
    allowed_hosts: Collection[str] | None,
    drain: Drain | None,
) -> None:
    """OpenAI-shaped errors, and the checks every request passes before its route: the
    guard (Host, body size, type, API key), CORS when origins are allowed, the drain."""
    install_error_handlers(app)
    app.add_middleware(
        GuardMiddleware,
        max_body_bytes=max_body_bytes,
        api_key=api_key,
        allowed_hosts=allowed_hosts,
    )
    if allowed_origins:  # outside the guard, so a browser's preflight needs no key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(allowed_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )
    if drain is not None:  # outermost: a draining server refuses before anything else
        app.add_middleware(DrainMiddleware, drain=drain)


def build_app(
    llm: AsyncLLM,
    served_model_names: Sequence[str],
    api_key: str | None = None,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    allowed_origins: Sequence[str] = (),
    allowed_hosts: Collection[str] | None = None,
    webui_dir: Path = WEBUI_DIR,
    drain: Drain | None = None,
    tool_call_parser: str = "hermes",
) -> FastAPI:
    """A FastAPI app serving `llm` under the given model names (the first is the default).

    With `drain`, requests are counted and refused with 503 once it starts draining.
    `allowed_hosts` (names without ports) are the Host headers answered; None: any.
    """
    if not served_model_names:
        raise ValueError("served_model_names must name at least one model")
    app = FastAPI(title="pagedllm", version=pagedllm.__version__, docs_url=None, redoc_url=None)
    install_guards(app, max_body_bytes, api_key, allowed_origins, allowed_hosts, drain)
    registry = CollectorRegistry()
    llm.add_stat_logger(PrometheusMetrics(registry, served_model_names[0]))
    completions = CompletionServing(llm, served_model_names)
    chat = ChatServing(llm, served_model_names, tool_call_parser=tool_call_parser)
    messages = MessagesServing(llm, served_model_names)
    responses = ResponsesServing(llm, served_model_names, tool_call_parser=tool_call_parser)
    embeddings = EmbeddingServing(llm, served_model_names)
    app.state.llm = llm
    app.state.registry = registry

    # Every guarded route can answer 401 (key) and 413 (body size) before it runs.
    model_errors = error_responses(400, 401, 404, 413)
    # 200 is JSON, or server-sent events when the body asks for `stream`
    generation_errors = {**error_responses(400, 401, 404, 413, 503), **SSE_OR_JSON}

    @app.get("/health", response_class=Response, responses=error_responses(503))
    async def health() -> Response:
        if not llm.is_running:
            raise APIError(503, f"the engine has stopped: {llm.dead_error}")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": pagedllm.__version__})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=error_responses(401))
    async def models() -> JSONResponse:
        data = [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "pagedllm",
                "root": llm.engine.model_path.name,  # never the path on this machine
                "max_model_len": llm.max_model_len,
            }
            for name in served_model_names
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/completions", responses=generation_errors)
    async def create_completion(request: Request) -> Response:
        return await completions.create(await parse(request, CompletionRequest), request)

    @app.post("/v1/chat/completions", responses=generation_errors)
    async def create_chat_completion(request: Request) -> Response:
        return await chat.create(await parse(request, ChatCompletionRequest), request)

    @app.post("/v1/responses", responses=generation_errors)
    async def create_response(request: Request) -> Response:
        return await responses.create_response(await parse(request, ResponsesRequest), request)

    @app.get("/v1/responses/{response_id}", responses=error_responses(401, 404))
    async def retrieve_response(response_id: str) -> JSONResponse:
        return responses.retrieve(response_id)

    @app.post(
        "/v1/messages",
        responses={**anthropic_error_responses(400, 401, 404, 413, 503), **SSE_OR_JSON},
    )
    async def create_message(request: Request) -> Response:
        return await messages.create_message(await parse(request, MessagesRequest), request)

    @app.post("/v1/messages/count_tokens", responses=anthropic_error_responses(400, 401, 404, 413))
    async def count_message_tokens(request: Request) -> JSONResponse:
        return await messages.count_tokens(await parse(request, CountTokensRequest))

    @app.post("/v1/embeddings", responses=error_responses(400, 401, 404, 413, 503))
    async def create_embedding(request: Request) -> Response:
        return await embeddings.create(await parse(request, EmbeddingRequest), request)

    @app.post("/tokenize", responses=model_errors)
    async def tokenize(request: Request) -> JSONResponse:
        body = await parse(request, TokenizeRequest)
        chat.check_model(body.model)
        try:
            if body.messages is not None:
                ids = await chat.render(
                    ChatCompletionRequest(
                        messages=body.messages, add_generation_prompt=body.add_generation_prompt
                    )
                )
            elif body.prompt is not None:
                text, special = body.prompt, body.add_special_tokens
                ids = await chat.off_loop(lambda: llm.tokenizer.encode(text, special), len(text))
            else:
                raise ValueError("prompt or messages is required")
        except ValueError as e:
            raise bad_request(e, ("prompt", "messages")) from e
        return JSONResponse({"count": len(ids), "max_model_len": llm.max_model_len, "tokens": ids})

    @app.post("/detokenize", responses=model_errors)
    async def detokenize(request: Request) -> JSONResponse:
        body = await parse(request, DetokenizeRequest)
        chat.check_model(body.model)
        vocab = llm.engine.model_config.vocab_size
        tokens = body.tokens

        def decode() -> str:
            bad = next((t for t in tokens if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(400, f"tokens must be in [0, {vocab}), got {bad}", param="tokens")
            return llm.tokenizer.decode(tokens)

        return JSONResponse({"prompt": await chat.off_loop(decode, len(tokens))})

    @app.get("/", response_class=HTMLResponse, responses=error_responses(404))
    async def index() -> Response:
        page = webui_dir / "index.html"
        if not page.is_file():
            raise APIError(404, "no web page is installed")
        return FileResponse(page, headers=PAGE_HEADERS)

    describe_bodies(
        app,
        {
            "/v1/completions": CompletionRequest,
            "/v1/chat/completions": ChatCompletionRequest,
            "/v1/messages": MessagesRequest,
            "/v1/responses": ResponsesRequest,
            "/v1/messages/count_tokens": CountTokensRequest,
            "/v1/embeddings": EmbeddingRequest,
            "/tokenize": TokenizeRequest,
            "/detokenize": DetokenizeRequest,
        },
    )
    if (webui_dir / "static").is_dir():
        app.mount("/static", StaticFiles(directory=webui_dir / "static"), name="static")
    app.add_middleware(NoSniffMiddleware)
    # Everything loaded so far (model, tokenizer, libraries) lives as long as the server:
    # keep it out of the garbage collector's full passes, which otherwise walk it all
    # (100+ ms holding the GIL) while a big request's JSON is being decoded.
    gc.freeze()
    return app


class NoSniffMiddleware:
    """`X-Content-Type-Options: nosniff` on every response, so JSON is never run as script."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), _NOSNIFF]
            await send(message)

        await self.app(scope, receive, send_with_header)


def allowed_hosts_for(host: str, extra: Sequence[str] | None) -> set[str] | None:
    """The Host names a server bound to `host` answers to; None: any (`*` or a wildcard bind).

    A loopback server answers only to loopback names, so a web page whose own name
    resolves to 127.0.0.1 (DNS rebinding) cannot read its answers.
    """
    extra = list(extra or ())
    if "*" in extra or (host in ("0.0.0.0", "::", "") and not extra):
        return None
    names = {"localhost", "127.0.0.1", "[::1]", host_name(host), *map(host_name, extra)}
    if ":" in host and not host.startswith("["):
        names.add(f"[{host.lower()}]")  # an IPv6 address as a Host header writes it
    return names


def served_name(model: str | None, model_path: Path) -> str:
    """The default model name: the argument as given, else the default file's stem."""
    return model if model else model_path.stem


def run_server(args: argparse.Namespace) -> int:
    """`pagedllm serve`: load the engine, then serve until interrupted."""
    import uvicorn

    from pagedllm.entrypoints.cli_args import engine_args_from
    from pagedllm.entrypoints.openai.drain import DrainingServer

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(levelname)s %(asctime)s %(name)s: %(message)s",
    )
    stat_loggers = [StatsLine(args.log_stats_interval)] if args.log_stats_interval > 0 else []
    llm = AsyncLLM.from_engine_args(engine_args_from(args), stat_loggers)
    names = args.served_model_name or [served_name(args.model, llm.engine.model_path)]
    drain = Drain()
    app = build_app(
        llm,
        names,
        api_key=args.api_key,
        max_body_bytes=args.max_request_body_bytes,
        allowed_origins=args.allowed_origins or (),
        allowed_hosts=allowed_hosts_for(args.host, args.allowed_hosts),
        drain=drain,
        tool_call_parser=args.tool_call_parser,
    )
    logger.info("serving %s on http://%s:%d", ", ".join(names), args.host, args.port)
    # SIGTERM or Ctrl-C drains (see drain.py): at the drain timeout the engine stops,
    # so the streams still open end with an error event within a few seconds.
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=5,
    )
    server = DrainingServer(
        config, drain, args.drain_timeout, on_timeout=lambda: llm.shutdown(timeout=0)
    )
    try:
        server.run()
    finally:
        llm.shutdown()
    return 0
