"""`pagedllm serve --data-parallel-size N`: N engine replicas behind one API server.

The front (this module) starts the replicas (dp_replicas.py), then answers on the
user's address: each request goes whole to one replica, chosen by dp_routing.py, and
its answer, streamed or not, comes back through the front. `/health` is the front's
own: 200 only while every replica is alive and healthy, 503 naming those that are not.
`/metrics` sums the replicas' samples (the KV-cache usage, a fraction, is averaged)
and adds `pagedllm:dp_replica_up` and per-replica request counts. A replica that dies
is routed around; the requests it held end with a 502 in OpenAI's error shape (an
error event when their stream had begun), and new ones go to the others.

A stored response (`/v1/responses`) lives on the replica that made it: retrieving it,
or continuing it with `previous_response_id`, is sent to the replica that answers for it.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from pagedllm.entrypoints.dp_replicas import (
    Replica,
    ReplicaStartError,
    start_replicas,
    stop_replicas,
    wait_until_healthy,
)
from pagedllm.entrypoints.dp_routing import NoReplicaAlive, ReplicaChooser, prefix_hashes
from pagedllm.entrypoints.openai.api_server import allowed_hosts_for, install_guards
from pagedllm.entrypoints.openai.drain import Drain, DrainingServer
from pagedllm.entrypoints.openai.errors import APIError, anthropic_route
from pagedllm.entrypoints.proxy import forwarded_headers, relay

logger = logging.getLogger("pagedllm.data_parallel")

# bodies routed by their prompt (the rest go to the least-loaded replica)
PROMPT_PATHS = frozenset(
    ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/messages")
)
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
_INLINE_JSON_BYTES = 65_536  # larger bodies are decoded off the event loop
_HEALTH_TIMEOUT_S = 5.0
_WATCH_INTERVAL_S = 2.0  # how often the front asks the replicas whether their engines run


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _sample_line(name: str, labels: dict[str, str], value: float) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return (
        f"{name}{{{inner}}} {floatToGoString(value)}"
        if inner
        else f"{name} {floatToGoString(value)}"
    )


def sum_metrics(texts: Sequence[str]) -> str:
    """The replicas' Prometheus texts as one: samples with the same name and labels are
    summed (counters, gauges, histogram buckets, sums and counts), except a `_perc`
    gauge (a fraction: averaged) and `_created` (the earliest)."""
    families: dict[str, tuple[str, str]] = {}  # name → (type, help), in first-seen order
    values: dict[str, dict[tuple, list[float]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            families.setdefault(family.name, (family.type, family.documentation))
            samples = values.setdefault(family.name, {})
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                samples.setdefault(key, []).append(s.value)
    lines = []
    for name, (kind, doc) in families.items():
        shown = name + "_total" if kind == "counter" else name
        lines += [f"# HELP {shown} {_escape_help(doc)}", f"# TYPE {shown} {kind}"]
        for (sample, labels), got in values[name].items():
            if sample.endswith("_created"):
                value = min(got)
            elif kind == "gauge" and name.endswith("_perc"):
                value = math.fsum(got) / len(got)
            else:
                value = math.fsum(got)
            lines.append(_sample_line(sample, dict(labels), value))
    return "\n".join(lines) + "\n" if lines else ""


def _front_metrics(chooser: ReplicaChooser) -> str:
    """The front's own samples: which replicas are up, and what it sent each."""
    rows = [
        (
            "pagedllm:dp_replica_up",
            "gauge",
            "1 while the replica's process runs and its engine serves.",
            "alive",
        ),
        ("pagedllm:dp_requests_in_flight", "gauge", "Requests in flight per replica.", "in_flight"),
        ("pagedllm:dp_requests_routed", "counter", "Requests sent to each replica.", "routed"),
    ]
    lines = []
    for name, kind, doc, attr in rows:
        shown = name + "_total" if kind == "counter" else name
        lines += [f"# HELP {shown} {doc}", f"# TYPE {shown} {kind}"]
        for r in chooser.replicas:
            lines.append(_sample_line(shown, {"replica": str(r.index)}, float(getattr(r, attr))))
    return "\n".join(lines) + "\n"


def build_dp_app(
    replicas: Sequence[Replica],
    policy: str = "least-loaded",
    api_key: str | None = None,
    *,
    max_body_bytes: int = 4 * 1024 * 1024,
    allowed_origins: Sequence[str] = (),
    allowed_hosts: set[str] | None = None,
    drain: Drain | None = None,
) -> FastAPI:
    """The front's ASGI app over running replicas (processes, or servers at `url`).

    With `drain`, requests are counted and refused with 503 once it starts draining.
    """
    chooser = ReplicaChooser(len(replicas), policy)
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0))

    async def watch() -> None:
        """Take a replica whose engine has stopped (its /health says 503: a dead
        tensor-parallel rank, corrupt bookkeeping) out of rotation: its server still
        answers, at once and with errors, so least-loaded routing would favour it."""
        while True:
            await asyncio.sleep(_WATCH_INTERVAL_S)
            for replica, load in zip(replicas, chooser.replicas, strict=True):
                if not load.alive:
                    continue
                try:
                    answer = await client.get(replica.url + "/health", timeout=_HEALTH_TIMEOUT_S)
                except Exception:  # busy, or gone: refresh() sees an exit
                    continue
                stopped = answer.status_code == 503 and "engine has stopped" in answer.text
                if stopped and load.alive:
                    load.alive = False
                    logger.error(
                        "replica %d reports its engine stopped: new requests go elsewhere",
                        replica.index,
                    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        watcher = asyncio.create_task(watch())
        yield
        watcher.cancel()
        await client.aclose()

    app = FastAPI(title="pagedllm", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.chooser = chooser
    # the front refuses what a replica would (Host, size, type, key) before reading a body
    install_guards(app, max_body_bytes, api_key, allowed_origins, allowed_hosts, drain)

    def refresh() -> None:
        """Mark replicas whose process has exited as dead (logged once)."""
        for replica, load in zip(replicas, chooser.replicas, strict=True):
            if load.alive and replica.exit_code is not None:
                load.alive = False
                logger.error(
                    "replica %d exited with code %d: its requests fail, new ones go elsewhere",
                    replica.index,
                    replica.exit_code,
                )

    async def healthy(replica: Replica) -> bool:
        if replica.exit_code is not None:
            return False
        try:
            answer = await client.get(replica.url + "/health", timeout=_HEALTH_TIMEOUT_S)
        except httpx.HTTPError:
            return False
        return answer.status_code == 200

    @app.get("/health")
    async def health() -> Response:
        """200 while every replica is alive and healthy; 503 naming the others."""
        refresh()
        ok = await asyncio.gather(*(healthy(r) for r in replicas))
        status = [
            {"replica": r.index, "healthy": up, "exit_code": r.exit_code}
            for r, up in zip(replicas, ok, strict=True)
        ]
        if all(ok):
            return JSONResponse({"status": "ok", "replicas": status})
        down = [
            f"replica {r.index}" + (f" exited with code {r.exit_code}" if r.exit_code else "")
            for r, up in zip(replicas, ok, strict=True)
            if not up
        ]
        body = APIError(503, "unhealthy: " + "; ".join(down)).body()
        return JSONResponse({**body, "replicas": status}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        refresh()

        async def scrape(replica: Replica) -> str:
            if replica.exit_code is not None:
                return ""
            try:
                answer = await client.get(replica.url + "/metrics", timeout=_HEALTH_TIMEOUT_S)
            except httpx.HTTPError:
                return ""
            return answer.text if answer.status_code == 200 else ""

        texts = await asyncio.gather(*(scrape(r) for r in replicas))
        text = sum_metrics(texts) + _front_metrics(chooser)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    async def holder(response_id: str, headers: dict[str, str]) -> int | None:
        """The replica that stores response `response_id`, if one does."""
        for replica, load in zip(replicas, chooser.replicas, strict=True):
            if not load.alive:
                continue
            try:
                url = f"{replica.url}/v1/responses/{response_id}"
                if (await client.get(url, headers=headers)).status_code == 200:
                    return replica.index
            except httpx.HTTPError:
                continue
        return None

    async def where(request: Request, path: str, body: bytes) -> tuple[list[int], int | None]:
        """The prompt's prefix hashes, and the one replica the request must go to, if any."""
        headers = forwarded_headers(request)
        if path.startswith("/v1/responses/"):
            return [], await holder(path.removeprefix("/v1/responses/"), headers)
        if request.method != "POST" or path not in PROMPT_PATHS:
            return [], None
        if policy != "prefix" and path != "/v1/responses":
            return [], None
        try:
            if len(body) <= _INLINE_JSON_BYTES:
                data = json.loads(body)
            else:
                data = await asyncio.to_thread(json.loads, body)
        except (ValueError, RecursionError):  # the replica says what is wrong with it
            return [], None
        only = None
        previous = data.get("previous_response_id") if isinstance(data, dict) else None
        if path == "/v1/responses" and isinstance(previous, str):
            only = await holder(previous, headers)
        return (prefix_hashes(path, data) if policy == "prefix" else []), only

    @app.api_route("/{path:path}", methods=_METHODS)
    async def proxy(request: Request) -> Response:
        path = request.url.path
        body = await request.body()
        hashes, only = await where(request, path, body)
        anthropic = anthropic_route(path)
        target = path + (f"?{request.url.query}" if request.url.query else "")
        while True:
            refresh()
            try:
                load = chooser.choose(hashes, only=only)
            except NoReplicaAlive:
                return APIError(503, "no replica is alive").response(anthropic=anthropic)
            replica = replicas[load.index]
            headers = forwarded_headers(request)
            built = client.build_request(
                request.method, replica.url + target, content=body, headers=headers
            )
            try:
                answer = await client.send(built, stream=True)
            except httpx.ConnectError as e:  # never delivered: another replica may take it
                chooser.done(load)
                await asyncio.sleep(0.1)  # a replica that died is reaped by now
                if replica.exit_code is not None and only is None:
                    continue
                error = APIError(502, f"replica {replica.index} unreachable: {e!r}")
                return error.response(anthropic=anthropic)
            except httpx.HTTPError as e:
                chooser.done(load)
                error = APIError(502, f"replica {replica.index} failed: {e!r}")
                return error.response(anthropic=anthropic)
            return await relay(
                answer, f"replica {replica.index}", functools.partial(chooser.done, load), anthropic
            )

    return app


def run_data_parallel(args: argparse.Namespace) -> int:
    """`pagedllm serve --data-parallel-size N` (N > 1): replicas, then the front, until
    interrupted; the replicas stop with it."""
    import uvicorn

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(levelname)s %(asctime)s %(name)s: %(message)s",
    )
    replicas = start_replicas(args, args.data_parallel_size)
    drain = Drain()
    try:
        try:
            wait_until_healthy(replicas)
        except ReplicaStartError as e:
            raise SystemExit(f"pagedllm serve: error: {e}") from None
        app = build_dp_app(
            replicas,
            args.dp_routing,
            args.api_key,
            max_body_bytes=args.max_request_body_bytes,
            allowed_origins=args.allowed_origins or (),
            allowed_hosts=allowed_hosts_for(args.host, args.allowed_hosts),
            drain=drain,
        )
        logger.info(
            "serving %d replicas (%s routing) on http://%s:%d",
            len(replicas),
            args.dp_routing,
            args.host,
            args.port,
        )
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=max(5, math.ceil(args.drain_timeout)),
        )
        # SIGTERM or Ctrl-C drains the front as it drains a single server (drain.py);
        # the replicas are stopped once it is done
        DrainingServer(config, drain, args.drain_timeout).run()
    finally:
        stop_replicas(replicas, timeout=args.drain_timeout + 10)
    return 0
