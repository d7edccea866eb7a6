"""The `bench serve` client against fake servers: SSE parsing, chunk timing, usage, and
every way a request can fail being recorded rather than raised."""

import asyncio
import itertools
import json

import httpx
import numpy as np
import pytest

from pagedllm.benchmarks.serve_client import (
    SSEDecoder,
    chunk_content,
    error_message,
    poisson_arrivals,
    run_requests,
    sse_events,
    stream_request,
)


def test_sse_events_join_data_lines_and_skip_comments_and_other_fields():
    lines = [
        ": keep-alive",
        "event: message",
        'data: {"a": 1}',
        "",
        "data:first",
        "data: second",
        "id: 7",
        "",
        "",
        "data: [DONE]",
    ]  # the last event is never closed by a blank line
    assert list(sse_events(lines)) == ['{"a": 1}', "first\nsecond", "[DONE]"]


def test_sse_decoder_tolerates_crlf_line_ends():
    decoder = SSEDecoder()
    assert decoder.feed("data: x\r\n") is None
    assert decoder.feed("\r\n") == "x"
    assert decoder.flush() is None


def test_chunk_content_reads_completions_and_chat_deltas():
    assert chunk_content({"choices": [{"index": 0, "text": "Hi"}]}) == "Hi"
    assert chunk_content({"choices": [{"delta": {"content": "Hi"}}]}) == "Hi"
    assert chunk_content({"choices": [{"delta": {"role": "assistant", "content": ""}}]}) == ""
    assert chunk_content({"choices": [{"delta": {"content": None}}]}) == ""
    assert chunk_content({"choices": [], "usage": {"completion_tokens": 3}}) == ""


def test_error_message_prefers_the_openai_error_object():
    body = json.dumps({"error": {"message": "the model 'x' does not exist", "code": 404}})
    assert error_message(404, body) == "HTTP 404: the model 'x' does not exist"
    assert error_message(502, "Bad Gateway") == "HTTP 502: Bad Gateway"
    assert error_message(0, '{"error": "boom"}') == "boom"


def test_poisson_arrivals_are_seeded_and_have_the_requested_rate():
    a = poisson_arrivals(2000, 10.0, seed=3)
    assert a == poisson_arrivals(2000, 10.0, seed=3)
    assert a != poisson_arrivals(2000, 10.0, seed=4)
    assert a[0] == 0.0 and all(x <= y for x, y in itertools.pairwise(a))
    gaps = np.diff(a)
    assert gaps.mean() == pytest.approx(0.1, rel=0.1)  # exponential gaps of mean 1/rate
    assert np.std(gaps) == pytest.approx(0.1, rel=0.15)
    assert poisson_arrivals(3, float("inf"), seed=0) == [0.0, 0.0, 0.0]
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="request-rate"):
            poisson_arrivals(3, bad, seed=0)


def sse_body(*payloads, done=True):
    """An async SSE byte stream, one event per payload, 10 ms apart."""

    async def gen():
        for p in payloads:
            await asyncio.sleep(0.01)
            yield f"data: {json.dumps(p)}\n\n".encode()
        if done:
            yield b"data: [DONE]\n\n"

    return gen()


def text_chunk(text):
    return {"choices": [{"index": 0, "text": text, "finish_reason": None}]}


def fake_client(handler) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://fake")


def send(handler, timeout=5.0):
    async def go():
        async with fake_client(handler) as client:
            return await stream_request(client, "/v1/completions", {"prompt": [1]}, 4, timeout)

    return asyncio.run(go())


def test_a_streamed_request_times_every_content_chunk_and_reads_usage():
    usage = {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    chunks = [text_chunk("a"), text_chunk(""), text_chunk("b"), text_chunk("c")]

    def handler(request):
        assert json.loads(request.content) == {"prompt": [1]}
        return httpx.Response(200, content=sse_body(*chunks, {"choices": [], "usage": usage}))

    r = send(handler)
    assert r.success and r.error == ""
    assert len(r.chunk_times) == 3  # the empty chunk is not content
    assert r.output_tokens == 5 and r.prompt_tokens == 4  # usage wins over counting chunks
    assert 0 < r.ttft < r.e2e
    assert len(r.itls) == 2 and all(gap > 0.005 for gap in r.itls)
    assert r.tpot == pytest.approx((r.e2e - r.ttft) / 4)


def test_without_usage_each_content_chunk_counts_as_a_token():
    r = send(lambda req: httpx.Response(200, content=sse_body(text_chunk("a"), text_chunk("b"))))
    assert r.success and r.output_tokens == 2 and r.prompt_tokens is None


@pytest.mark.parametrize(
    ("handler", "error"),
    [
        (
            lambda req: httpx.Response(404, json={"error": {"message": "no such model"}}),
            "HTTP 404: no such model",
        ),
        (
            lambda req: httpx.Response(
                200, content=sse_body(text_chunk("a"), {"error": {"message": "engine died"}})
            ),
            "engine died",
        ),
        (
            lambda req: httpx.Response(200, content=sse_body(text_chunk("a"), done=False)),
            "the stream ended before [DONE]",
        ),
    ],
    ids=["http-error", "error-event", "no-done"],
)
def test_a_failed_request_is_recorded_not_raised(handler, error):
    r = send(handler)
    assert not r.success and r.error == error


def test_a_refused_connection_and_a_timeout_are_failures():
    def refuse(request):
        raise httpx.ConnectError("connection refused")

    r = send(refuse)
    assert not r.success and "ConnectError" in r.error

    async def slow(request):
        await asyncio.sleep(5)
        return httpx.Response(200, content=b"")

    r = send(slow, timeout=0.05)
    assert not r.success and r.error == "timed out after 0.05 s"
    assert r.e2e < 1


def test_max_concurrency_caps_requests_in_flight():
    in_flight = peak = 0

    async def handler(request):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return httpx.Response(200, content=sse_body(text_chunk("a")))

    ended = []

    async def go(limit):
        async with fake_client(handler) as client:
            payloads = [({"prompt": [i]}, 1) for i in range(6)]
            return await run_requests(
                client, "/v1/completions", payloads, [0.0] * 6, limit, 5.0, ended.append
            )

    run = asyncio.run(go(2))
    assert all(r.success for r in run.results) and len(run.results) == 6
    assert sorted(map(id, ended)) == sorted(map(id, run.results))  # each heard of once
    assert run.max_concurrency == 2 and peak == 2
    peak = 0
    assert asyncio.run(go(None)).max_concurrency == 6


def test_requests_wait_for_their_arrival_time():
    async def go():
        async with fake_client(
            lambda req: httpx.Response(200, content=sse_body(text_chunk("a")))
        ) as client:
            payloads = [({"prompt": [1]}, 1)] * 2
            return await run_requests(client, "/v1/completions", payloads, [0.0, 0.15], None, 5.0)

    run = asyncio.run(go())
    first, second = run.results
    assert second.start - first.start == pytest.approx(0.15, abs=0.05)
    assert run.duration_s >= 0.15
