"""The client side of `bench serve`: one streamed request to an OpenAI-compatible server,
timed chunk by chunk, and the seeded schedule that sends them.

A request never raises: whatever goes wrong (an HTTP error, a refused connection, an
error event in the stream, a timeout) is recorded in its `RequestResult`, so one bad
request is a failed request in the report, not a crashed benchmark.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
ENDPOINTS = (COMPLETIONS, CHAT)
DONE = "[DONE]"


@dataclass
class RequestResult:
    """What one request did: when it started, when each content chunk came, when it ended."""

    prompt_len: int
    start: float  # time.perf_counter() when the request was sent
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None  # the server's count, when it sent usage
    success: bool = False
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start if self.chunk_times else 0.0

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def itls(self) -> list[float]:
        """The gaps between consecutive content chunks."""
        return [b - a for a, b in itertools.pairwise(self.chunk_times)]

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first; None for a single-token answer."""
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


class SSEDecoder:
    """Server-sent events, line by line: returns each event's data once its blank line
    arrives (several `data:` lines join with newlines); comments and other fields are
    skipped. `flush()` gives an event the stream ended without closing."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            return self.flush()
        if line.startswith("data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


def sse_events(lines: Iterable[str]) -> Iterator[str]:
    """The data of every event in `lines`."""
    decoder = SSEDecoder()
    for line in lines:
        if (data := decoder.feed(line)) is not None:
            yield data
    if (data := decoder.flush()) is not None:
        yield data


def chunk_content(chunk: dict[str, Any]) -> str:
    """The text a completion or chat-completion chunk carries ('' for role/usage chunks)."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


def error_message(status: int, body: str) -> str:
    """'HTTP 404: message' from an OpenAI error object, or the body's start."""
    message = body.strip()[:200]
    try:
        error = json.loads(body).get("error")
        if isinstance(error, dict) and error.get("message"):
            message = str(error["message"])
        elif isinstance(error, str):
            message = error
    except (ValueError, AttributeError):
        pass
    return f"HTTP {status}: {message}" if status else message


def poisson_arrivals(num_requests: int, rate: float, seed: int) -> list[float]:
    """Send times in seconds from the start: a Poisson process of `rate` requests/s (gaps
    drawn exponential, seeded), so the same seed gives the same schedule; inf: all at 0."""
    if rate <= 0 or math.isnan(rate):
        raise ValueError(f"--request-rate must be > 0 (or inf), got {rate}")
    if math.isinf(rate):
        return [0.0] * num_requests
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, num_requests)
    gaps[0] = 0.0  # the first request goes at once
    return np.cumsum(gaps).tolist()


async def stream_request(
    client: Any, url: str, payload: dict[str, Any], prompt_len: int, timeout: float
) -> RequestResult:
    """POST `payload` with streaming on and time it; never raises (see the module doc)."""
    result = RequestResult(prompt_len=prompt_len, start=time.perf_counter())
    try:
        async with asyncio.timeout(timeout):
            await _stream(client, url, payload, result)
    except TimeoutError:
        result.error = f"timed out after {timeout:g} s"
    except Exception as e:  # connection refused, reset, bad JSON ...
        result.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    result.end = time.perf_counter()
    if result.error:
        result.success = False
    return result


async def _stream(client: Any, url: str, payload: dict[str, Any], result: RequestResult) -> None:
    async with client.stream("POST", url, json=payload) as response:
        if response.status_code != 200:
            body = (await response.aread()).decode(errors="replace")
            result.error = error_message(response.status_code, body)
            return
        decoder = SSEDecoder()
        usage = None
        async for line in response.aiter_lines():
            data = decoder.feed(line)
            if data is None:
                continue
            if data == DONE:
                result.success = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = error_message(0, data)
                return
            if chunk_content(chunk):
                result.chunk_times.append(time.perf_counter())
            usage = chunk.get("usage") or usage
        if not result.success:
            result.error = "the stream ended before [DONE]"
            return
        if usage and usage.get("completion_tokens") is not None:
            result.output_tokens = int(usage["completion_tokens"])
            result.prompt_tokens = usage.get("prompt_tokens")
        else:  # a server without usage: one chunk is one token
            result.output_tokens = len(result.chunk_times)


@dataclass
class RunResult:
    """Every request's result, in the dataset's order, and the run's own numbers."""

    results: list[RequestResult]
    duration_s: float
    max_concurrency: int  # the most requests in flight at once


async def run_requests(
    client: Any,
    url: str,
    payloads: list[tuple[dict[str, Any], int]],
    arrivals: list[float],
    max_concurrency: int | None,
    timeout: float,
    on_done: Callable[[RequestResult], None] | None = None,
) -> RunResult:
    """Send each (payload, prompt_len) at its arrival time, at most `max_concurrency` at
    once (a request over the limit waits, and its clock starts when it is sent);
    `on_done` hears of each request as it ends (a progress bar)."""
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    in_flight = peak = 0

    async def one(payload: dict[str, Any], prompt_len: int, at: float) -> RequestResult:
        nonlocal in_flight, peak
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        if limit is not None:
            await limit.acquire()
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            result = await stream_request(client, url, payload, prompt_len, timeout)
        finally:
            in_flight -= 1
            if limit is not None:
                limit.release()
        if on_done is not None:
            on_done(result)
        return result

    start = time.perf_counter()
    tasks = [one(p, n, at) for (p, n), at in zip(payloads, arrivals, strict=True)]
    results = await asyncio.gather(*tasks)
    return RunResult(list(results), time.perf_counter() - start, peak)
