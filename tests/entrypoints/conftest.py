"""Server fixtures: a real engine behind a real uvicorn on a free localhost port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from pagedllm.config import EngineArgs

# Small enough to start fast; max_model_len fits the pool, so max_tokens=None fits too.
TEST_ENGINE_ARGS = {"dtype": "float32", "kv_cache_memory": 0.25, "max_model_len": 2048}
MODEL = "smol"


class ServerThread:
    """uvicorn serving an ASGI app in a background thread; `url` once started."""

    def __init__(self, app, send_buffer_bytes: int | None = None) -> None:
        """`send_buffer_bytes` fixes each connection's kernel send buffer (no autotuning),
        so a client that stops reading blocks the server's writes within a few KB."""
        import uvicorn

        if send_buffer_bytes is None:  # uvicorn binds its own socket, as `pagedllm serve` does
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
            config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
            sockets = None
        else:  # a socket of our own, whose accepted connections inherit the buffer size
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
            config = uvicorn.Config(app, log_level="warning")
            sockets = [sock]
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": sockets}, daemon=True
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def start_engine(**overrides):
    from pagedllm.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(EngineArgs(**{**TEST_ENGINE_ARGS, **overrides}))


@pytest.fixture(scope="session")
def async_llm():
    llm = start_engine()
    yield llm
    llm.shutdown()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def metric_value(text: str, name: str) -> float:
    """The value of an unlabelled-by-test Prometheus sample (first line starting with name)."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


@pytest.fixture(scope="module")
def server(async_llm) -> Iterator[ServerThread]:
    from pagedllm.entrypoints.openai.api_server import build_app

    with ServerThread(build_app(async_llm, [MODEL])) as running:
        yield running
