"""Hostile requests against a live server (issue 17): each is refused or ended fast and cheaply.

For every trigger the test asserts what a client sees (a 4xx or 503 in OpenAI's
error shape within a second, or its request aborted), that `/health` kept
answering within 100 ms meanwhile (measured by a prober thread), that nothing is
left running or waiting and every KV block is free afterwards, and that a normal
request is still answered.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.entrypoints.conftest import MODEL, ServerThread, metric_value, start_engine, wait_for

HEALTH_LIMIT_S = 0.1
MAX_WAITING = 4


@pytest.fixture(scope="module")
def llm():
    engine = start_engine(max_waiting=MAX_WAITING)
    yield engine
    engine.shutdown()


class ErrorLog(logging.Handler):
    """Keeps what the server logs at ERROR: an exception escaping into uvicorn is a bug."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


SERVER_ERRORS = ErrorLog()


@pytest.fixture(scope="module")
def server(llm) -> Iterator[ServerThread]:
    from pagedllm.entrypoints.openai.api_server import allowed_hosts_for, build_app

    app = build_app(llm, [MODEL], allowed_hosts=allowed_hosts_for("127.0.0.1", None))
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addHandler(SERVER_ERRORS)
    try:
        with ServerThread(app, send_buffer_bytes=8192) as running:
            yield running
    finally:
        uvicorn_log.removeHandler(SERVER_ERRORS)


class HealthProbe:
    """Asks `/health` every 20 ms from its own thread and connection; keeps the latencies."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                r = client.get("/health")
                self.latencies.append(time.perf_counter() - start)
                if r.status_code != 200:
                    self.failures.append(f"{r.status_code} {r.text}")
                self._stop.wait(0.02)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        while not self.latencies:  # one answer before the attack starts
            time.sleep(0.005)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def check(self) -> None:
        assert not self.failures, self.failures
        assert max(self.latencies) < HEALTH_LIMIT_S, sorted(self.latencies)[-5:]


@contextmanager
def attack(url: str) -> Iterator[HealthProbe]:
    with HealthProbe(url) as probe:
        yield probe
    probe.check()


def metrics(url: str) -> str:
    return httpx.get(url + "/metrics").text


def aborted(url: str) -> float:
    """How many requests have ended by abort (the request_success counter's abort label)."""
    total = 0.0
    for line in metrics(url).splitlines():
        if line.startswith("pagedllm:request_success_total{") and 'reason="abort"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def idle(url: str) -> bool:
    text = metrics(url)
    return (
        metric_value(text, "pagedllm:num_requests_running") == 0
        and metric_value(text, "pagedllm:num_requests_waiting") == 0
        and metric_value(text, "pagedllm:kv_cache_usage_perc") == 0
    )


def assert_still_serving(url: str, llm) -> None:
    """Nothing left running or holding blocks, no error logged, a normal request answered."""
    assert wait_for(lambda: idle(url), timeout=10)
    assert not SERVER_ERRORS.records, SERVER_ERRORS.records[0]
    assert llm.is_running, llm.dead_error
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def completion(**fields: object) -> dict:
    return {"model": MODEL, "prompt": "Hello", "max_tokens": 5, **fields}


# (path, body, status, param): bodies are built once, before any clock starts.
REFUSED = {
    "2 million-ish stop ids with n=128": (
        "/v1/completions",
        completion(n=128, min_tokens=500, max_tokens=600, stop_token_ids=list(range(500_000))),
        400,
        "stop_token_ids",
    ),
    "logit_bias of 100k entries": (
        "/v1/completions",
        completion(logit_bias={str(i): 1.0 for i in range(100_000)}),
        400,
        "logit_bias",
    ),
    "10k stop strings": ("/v1/completions", completion(stop=["ab"] * 10_000), 400, "stop"),
    "a 100k-character stop string": (
        "/v1/completions",
        completion(stop=["x" * 100_000]),
        400,
        "stop",
    ),
    "100k prompts": ("/v1/completions", completion(prompt=["a"] * 100_000), 400, "prompt"),
    "n=128 times 8 prompts": (
        "/v1/completions",
        completion(n=128, prompt=["a"] * 8),
        400,
        "prompt",
    ),
    "a million wrong-typed stop ids": (
        "/v1/completions",
        completion(stop_token_ids=["a"] * 500_000),
        400,
        "stop_token_ids",
    ),
    "300k tiny wrong prompts": (
        "/v1/completions",
        completion(prompt=[[1, "a"]] * 300_000),
        400,
        "prompt",
    ),
    "100k chat messages": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}] * 100_000},
        400,
        "messages",
    ),
    "a million token ids to detokenize, one out of range": (
        "/detokenize",
        {"tokens": [1] * 500_000 + [10**9]},
        400,
        "tokens",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_oversized_fields_are_refused_fast_without_stalling_the_server(server, llm, name):
    path, body, status, param = REFUSED[name]
    data = json.dumps(body).encode()
    assert len(data) < 4 * 1024 * 1024  # under the body limit: the fields are what is refused
    headers = {"Content-Type": "application/json"}
    with attack(server.url):
        start = time.perf_counter()
        r = httpx.post(server.url + path, content=data, headers=headers, timeout=30)
        elapsed = time.perf_counter() - start
    assert assert_openai_error(r, status)["param"].startswith(param)
    assert elapsed < 1.0, elapsed
    assert_still_serving(server.url, llm)


def test_a_full_waiting_queue_is_a_503_with_retry_after_and_keeps_nothing(server, llm):
    body = completion(prompt=["Hi"] * 64, max_tokens=1)
    with attack(server.url):
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert assert_openai_error(r, 503)["code"] == "queue_full"
    assert r.headers["Retry-After"] == "1"
    assert_still_serving(server.url, llm)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Content-Type": "text/plain"}, 415),  # a web page's no-preflight POST
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ({"Content-Type": "application/json", "Host": "evil.example:8000"}, 403),  # rebinding
    ],
)
def test_requests_a_web_page_could_forge_are_refused(server, llm, headers, status):
    data = json.dumps(completion()).encode()
    r = httpx.post(server.url + "/v1/completions", content=data, headers=headers)
    assert_openai_error(r, status)
    assert_still_serving(server.url, llm)


def test_localhost_names_are_answered(server):
    for host in ("localhost", f"localhost:{server.port}", "127.0.0.1", "[::1]:8000", "localhost."):
        assert httpx.get(server.url + "/health", headers={"Host": host}).status_code == 200


def send_raw(port: int, path: str, body: dict, rcvbuf: int | None = None) -> socket.socket:
    """A POST written on a bare socket, so the test decides when the client leaves."""
    sock = socket.socket()
    if rcvbuf is not None:  # before connecting, so the window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


LONG = {"model": MODEL, "prompt": "Count:", "max_tokens": 1000, "ignore_eos": True}


@pytest.mark.parametrize("when", ["before the first byte", "mid-stream", "non-streaming"])
def test_a_client_that_leaves_has_its_request_aborted_and_blocks_freed(server, llm, when):
    before = aborted(server.url)
    with attack(server.url):
        sock = send_raw(server.port, "/v1/completions", {**LONG, "stream": when != "non-streaming"})
        if when == "mid-stream":
            received = b""
            while received.count(b"data: ") < 3:
                received += sock.recv(4096)
        elif when == "non-streaming":
            assert wait_for(lambda: not idle(server.url), timeout=10)  # it is generating
        sock.close()
        # 1000 tokens take seconds; an abort takes a step
        assert wait_for(lambda: aborted(server.url) > before, timeout=5)
    assert_still_serving(server.url, llm)


def test_a_stalled_reader_is_cut_off_and_its_request_aborted(server, llm, monkeypatch):
    from pagedllm.entrypoints.openai import serving_base

    monkeypatch.setattr(serving_base, "SEND_TIMEOUT_S", 1.0)
    before = aborted(server.url)
    # 8 choices with 20 logprobs each: several KB a step, so the socket buffers (8 KB
    # here, 4 KB at the client) fill in a few steps; the whole answer takes a minute.
    body = {**LONG, "stream": True, "n": 8, "logprobs": 20, "max_tokens": 1500}
    with attack(server.url):
        sock = send_raw(server.port, "/v1/completions", body, rcvbuf=4096)
        try:
            assert wait_for(lambda: aborted(server.url) > before, timeout=30)
        finally:
            sock.close()
    assert_still_serving(server.url, llm)


def test_the_largest_allowed_conversation_is_prepared_off_the_event_loop(server, llm):
    # 4096 messages, 3.6 MB: rendering and tokenizing take seconds, then a 400 for length
    messages = [{"role": "user", "content": "word " * 175}] * 4096
    data = json.dumps({"messages": messages}).encode()
    with attack(server.url) as probe:
        r = httpx.post(
            server.url + "/v1/chat/completions",
            content=data,
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
    assert assert_openai_error(r, 400)["code"] == "context_length_exceeded"
    assert len(probe.latencies) > 10  # the probe ran all along
    assert_still_serving(server.url, llm)


def test_a_hostile_model_template_is_a_fast_400(server, llm, monkeypatch):
    template = (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
        "{{ 'a' * 10**10 }}"
    )
    monkeypatch.setattr(llm.tokenizer.hf, "chat_template", template)
    body = {"messages": [{"role": "user", "content": "hi"}]}
    with attack(server.url):
        start = time.perf_counter()
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
        elapsed = time.perf_counter() - start
    assert "time limit" in assert_openai_error(r, 400)["message"]
    assert elapsed < 1.0
    assert_still_serving(server.url, llm)


def test_models_do_not_reveal_where_the_file_is(server, llm):
    (model,) = httpx.get(server.url + "/v1/models").json()["data"]
    assert model["root"] == llm.engine.model_path.name
    assert "/" not in model["root"]


def test_the_web_page_is_sent_with_a_strict_policy(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200
    policy = r.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    api = httpx.get(server.url + "/v1/models")
    assert api.headers["X-Content-Type-Options"] == "nosniff"


def test_a_stream_that_never_starts_still_ends_its_requests():
    """A server whose send fails on the response start (the client left; ASGI 2.4) never
    iterates the body, so its generator's `finally` never runs: `on_close` must."""
    import asyncio

    from pagedllm.entrypoints.openai.serving_base import SSEResponse

    started, closed = [], []

    async def body():
        started.append(True)
        yield "data: x\n\n"

    async def receive():
        await asyncio.Event().wait()

    async def send(message):
        raise OSError("the client has gone")

    response = SSEResponse(body(), on_close=lambda: closed.append(True))
    scope = {"type": "http", "asgi": {"spec_version": "2.4"}, "headers": []}
    asyncio.run(response(scope, receive, send))
    assert closed == [True] and started == []


def test_a_big_body_with_a_lone_surrogate_is_a_400_on_both_parsers(server, llm):
    # many commas send the body to the pure-Python decoder, which would accept "\ud800"
    body = '{"prompt": "\\ud800 hi", "user": "' + "," * 200_000 + '", "echo": true}'
    headers = {"Content-Type": "application/json"}
    r = httpx.post(server.url + "/v1/completions", content=body.encode(), headers=headers)
    assert "not valid JSON" in assert_openai_error(r, 400)["message"]
    small = httpx.post(
        server.url + "/v1/completions", content=b'{"prompt": "\\ud800"}', headers=headers
    )
    assert_openai_error(small, 400)
    assert_still_serving(server.url, llm)
