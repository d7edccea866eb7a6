"""`pagedllm router`: one OpenAI endpoint in front of prefill and decode instances.

Each completion or chat request goes first to a prefill instance (a server started
with `--kv-transfer-config '{"kv_role": "kv_producer", ...}'`) with `max_tokens` 1,
which computes the prompt's KV and answers with `kv_transfer_params` (its KV server's
address); then, with those params added, to a decode instance (`kv_consumer`), which
pulls the prompt's blocks instead of computing them and answers the client, streamed
or whole, through the router. Instances are taken in turn. A prefill instance that
fails or cannot be reached only costs the decode instance the prompt's computation;
a decode instance's answer, errors included, is passed on as it is.

    pagedllm router --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pagedllm.entrypoints.cli_args import HelpFormatter
from pagedllm.entrypoints.openai.errors import APIError
from pagedllm.entrypoints.proxy import forwarded_headers, relay

logger = logging.getLogger("pagedllm.router")


def _prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The request as the prefill instance runs it: one token, whole, one choice."""
    prefill = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    prefill.update(max_tokens=1, stream=False, n=1)
    if "max_completion_tokens" in prefill:
        prefill["max_completion_tokens"] = 1
    prefill.pop("use_beam_search", None)
    return prefill


def build_router_app(prefill_urls: Sequence[str], decode_urls: Sequence[str]) -> FastAPI:
    """The router's ASGI app over the given instances' base URLs."""
    if not prefill_urls or not decode_urls:
        raise ValueError("the router needs at least one prefill and one decode instance")
    prefills = itertools.cycle([u.rstrip("/") for u in prefill_urls])
    decodes = itertools.cycle([u.rstrip("/") for u in decode_urls])
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = FastAPI(title="pagedllm router", lifespan=lifespan)

    async def prefill(path: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
        """The prefill instance's kv_transfer_params, or None if it could not give them."""
        url = next(prefills) + path
        try:
            answer = await client.post(url, json=_prefill_body(body), headers=headers)
        except httpx.HTTPError as e:
            logger.warning("prefill instance %s unreachable (%s): decoding from scratch", url, e)
            return None
        if answer.status_code != 200:
            logger.warning("prefill instance %s answered %d", url, answer.status_code)
            return None
        try:
            params = answer.json().get("kv_transfer_params")
        except (ValueError, AttributeError):
            logger.warning("prefill instance %s answered something other than JSON", url)
            return None
        return params if isinstance(params, dict) else None

    async def route(request: Request, path: str) -> Response:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return APIError(400, f"the body is not valid JSON: {e}").response()
        if not isinstance(body, dict):
            return APIError(400, "the body must be a JSON object").response()
        # where the KV comes from is the router's to say, never the client's
        body = {k: v for k, v in body.items() if k != "kv_transfer_params"}
        headers = forwarded_headers(request)
        params = await prefill(path, body, headers)
        if params is not None:
            body = {**body, "kv_transfer_params": params}
        url = next(decodes) + path
        try:
            answer = await client.send(
                client.build_request("POST", url, json=body, headers=headers), stream=True
            )
        except httpx.HTTPError as e:
            return APIError(502, f"decode instance {url} unreachable: {e}").response()
        return await relay(answer, f"decode instance {url}")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await route(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await route(request, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        headers = forwarded_headers(request)
        url = next(decodes) + "/v1/models"
        try:
            answer = await client.get(url, headers=headers)
        except httpx.HTTPError as e:
            return APIError(502, f"decode instance {url} unreachable: {e}").response()
        return Response(answer.content, answer.status_code, media_type="application/json")

    @app.get("/health")
    async def health() -> Response:
        """200 when every instance answers its /health with 200."""
        down = []
        for url in {*prefill_urls, *decode_urls}:
            try:
                ok = (await client.get(url.rstrip("/") + "/health")).status_code == 200
            except httpx.HTTPError:
                ok = False
            if not ok:
                down.append(url)
        if down:
            return JSONResponse({"unhealthy": sorted(down)}, status_code=503)
        return Response(status_code=200)

    return app


def register(sub: argparse._SubParsersAction) -> None:
    """Add `router` to the `pagedllm` command."""
    parser = sub.add_parser(
        "router",
        help="one OpenAI endpoint over prefill and decode instances (disaggregated serving)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--prefill",
        nargs="+",
        required=True,
        metavar="URL",
        help="base URLs of prefill instances (kv_producer)",
    )
    parser.add_argument(
        "--decode",
        nargs="+",
        required=True,
        metavar="URL",
        help="base URLs of decode instances (kv_consumer)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = build_router_app(args.prefill, args.decode)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
