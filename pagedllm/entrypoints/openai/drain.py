"""Graceful shutdown: on SIGTERM stop taking requests, finish the ones in flight, exit 0.

uvicorn alone closes its listening socket at the first SIGTERM, so a client that
arrives while streams finish gets "connection refused" rather than an answer, and
it re-raises the signal once done, so the process dies by SIGTERM (status 143)
even after a clean shutdown. Here the first SIGTERM or Ctrl-C starts draining
instead: the listener stays open, new work (and `/health`) gets 503 in OpenAI's
error shape so a load balancer moves on, and requests in flight run to their
end. When none is left, or the drain timeout passes (then the engine stops and
every remaining stream ends with an error event), uvicorn shuts down and the
process exits with status 0. A second signal exits at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Callable, Generator
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from pagedllm.entrypoints.openai.errors import APIError, send_error

logger = logging.getLogger(__name__)

# Paths that start work in the engine; /metrics, /version and the web page stay open.
DRAINED_PREFIXES = ("/v1", "/tokenize", "/detokenize", "/health")


class Drain:
    """Whether the server is draining, and how many requests are still in flight."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self.deadline: float | None = None

    def start(self, timeout: float) -> None:
        if not self.draining:
            self.draining = True
            self.deadline = time.monotonic() + timeout

    def done(self) -> bool:
        """No request left in flight."""
        return self.in_flight == 0

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


class DrainMiddleware:
    """Counts requests in flight; while draining, refuses new ones with 503."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(DRAINED_PREFIXES):
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            error = APIError(503, "the server is shutting down", code="server_shutting_down")
            await send_error(send, error, {"Connection": "close", "Retry-After": "1"})
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining on the first SIGTERM/SIGINT instead of closing at once.

    ``on_timeout`` runs once when the drain timeout passes with requests still in
    flight: it should end them (stop the engine) so their responses finish cleanly.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        drain: Drain,
        drain_timeout: float,
        on_timeout: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(config)
        self.drain = drain
        self.drain_timeout = drain_timeout
        self.on_timeout = on_timeout

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.draining:  # a second signal: stop now
            self.should_exit = True
            self.force_exit = self.force_exit or sig == signal.SIGINT
            return
        logger.info(
            "%s: draining %d requests in flight (up to %.0f s); new ones get 503",
            signal.Signals(sig).name,
            self.drain.in_flight,
            self.drain_timeout,
        )
        self.drain.start(self.drain_timeout)

    async def on_tick(self, counter: int) -> bool:
        drain = self.drain
        if drain.draining and not self.should_exit:
            if drain.done():
                logger.info("drained; shutting down")
                self.should_exit = True
            elif drain.expired():
                # Ending them lets their responses finish with an error; uvicorn then
                # gives them timeout_graceful_shutdown seconds before cutting them.
                logger.warning("drain timeout: ending %d requests in flight", drain.in_flight)
                self.on_timeout()
                self.should_exit = True
        return await super().on_tick(counter)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """Like uvicorn's, but a handled signal is not raised again at the end: exit 0."""
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
