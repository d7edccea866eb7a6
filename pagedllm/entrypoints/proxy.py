"""Passing a request on to another pagedllm server and its answer back, for the fronts
that stand before several servers (`pagedllm router`, `serve --data-parallel-size`).

An answer in server-sent events is relayed chunk by chunk as it comes; any other is
read whole and passed on with its status and headers. A server that fails in the
middle of an answer ends it with a 502 in OpenAI's error shape (an error event when
the stream had begun), never with a hang or a half answer that looks complete.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from pagedllm.entrypoints.openai.errors import APIError

# request headers passed on to the servers behind (the API key among them)
_FORWARDED = ("authorization", "content-type", "x-request-id", "x-api-key", "anthropic-version")
# answer headers that belong to one connection, not to the answer
_HOP_BY_HOP = frozenset(
    ("connection", "content-length", "transfer-encoding", "content-encoding", "date", "server")
)


def forwarded_headers(request: Request) -> dict[str, str]:
    """The client's headers the servers behind are given too."""
    return {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED}


def _answer_headers(answer: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_BY_HOP}


def error_event(error: APIError, anthropic: bool = False) -> bytes:
    """An error as the last event of a stream that had already begun."""
    data = json.dumps(error.body(anthropic=anthropic))
    return (f"event: error\ndata: {data}\n\n" if anthropic else f"data: {data}\n\n").encode()


class _RelayedStream(StreamingResponse):
    """Relays an upstream event stream; `on_close` runs and the upstream answer is closed
    however the response ends, even when the client left before the first chunk."""

    def __init__(
        self, answer: httpx.Response, on_close: Callable[[], None], what: str, anthropic: bool
    ) -> None:
        super().__init__(self._chunks(), answer.status_code, headers=_answer_headers(answer))
        self.answer, self.on_close, self.what, self.anthropic = answer, on_close, what, anthropic

    async def _chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.answer.aiter_raw():
                yield chunk
        except httpx.HTTPError as e:
            yield error_event(
                APIError(502, f"{self.what} failed mid-answer: {e!r}"), self.anthropic
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.answer.aclose()
            self.on_close()


async def relay(
    answer: httpx.Response,
    what: str,
    on_close: Callable[[], None] = lambda: None,
    anthropic: bool = False,
) -> Response:
    """The answer of `client.send(..., stream=True)` as the front's own response.

    `what` names the server in errors; `on_close` runs once the answer is done with.
    """
    if answer.headers.get("content-type", "").startswith("text/event-stream"):
        return _RelayedStream(answer, on_close, what, anthropic)
    try:
        content = await answer.aread()
    except httpx.HTTPError as e:
        error = APIError(502, f"{what} failed mid-answer: {e!r}")
        return error.response(anthropic=anthropic)
    finally:
        await answer.aclose()
        on_close()
    return Response(content, answer.status_code, headers=_answer_headers(answer))
