"""Load and soak test: many concurrent clients against a real `pagedllm serve`.

Starts the server as a subprocess on a free loopback port, with the debug
invariants on (PAGEDLLM_DEBUG_INVARIANTS=1: the block bookkeeping is re-checked
after every step, and a violation stops the engine) and a small KV pool, so
preemption happens. Then `--clients` clients send `--requests` requests in all
(or stop at `--duration` seconds): streaming and non-streaming chat and
completions with random n (1-3) and max_tokens; about 30% of the streams are cut
by the client (a third of those before the first byte: the client sends the
request on a raw connection and closes it at once, the rest at a random event) and
about 10% of the requests are bad, drawn from `BAD_REQUESTS`: malformed JSON or
fields, an unknown model, over-long stop/stop_token_ids/logit_bias, too many
prompts, sequences, messages or content parts, ~3 MB bodies of wrong-typed lists,
a POST that is not JSON, a foreign Host header (the server is bound to 127.0.0.1,
so its Host check is on).

Checks: every valid request ends with finish_reason stop or length (or an error
in OpenAI's shape, counted as a failure), none hangs past `--timeout`, every bad
one gets its own status (400, 403, 404 or 415) in OpenAI's shape; afterwards
/metrics shows nothing running or waiting and no KV block in use, the server's
resident memory is within 10% of what it was after the warm-up, a greedy request
returns the same text as before the load, and a long stream whose client leaves
before reading a byte is not run to its end. Prints a summary (with the bad
requests by kind and status); exits 1 if a check failed.

    .venv/bin/python benchmarks/load_test.py                      # long form: 200 clients
    .venv/bin/python benchmarks/load_test.py --clients 64 --requests 160 --max-tokens 12
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

MODEL = "smol"
DEBUG_ENV = "PAGEDLLM_DEBUG_INVARIANTS"
JSON = "application/json"
TOPICS = ["the sea", "a cat", "Paris", "prime numbers", "the moon", "bread", "rain", "chess"]
RSS_TOLERANCE = 0.10


class ServeProcess:
    """`pagedllm serve` in a subprocess on a free loopback port, its log in a file."""

    def __init__(self, *serve_args: str, debug_invariants: bool = True, start_timeout=180.0):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [
            sys.executable,
            "-m",
            "pagedllm.entrypoints.cli",
            "serve",
            # Loopback: the server answers only to loopback Host names (403 otherwise).
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--served-model-name",
            MODEL,
            "--log-stats-interval",
            "0",
            *serve_args,
        ]
        self.env = {
            **{k: v for k, v in os.environ.items() if k != "PAGEDLLM_API_KEY"},
            "PYTHONUNBUFFERED": "1",
            DEBUG_ENV: "1" if debug_invariants else "0",
        }
        self.start_timeout = start_timeout
        self.log = tempfile.NamedTemporaryFile(prefix="pagedllm-serve-", suffix=".log")  # noqa: SIM115
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServeProcess:
        # A file, not a pipe: nobody reads the log while the server runs, and a full
        # pipe would block the server.
        self.proc = subprocess.Popen(
            self.args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env
        )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited while starting:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not come up:\n{self.output()}")
            time.sleep(0.3)

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            print(f"--- server log (tail) ---\n{self.output()[-4000:]}", file=sys.stderr)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_mib(self) -> float:
        """Resident memory now (VmRSS of /proc/PID/status)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS line")

    def allocator(self) -> str:
        """The server's malloc: mimalloc when `pagedllm` preloaded it, else the system's."""
        maps = Path(f"/proc/{self.pid}/maps").read_text()
        return "mimalloc" if "libmimalloc.so" in maps else "system"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send `sig` and wait for the exit status."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")


# ---------------------------------------------------------------------- requests


@dataclass
class Job:
    """One request to send and what a correct answer looks like."""

    path: str
    body: bytes
    stream: bool = False
    n: int = 1
    cut_after: int | None = None  # a stream the client closes after this many events
    leave_early: bool = False  # the client closes the connection before the first byte
    malformed: str | None = None  # what is wrong with it: a key of BAD_REQUESTS
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": JSON})

    @property
    def expected_status(self) -> int:
        return 200 if self.malformed is None else BAD_REQUESTS[self.malformed][0]


# Outcome kinds that are not failures: completed, cut mid-stream, left before the
# first byte, bad request refused with its status.
PASSING = ("ok", "cut", "left", "refused")


@dataclass
class Outcome:
    kind: str  # one of PASSING, or a failure: error:<status>, wrong_status:<status>, hang, ...
    latency: float
    detail: str = ""
    malformed: str | None = None  # the bad request's kind
    status: int | None = None  # the HTTP status received, if any

    @property
    def failed(self) -> bool:
        return self.kind not in PASSING


def make_job(rng: random.Random, max_tokens: int) -> Job:
    """A random request: 10% bad; of the streams, 30% cut by the client (a third of
    those before the first byte)."""
    chat = rng.random() < 0.5
    if rng.random() < 0.10:
        return bad_job(rng.choice(list(BAD_REQUESTS)), rng, chat)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    topic = rng.choice(TOPICS)
    n = rng.randint(1, 3)
    stream = rng.random() < 0.5
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": rng.randint(1, max_tokens),
        "n": n,
        "temperature": 0.8,
        "stream": stream,
    }
    if chat:
        body["messages"] = [{"role": "user", "content": f"Say something about {topic}."}]
    else:
        body["prompt"] = f"Here is a short note about {topic}, number {rng.randint(1, 99)}:"
    job = Job(path, json.dumps(body).encode(), stream, n)
    if stream and rng.random() < 0.30:
        if rng.random() < 1 / 3:
            job.leave_early = True
        else:
            job.cut_after = rng.randint(1, 6)
    return job


# A bad request's body, built from the JSON of a minimal valid one (`prompt` or
# `messages` in it) and the rng; or already encoded bytes.
BodyFn = Callable[[dict[str, Any], random.Random], "dict[str, Any] | bytes"]


def _prompts(n: int) -> dict[str, Any]:
    return {"prompt": [f"prompt {i}" for i in range(n)]}


def _messages(n: int, parts: int | None = None) -> dict[str, Any]:
    """`n` user messages, each a text or, given `parts`, that many text parts."""
    content: Any = "x" if parts is None else [{"type": "text", "text": "x"}] * parts
    return {"messages": [{"role": "user", "content": content} for _ in range(n)]}


@functools.cache
def _big_wrong_typed_body(variant: int) -> bytes:
    """~3 MB of a list of the wrong type: the server decodes it off the event loop."""
    if variant == 0:
        body = {"model": MODEL, "prompt": "x", "stop_token_ids": ["a"] * 500_000}
    else:
        body = {"model": MODEL, "prompt": [[1, "a"]] * 300_000}
    return json.dumps(body).encode()


# kind → (expected status, endpoint it needs: "chat", "completions" or None for
# either, body). Limits from pagedllm/sampling_params.py and .../openai/protocol.py.
BAD_REQUESTS: dict[str, tuple[int, str | None, BodyFn]] = {
    "bad_json": (400, None, lambda b, r: b'{"model": "smol", "prompt": '),
    "wrong_type": (400, None, lambda b, r: {**b, "max_tokens": "ten"}),
    "negative_max_tokens": (400, None, lambda b, r: {**b, "max_tokens": -r.randint(1, 50)}),
    "unknown_model": (404, None, lambda b, r: {**b, "model": "no-such-model"}),
    "too_many_stop_token_ids": (400, None, lambda b, r: {**b, "stop_token_ids": [1] * 257}),
    "too_big_logit_bias": (
        400,
        None,
        lambda b, r: {**b, "logit_bias": {str(i): 1.0 for i in range(301)}},
    ),
    "too_many_stop_strings": (400, None, lambda b, r: {**b, "stop": [f"s{i}" for i in range(33)]}),
    "too_long_stop_string": (400, None, lambda b, r: {**b, "stop": ["x" * 513]}),
    "too_many_prompts": (400, "completions", lambda b, r: {**b, **_prompts(257)}),
    "too_many_sequences": (400, "completions", lambda b, r: {**b, **_prompts(200), "n": 3}),
    "too_many_messages": (400, "chat", lambda b, r: {**b, **_messages(4097)}),
    "too_many_content_parts": (400, "chat", lambda b, r: {**b, **_messages(2, 4097)}),
    "big_wrong_typed_list": (
        400,
        "completions",
        lambda b, r: _big_wrong_typed_body(r.randint(0, 1)),
    ),
    "not_json_content_type": (415, None, lambda b, r: b),
    "foreign_host": (403, None, lambda b, r: b),
}


def bad_job(kind: str, rng: random.Random, chat: bool) -> Job:
    """A request of the bad `kind` (a key of BAD_REQUESTS), sent to chat if `chat` and
    the kind allows it."""
    _, endpoint, make_body = BAD_REQUESTS[kind]
    chat = endpoint == "chat" if endpoint is not None else chat
    minimal = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    body = make_body({"model": MODEL, **minimal}, rng)
    job = Job(
        "/v1/chat/completions" if chat else "/v1/completions",
        body if isinstance(body, bytes) else json.dumps(body).encode(),
        malformed=kind,
    )
    if kind == "not_json_content_type":
        # What a web page can POST without a CORS preflight, or no Content-Type at all.
        content_type = rng.choice(["text/plain", "application/x-www-form-urlencoded", None])
        job.headers = {"Content-Type": content_type} if content_type else {}
    elif kind == "foreign_host":
        job.headers["Host"] = "evil.example:8000"  # DNS rebinding: a name that is not ours
    return job


async def run_job(client: httpx.AsyncClient, job: Job, timeout: float) -> Outcome:
    start = time.monotonic()
    try:
        kind, detail, status = await asyncio.wait_for(_send(client, job), timeout)
    except TimeoutError:
        kind, detail, status = "hang", f"no answer in {timeout} s", None
    except (httpx.HTTPError, OSError) as e:
        kind, detail, status = f"transport:{type(e).__name__}", str(e), None
    return Outcome(kind, time.monotonic() - start, detail, job.malformed, status)


async def _send(client: httpx.AsyncClient, job: Job) -> tuple[str, str, int | None]:
    """Send `job`; (outcome kind, detail, HTTP status)."""
    if job.leave_early:
        await send_and_leave(client.base_url, job)
        return "left", "", None
    async with client.stream("POST", job.path, content=job.body, headers=job.headers) as r:
        kind, detail = await _read(job, r)
        return kind, detail, r.status_code


async def _read(job: Job, r: httpx.Response) -> tuple[str, str]:
    if r.status_code != 200:
        body = await r.aread()
        text = body[:200].decode(errors="replace")
        if not _is_openai_error(body):
            return f"bad_error_shape:{r.status_code}", text
        if job.malformed is None:
            return f"error:{r.status_code}", text
        if r.status_code != job.expected_status:
            return f"wrong_status:{r.status_code}", f"{job.malformed}: {text}"
        return "refused", ""
    if job.malformed is not None:
        return "accepted_malformed", job.malformed
    if not job.stream:
        data = json.loads(await r.aread())
        return _check_choices(job, [(c["index"], c["finish_reason"]) for c in data["choices"]])
    finished: list[tuple[int, str | None]] = []
    events = 0
    async for line in r.aiter_lines():
        if not line.startswith("data: "):
            continue
        payload = line[len("data: ") :]
        if payload == "[DONE]":
            return _check_choices(job, finished)
        event = json.loads(payload)
        if "error" in event:
            return "error:stream", event["error"]["message"][:200]
        events += 1
        finished += [(c["index"], c["finish_reason"]) for c in event["choices"]]
        if job.cut_after is not None and events >= job.cut_after:
            return "cut", ""  # leaving `_send`'s block closes the connection mid-stream
    return "truncated_stream", "no [DONE]"


def _check_choices(job: Job, finished: list[tuple[int, str | None]]) -> tuple[str, str]:
    reasons = {i: reason for i, reason in finished if reason is not None}
    if sorted(reasons) != list(range(job.n)):
        return "wrong_choices", f"finished choices {sorted(reasons)}, expected {job.n}"
    bad = {r for r in reasons.values() if r not in ("stop", "length")}
    return ("bad_finish_reason", str(bad)) if bad else ("ok", "")


def _is_openai_error(body: bytes) -> bool:
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)


async def send_and_leave(
    url: httpx.URL, job: Job, until: Callable[[], Awaitable[object]] | None = None
) -> None:
    """POST `job` on a raw connection and close it without reading a byte.

    At once, or once the awaitable `until()` returns. The server must abort the
    request (or never start it).
    """
    _reader, writer = await asyncio.open_connection(url.host, url.port)
    head = (
        f"POST {job.path} HTTP/1.1\r\n"
        f"Host: {url.host}:{url.port}\r\n"
        f"Content-Type: {JSON}\r\n"
        "Accept: text/event-stream\r\n"
        f"Content-Length: {len(job.body)}\r\n"
        "\r\n"
    )
    try:
        writer.write(head.encode() + job.body)
        await writer.drain()
        if until is not None:
            await until()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):  # unread data: the close may reset
            await writer.wait_closed()


# -------------------------------------------------------------------------- run


@dataclass
class LoadReport:
    outcomes: list[Outcome] = field(default_factory=list)
    warm_bad: list[Outcome] = field(default_factory=list)  # one of each bad kind, warm-up
    elapsed: float = 0.0
    rss_warm_mib: float = 0.0
    rss_after_mib: float = 0.0
    allocator: str = ""
    preemptions: float = 0.0
    leavers: list[str] = field(default_factory=list)  # what became of the probe's leavers
    server_errors: list[str] = field(default_factory=list)  # ERROR/Traceback log lines
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        kinds = Counter(o.kind for o in self.outcomes)
        ok = sorted(o.latency for o in self.outcomes if o.kind == "ok")
        p50 = statistics.median(ok) if ok else float("nan")
        p99 = ok[min(len(ok) - 1, round(0.99 * (len(ok) - 1)))] if ok else float("nan")
        errors = {k: v for k, v in kinds.items() if k not in PASSING}
        bad = Counter(
            (o.malformed, o.status)
            for o in self.warm_bad + self.outcomes
            if o.malformed is not None
        )
        lines = [
            f"requests: {len(self.outcomes)} in {self.elapsed:.1f} s "
            f"({len(self.outcomes) / max(self.elapsed, 1e-9):.2f} req/s)",
            f"  completed: {kinds['ok']}, cut by the client: {kinds['cut']} mid-stream, "
            f"{kinds['left']} before the first byte",
            f"  bad requests: {kinds['refused']} of {sum(bad.values()) - len(self.warm_bad)} "
            "refused with their status; by kind and status (warm-up included):",
            *(
                f"    {kind} (expects {BAD_REQUESTS[kind][0]}): got {status} × {count}"
                for (kind, status), count in sorted(bad.items(), key=str)
            ),
            f"  failures by kind: {errors or 'none'}",
            f"latency of completed requests: p50 {p50:.2f} s, p99 {p99:.2f} s",
            f"preemptions: {self.preemptions:.0f}",
            *(f"client left before the first byte: {line}" for line in self.leavers),
            f"server log: {len(self.server_errors)} ERROR/Traceback lines"
            + (f", the first: {self.server_errors[0][:200]}" if self.server_errors else ""),
            f"server RSS: {self.rss_warm_mib:.0f} MiB after warm-up, "
            f"{self.rss_after_mib:.0f} MiB after the load "
            f"({(self.rss_after_mib / max(self.rss_warm_mib, 1e-9) - 1) * 100:+.1f}%, "
            f"{self.allocator} malloc)",
            "checks: " + ("all passed" if not self.problems else "FAILED"),
            *(f"  - {p}" for p in self.problems),
        ]
        return "\n".join(lines)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


async def metrics_now(client: httpx.AsyncClient) -> str:
    return (await client.get("/metrics")).text


async def check_leavers_stopped(client: httpx.AsyncClient, report: LoadReport) -> None:
    """Leave two long streams before reading a byte: at once, and once the engine runs
    the request. Neither may run to its end (the server aborts it or never starts it).
    """
    n, max_tokens = 2, 128
    body = {
        "model": MODEL,
        "prompt": "Count to a thousand:",
        "max_tokens": max_tokens,
        "ignore_eos": True,  # so only an abort ends it early
        "n": n,
        "stream": True,
    }
    job = Job("/v1/completions", json.dumps(body).encode(), stream=True, n=n)

    async def until_running() -> None:
        deadline = time.monotonic() + 30
        while metric(await metrics_now(client), "pagedllm:num_requests_running") < 1:
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(0.01)

    for when, until in (("at once", None), ("once running", until_running)):
        generated = metric(await metrics_now(client), "pagedllm:generation_tokens_total")
        await send_and_leave(client.base_url, job, until)
        await asyncio.sleep(0.5)  # time to start it, were it not aborted
        idle, text = await wait_idle(client)
        if not idle:
            report.problems.append(f"a client left {when}; the server is still busy: {text}")
            continue
        tokens = metric(text, "pagedllm:generation_tokens_total") - generated
        report.leavers.append(f"{when}: {tokens:.0f} of {n * max_tokens} tokens generated")
        if tokens >= n * max_tokens:
            report.problems.append(
                f"a client that left {when} was not aborted: {tokens:.0f} tokens generated"
            )


async def greedy_text(client: httpx.AsyncClient) -> str:
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 16}
    r = await client.post("/v1/completions", json={**body, "temperature": 0})
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


async def wait_idle(client: httpx.AsyncClient, timeout: float = 30) -> tuple[bool, str]:
    deadline = time.monotonic() + timeout
    while True:
        text = (await client.get("/metrics")).text
        busy = [
            f"{name}={metric(text, 'pagedllm:' + name)}"
            for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
            if metric(text, "pagedllm:" + name) != 0
        ]
        if not busy:
            return True, text
        if time.monotonic() > deadline:
            return False, ", ".join(busy)
        await asyncio.sleep(0.2)


async def run_load(
    server: ServeProcess,
    clients: int,
    requests: int,
    duration: float,
    max_tokens: int,
    timeout: float,
    seed: int = 0,
) -> LoadReport:
    """Warm up, load, then check the server is idle, as big as before and still right."""
    rng = random.Random(seed)
    report = LoadReport()
    # Reuse a connection only while it is fresh: uvicorn closes one idle for 5 s, and a
    # request sent on it just then fails with a ReadError that no server could avoid
    # (seen once in a clean-clone run, on a connection idle since the warm-up).
    limits = httpx.Limits(
        max_connections=clients + 4, max_keepalive_connections=clients + 4, keepalive_expiry=2.0
    )
    async with httpx.AsyncClient(base_url=server.url, timeout=timeout, limits=limits) as client:
        before = await greedy_text(client)
        # Warm-up at full concurrency, so the allocator has seen the biggest batches,
        # and with every kind of bad request (the biggest bodies).
        warm = [make_job(random.Random(seed + 1 + i), max_tokens) for i in range(clients)]
        warm += [bad_job(kind, random.Random(seed), chat=False) for kind in BAD_REQUESTS]
        warmed = await asyncio.gather(*(run_job(client, job, timeout) for job in warm))
        report.warm_bad = [o for o in warmed if o.malformed is not None]
        await wait_idle(client)
        report.rss_warm_mib = server.rss_mib()
        report.allocator = server.allocator()

        jobs = [make_job(rng, max_tokens) for _ in range(requests)]
        deadline = time.monotonic() + duration
        start = time.monotonic()

        async def worker() -> None:
            while jobs and time.monotonic() < deadline:
                report.outcomes.append(await run_job(client, jobs.pop(), timeout))

        await asyncio.gather(*(worker() for _ in range(clients)))
        report.elapsed = time.monotonic() - start

        idle, detail = await wait_idle(client)
        if not idle:
            report.problems.append(f"the server is not idle after the load: {detail}")
        else:
            report.preemptions = metric(detail, "pagedllm:num_preemptions_total")
        report.rss_after_mib = server.rss_mib()
        after = await greedy_text(client)
        if after != before:
            report.problems.append(f"greedy text changed: {before!r} → {after!r}")
        await check_leavers_stopped(client, report)
        health = await client.get("/health")
        if health.status_code != 200:
            report.problems.append(f"/health is {health.status_code}: {health.text[:200]}")
    log = server.output().splitlines()
    report.server_errors = [
        line for line in log if line.startswith("ERROR") or line.startswith("Traceback")
    ]
    first = next((i for i, line in enumerate(log) if line.startswith("Traceback")), None)
    if first is not None:
        report.problems.append(
            "the server logged a traceback:\n" + "\n".join(log[first : first + 60])
        )
    failures = [o for o in report.warm_bad + report.outcomes if o.failed]
    for o in failures[:10]:
        report.problems.append(
            f"request failed: {o.kind} {o.detail} (request: {o.malformed or 'good'})"
        )
    if len(failures) > 10:
        report.problems.append(f"... and {len(failures) - 10} more failed requests")
    if report.rss_after_mib > report.rss_warm_mib * (1 + RSS_TOLERANCE):
        report.problems.append(
            f"RSS grew by more than {RSS_TOLERANCE:.0%}: "
            f"{report.rss_warm_mib:.0f} → {report.rss_after_mib:.0f} MiB"
        )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=1000, help="requests in all")
    parser.add_argument("--duration", type=float, default=600, help="stop sending after (s)")
    parser.add_argument("--max-tokens", type=int, default=32, help="largest max_tokens drawn")
    parser.add_argument("--timeout", type=float, default=300, help="per-request timeout (s)")
    parser.add_argument("--num-kv-blocks", type=int, default=64, help="the server's KV pool")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    serve_args = ["--dtype", "float32", "--num-kv-blocks", str(args.num_kv_blocks)]
    serve_args += ["--max-model-len", "512"]
    with ServeProcess(*serve_args) as server:
        report = asyncio.run(
            run_load(
                server,
                args.clients,
                args.requests,
                args.duration,
                args.max_tokens,
                args.timeout,
                args.seed,
            )
        )
        status = server.stop()
        if status != 0:
            report.problems.append(f"the server exited with status {status}")
    print(report.summary())
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
