"""Errors in OpenAI's shape, and the guards that run before a request reaches a route.

Every failure the server reports, from a bad field to an unknown route, is a JSON
body `{"error": {"message", "type", "param", "code"}}` with the HTTP status
OpenAI uses. The guard middleware refuses, before any routing or parsing: a `Host` the
server does not answer to (403, against DNS rebinding), an oversized body (413),
a POST that is not JSON (415: a web page can send `text/plain` to 127.0.0.1 with
no CORS preflight, JSON needs one) and a request without the API key (401).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Collection
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedllm.core.scheduler import QueueFullError
from pagedllm.engine.async_llm import EngineDeadError, RequestFailedError
from pagedllm.worker.executor import WorkerDiedError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    500: "internal_server_error",
    502: "bad_gateway_error",  # a data-parallel replica or disaggregated instance failed
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error to send back: HTTP status, message, and the parameter it concerns."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        err_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = err_type or _TYPES.get(status, "invalid_request_error")

    def body(self, anthropic: bool = False) -> dict[str, Any]:
        """OpenAI's error object, or Anthropic's (for its Messages API's routes)."""
        if anthropic:
            kind = _ANTHROPIC_TYPES.get(self.status)
            if kind is None:
                kind = "api_error" if self.status >= 500 else "invalid_request_error"
            return {"type": "error", "error": {"type": kind, "message": self.message}}
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(
        self, headers: dict[str, str] | None = None, anthropic: bool = False
    ) -> JSONResponse:
        headers = {**(self.headers or {}), **(headers or {})}
        return JSONResponse(self.body(anthropic), status_code=self.status, headers=headers or None)


# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors)
_ANTHROPIC_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_route(path: str) -> bool:
    """Whether `path` is Anthropic's Messages API, whose errors take Anthropic's shape."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def bad_request(error: ValueError, params: tuple[str, ...] = ()) -> APIError:
    """A 400 from a ValueError whose message begins with the field it names."""
    message = str(error)
    first = message.split(" ", 1)[0].rstrip(":.")
    return APIError(400, message, param=first if first in params else None)


def from_exception(error: BaseException, params: tuple[str, ...] = ()) -> APIError:
    """The APIError for an exception raised while serving a request."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, QueueFullError):
        return APIError(503, str(error), code="queue_full", headers={"Retry-After": "1"})
    if isinstance(error, ValueError):
        return bad_request(error, params)
    if isinstance(error, EngineDeadError | RequestFailedError):
        return APIError(500 if isinstance(error, RequestFailedError) else 503, str(error))
    if isinstance(error, WorkerDiedError):  # the engine stopped with it
        return APIError(503, f"the engine has stopped: {error}")
    return APIError(500, f"internal error: {type(error).__name__}: {error}")


def validation_error(error: ValidationError | RequestValidationError) -> APIError:
    """A 400 naming the first invalid field, e.g. `messages[0].role`."""
    errors = error.errors(include_url=False)
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('msg')}")
    if first.get("type") == "value_error":  # our own check, worded "field: problem"
        message = str(first.get("ctx", {}).get("error", first.get("msg")))
        field = message.split(":", 1)[0]
        return APIError(400, message, param=field if field.isidentifier() else None)
    loc = _loc(first)
    message = first.get("msg", "invalid value")
    # A value that matches no member of a union fails once per member, each location
    # naming the member (`prompt.str`, `prompt.list[int]`): report the field they share,
    # and the size limit if that is what a member refused.
    same_field = [e for e in errors if _loc(e)[:1] == loc[:1]]
    if len(same_field) > 1:
        locs = [_loc(e) for e in same_field]
        n = 0
        while all(len(other) > n and other[n] == loc[n] for other in locs):
            n += 1
        loc, message = loc[:n], "the value matches none of the accepted types"
        too_long = next((e for e in same_field if e.get("type") == "too_long"), None)
        if too_long is not None:
            message = too_long.get("msg", message)
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    where = f"{param}: " if param else ""
    return APIError(400, f"{where}{message}", param=param or None)


def _loc(error: Any) -> tuple:
    return tuple(p for p in error.get("loc", ()) if p != "body")


def install_error_handlers(app: FastAPI) -> None:
    """Turn every exception a route can raise into OpenAI's error shape."""

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return exc.response(anthropic=anthropic_route(request.url.path))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        message = {404: "no such route", 405: "method not allowed"}.get(exc.status_code)
        error = APIError(exc.status_code, message or str(exc.detail))
        return error.response(exc.headers, anthropic=anthropic_route(request.url.path))

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError | ValidationError)
        return validation_error(exc).response(anthropic=anthropic_route(request.url.path))

    async def too_large(request: Request, exc: Exception) -> JSONResponse:
        anthropic = anthropic_route(request.url.path)
        return _too_large(str(exc)).response({"Connection": "close"}, anthropic=anthropic)

    async def client_left(_: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # left before its body was read: nobody to answer

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Engine failures (RequestFailedError, EngineDeadError) and bugs: still
        # OpenAI's shape rather than a plain-text 500. Starlette logs the traceback.
        return from_exception(exc).response(anthropic=anthropic_route(request.url.path))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(Exception, unexpected)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(ValidationError, invalid)
    app.add_exception_handler(BodyTooLargeError, too_large)
    app.add_exception_handler(ClientDisconnect, client_left)


class BodyTooLargeError(Exception):
    """A streamed (chunked) body grew past the limit while a route was reading it."""


def _too_large(message: str) -> APIError:
    return APIError(413, message, code="request_too_large")


class GuardMiddleware:
    """Host, body size, content type and API key, checked before routing (pure ASGI).

    The size is checked on Content-Length before a byte is read, and counted while a
    chunked body streams in, so an oversized body is never held whole. The key is
    compared in constant time; only paths under `guarded_prefixes` need it, and POSTs
    there must be JSON. `allowed_hosts` None lets any Host in.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        api_key: str | None = None,
        guarded_prefixes: tuple[str, ...] = ("/v1", "/tokenize", "/detokenize"),
        allowed_hosts: Collection[str] | None = None,
    ) -> None:
        if api_key is not None and not api_key:
            raise ValueError("api_key must not be empty (None turns the key off)")
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key.encode() if api_key else None
        self.guarded_prefixes = guarded_prefixes
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        limit = self.max_body_bytes
        error = self._refusal(scope["method"], scope["path"], headers)
        if error is not None:
            extra = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
            await send_error(send, error, extra, anthropic=anthropic_route(scope["path"]))
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(
                        f"request body is over the limit of {limit} bytes",
                    )
            return message

        await self.app(scope, counting_receive, send)

    def _refusal(self, method: str, path: str, headers: dict[bytes, bytes]) -> APIError | None:
        """Why the request is refused before its body is read, if it is."""
        host = host_name(headers.get(b"host", b"").decode("latin-1"))
        # No Host at all is an HTTP/1.0 client, never a browser (browsers always send it).
        if self.allowed_hosts is not None and host and host not in self.allowed_hosts:
            return APIError(
                403,
                f"this server does not answer to the host {host!r}; start it with "
                "--allowed-hosts to add one",
                code="host_not_allowed",
            )
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return APIError(400, "invalid Content-Length header")
            if int(length) > self.max_body_bytes:
                return _too_large(
                    f"request body is {int(length)} bytes; the limit is {self.max_body_bytes}"
                )
        guarded_path = path.startswith(self.guarded_prefixes)
        keyed = guarded_path and self.api_key is not None
        if keyed and not self._authorized(
            headers.get(b"authorization", b""), headers.get(b"x-api-key")
        ):
            return APIError(401, "invalid or missing API key", code="invalid_api_key")
        if guarded_path and method == "POST":
            media_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if media_type != b"application/json":
                shown = media_type.decode("latin-1") or "none"
                return APIError(
                    415,
                    f"Content-Type must be application/json, got {shown}",
                    code="unsupported_media_type",
                )
        return None

    def _authorized(self, header: bytes, x_api_key: bytes | None = None) -> bool:
        """`Authorization: Bearer KEY`, or Anthropic's `x-api-key: KEY`."""
        assert self.api_key is not None
        if x_api_key is not None and hmac.compare_digest(x_api_key.strip(), self.api_key):
            return True
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            token = b""
        return hmac.compare_digest(token.strip(), self.api_key)


def host_name(host: str) -> str:
    """The name in a Host header, without its port or a final dot: `[::1]:8000` → `[::1]`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name.removesuffix(".")


async def send_error(
    send: Send, error: APIError, headers: dict[str, str] | None = None, anthropic: bool = False
) -> None:
    body = json.dumps(error.body(anthropic)).encode()
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if error.status == 413:
        raw_headers.append((b"connection", b"close"))
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
