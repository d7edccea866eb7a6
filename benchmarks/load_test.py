"""Load and soak test: many concurrent clients against a real `pagedllm serve`.

Starts the server as a subprocess on a free loopback port, with the debug
invariants on (PAGEDLLM_DEBUG_INVARIANTS=1: the block bookkeeping is re-checked
after every step, and a violation stops the engine) and a small KV pool, so
preemption happens. Then `--clients` clients send `--requests` requests in all
(or stop at `--duration` seconds): streaming and non-streaming chat and
completions with random n (1-3) and max_tokens; about 30% of the streams are cut
by the client at a random point and about 10% of the requests are malformed.

Checks: every valid request ends with finish_reason stop or length (or an error
in OpenAI's shape, counted as a failure), none hangs past `--timeout`, every
malformed one gets a 4xx in OpenAI's shape; afterwards /metrics shows nothing
running or waiting and no KV block in use, the server's resident memory is within
10% of what it was after the warm-up, and a greedy request returns the same text
as before the load. Prints a summary; exits 1 if a check failed.

    .venv/bin/python benchmarks/load_test.py                      # long form: 200 clients
    .venv/bin/python benchmarks/load_test.py --clients 64 --requests 160 --max-tokens 12
"""

from __future__ import annotations

import argparse
import asyncio
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

MODEL = "smol"
DEBUG_ENV = "PAGEDLLM_DEBUG_INVARIANTS"
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
            "--port",
            str(self.port),
            "--served-model-name",
            MODEL,
            "--log-stats-interval",
            "0",
            *serve_args,
        ]
        self.env = {
            **os.environ,
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
    malformed: str | None = None  # what is wrong with it


@dataclass
class Outcome:
    kind: str  # ok, cut, refused (malformed → 4xx), or a failure: error:<status>, hang, ...
    latency: float
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.kind not in ("ok", "cut", "refused")


def make_job(rng: random.Random, max_tokens: int) -> Job:
    """A random request: 10% malformed; of the streams, 30% cut by the client."""
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if rng.random() < 0.10:
        return _malformed(rng, path)
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
    cut = rng.randint(1, 6) if stream and rng.random() < 0.30 else None
    return Job(path, json.dumps(body).encode(), stream, n, cut)


def _malformed(rng: random.Random, path: str) -> Job:
    prompt = {"messages": [{"role": "user", "content": "hi"}]}
    if path.endswith("/completions") and "chat" not in path:
        prompt = {"prompt": "hi"}
    kind = rng.choice(["bad_json", "wrong_type", "negative_max_tokens", "unknown_model"])
    if kind == "bad_json":
        return Job(path, b'{"model": "smol", "prompt": ', malformed=kind)
    body: dict[str, Any] = {"model": MODEL, **prompt}
    if kind == "wrong_type":
        body["max_tokens"] = "ten"
    elif kind == "negative_max_tokens":
        body["max_tokens"] = -rng.randint(1, 50)
    else:
        body["model"] = "no-such-model"
    return Job(path, json.dumps(body).encode(), malformed=kind)


async def run_job(client: httpx.AsyncClient, job: Job, timeout: float) -> Outcome:
    start = time.monotonic()
    try:
        kind, detail = await asyncio.wait_for(_send(client, job), timeout)
    except TimeoutError:
        kind, detail = "hang", f"no answer in {timeout} s"
    except httpx.HTTPError as e:
        kind, detail = f"transport:{type(e).__name__}", str(e)
    return Outcome(kind, time.monotonic() - start, detail)


async def _send(client: httpx.AsyncClient, job: Job) -> tuple[str, str]:
    headers = {"Content-Type": "application/json"}
    async with client.stream("POST", job.path, content=job.body, headers=headers) as r:
        if r.status_code != 200:
            body = await r.aread()
            if not _is_openai_error(body):
                return f"bad_error_shape:{r.status_code}", body[:200].decode(errors="replace")
            if job.malformed is not None and 400 <= r.status_code < 500:
                return "refused", ""
            return f"error:{r.status_code}", body[:200].decode(errors="replace")
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
                return "cut", ""  # leaving the block closes the connection mid-stream
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


# -------------------------------------------------------------------------- run


@dataclass
class LoadReport:
    outcomes: list[Outcome] = field(default_factory=list)
    elapsed: float = 0.0
    rss_warm_mib: float = 0.0
    rss_after_mib: float = 0.0
    preemptions: float = 0.0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        kinds = Counter(o.kind for o in self.outcomes)
        ok = sorted(o.latency for o in self.outcomes if o.kind == "ok")
        p50 = statistics.median(ok) if ok else float("nan")
        p99 = ok[min(len(ok) - 1, round(0.99 * (len(ok) - 1)))] if ok else float("nan")
        errors = {k: v for k, v in kinds.items() if k not in ("ok", "cut", "refused")}
        lines = [
            f"requests: {len(self.outcomes)} in {self.elapsed:.1f} s "
            f"({len(self.outcomes) / max(self.elapsed, 1e-9):.2f} req/s)",
            f"  completed: {kinds['ok']}, cut by the client: {kinds['cut']}, "
            f"malformed refused with 4xx: {kinds['refused']}",
            f"  failures by kind: {errors or 'none'}",
            f"latency of completed requests: p50 {p50:.2f} s, p99 {p99:.2f} s",
            f"preemptions: {self.preemptions:.0f}",
            f"server RSS: {self.rss_warm_mib:.0f} MiB after warm-up, "
            f"{self.rss_after_mib:.0f} MiB after the load "
            f"({(self.rss_after_mib / max(self.rss_warm_mib, 1e-9) - 1) * 100:+.1f}%)",
            "checks: " + ("all passed" if not self.problems else "FAILED"),
            *(f"  - {p}" for p in self.problems),
        ]
        return "\n".join(lines)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


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
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=server.url, timeout=timeout, limits=limits) as client:
        before = await greedy_text(client)
        # Warm-up at full concurrency, so the allocator has seen the biggest batches.
        warm = [make_job(random.Random(seed + 1 + i), max_tokens) for i in range(clients)]
        await asyncio.gather(*(run_job(client, job, timeout) for job in warm))
        await wait_idle(client)
        report.rss_warm_mib = server.rss_mib()

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
        health = await client.get("/health")
        if health.status_code != 200:
            report.problems.append(f"/health is {health.status_code}: {health.text[:200]}")
    failures = [o for o in report.outcomes if o.failed]
    for o in failures[:10]:
        report.problems.append(f"request failed: {o.kind} {o.detail}")
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
