"""SIGTERM drains `pagedllm serve`: streams in flight finish, new requests get 503, exit 0."""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
import pytest

from benchmarks.load_test import ServeProcess

pytestmark = pytest.mark.slow

DRAIN_TIMEOUT = 4.0


async def stream(client: httpx.AsyncClient, max_tokens: int, started: asyncio.Event) -> list:
    """The events of one streamed completion; sets `started` at the first."""
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True}
    events = []
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
                started.set()
    return events


async def drain_scenario(server: ServeProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        started = [asyncio.Event() for _ in range(3)]
        # Two short streams finish within the drain; the long one outlasts it (1,000
        # tokens take over 4 s on any CPU).
        tasks = [
            asyncio.create_task(stream(client, tokens, ev))
            for tokens, ev in zip((12, 12, 1000), started, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)

        async with httpx.AsyncClient(base_url=server.url, timeout=10) as fresh:
            r = await fresh.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "server_shutting_down"
            assert (await fresh.get("/health")).status_code == 503
            assert (await fresh.get("/metrics")).status_code == 200  # still observable

        short1, short2, long = await asyncio.wait_for(asyncio.gather(*tasks), DRAIN_TIMEOUT + 30)
    for events in (short1, short2):
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert sum(len(e["choices"][0]["text"]) > 0 for e in events[:-1]) > 1
    # Past the drain timeout the engine stops: a clean error event, then the end.
    assert long[-1] == "[DONE]"
    assert set(long[-2]) == {"error"} and long[-2]["error"]["message"]


def test_sigterm_drains_in_flight_streams_refuses_new_ones_and_exits_0():
    serve = ("--device", "cpu", "--dtype", "float32", "--max-model-len", "1024")
    serve += ("--num-kv-blocks", "80")
    with ServeProcess(*serve, "--drain-timeout", str(DRAIN_TIMEOUT)) as server:
        asyncio.run(drain_scenario(server))
        status = server.proc.wait(30)
        log = server.output()
    assert status == 0, log
    assert "SIGTERM: draining 3 requests in flight" in log
    assert "drain timeout: ending 1 requests in flight" in log
