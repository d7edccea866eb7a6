"""Faults under a real server: KV exhaustion, requests that can never fit, one request failing.

The engine has a tiny KV pool (8 blocks of 16 tokens) and runs with the debug
invariants on, so every step of every scenario re-checks the block bookkeeping.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest

from tests.entrypoints.conftest import MODEL, ServerThread, metric_value, start_engine, wait_for

pytestmark = pytest.mark.slow

NUM_BLOCKS = 8  # 128 token slots
MAX_MODEL_LEN = 512  # longer than the pool: a request can fit the context but not the pool


@pytest.fixture(scope="module")
def llm():
    llm = start_engine(num_kv_blocks=NUM_BLOCKS, max_model_len=MAX_MODEL_LEN)
    llm.engine.debug_invariants = True
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def url(llm) -> Iterator[str]:
    from pagedllm.entrypoints.openai.api_server import build_app

    with ServerThread(build_app(llm, [MODEL])) as running:
        yield running.url


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def metrics(url: str) -> str:
    return httpx.get(url + "/metrics").text


def assert_idle(url: str, llm) -> None:
    """Nothing running or waiting, and every block back in the pool."""

    def idle() -> bool:
        text = metrics(url)
        return (
            metric_value(text, "pagedllm:num_requests_running") == 0
            and metric_value(text, "pagedllm:num_requests_waiting") == 0
            and metric_value(text, "pagedllm:kv_cache_usage_perc") == 0
        )

    assert wait_for(idle, timeout=10)
    assert llm.is_running, llm.dead_error


async def completions(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))


def test_kv_exhaustion_is_resolved_by_preemption_and_loses_nothing(url, llm):
    before = metric_value(metrics(url), "pagedllm:num_preemptions_total")
    # Each needs 3 blocks at the end (about 8 prompt + 40 output tokens): 4 need 12 of 8.
    bodies = [
        {"prompt": f"Count to ten, take {i}:", "max_tokens": 40, "ignore_eos": True}
        for i in range(4)
    ]
    responses = asyncio.run(completions(url, bodies))
    for r in responses:
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 40
    assert metric_value(metrics(url), "pagedllm:num_preemptions_total") > before
    assert_idle(url, llm)


@pytest.mark.parametrize(
    "body,message",
    [
        # fits max_model_len, not the pool
        ({"prompt": "Hello", "max_tokens": 300}, "needs up to 19 KV-cache blocks"),
        # the prompt alone overflows the pool
        ({"prompt": "word " * 250, "max_tokens": 1}, "the whole KV cache holds 128"),
    ],
    ids=["max_tokens", "prompt"],
)
def test_a_request_larger_than_the_pool_is_refused_with_400(url, llm, body, message):
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    error = assert_openai_error(r, 400)
    assert message in error["message"]
    assert_idle(url, llm)


def test_without_max_tokens_a_chat_stops_where_the_pool_ends(url, llm):
    """Regression: with a pool smaller than max_model_len every request without
    max_tokens was refused (max_tokens defaulted to the rest of the context)."""
    body = {"messages": [{"role": "user", "content": "Hi"}], "ignore_eos": True}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == NUM_BLOCKS * 16 + 1
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert_idle(url, llm)


@pytest.fixture
def poisoned(llm, monkeypatch) -> str:
    """A prompt whose detokenizer raises after two output tokens."""
    from pagedllm.engine import detokenizer

    prompt = "Tell me a poisoned story"
    ids = llm.tokenizer.encode(prompt)
    real_init = detokenizer.IncrementalDetokenizer.__init__
    real_update = detokenizer.IncrementalDetokenizer.update

    def init(self, tokenizer, prompt_token_ids, params):
        real_init(self, tokenizer, prompt_token_ids, params)
        self.poisoned = list(prompt_token_ids) == ids

    def update(self, new_token_ids, **kwargs):
        if getattr(self, "poisoned", False) and len(self.output_token_ids) >= 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return real_update(self, new_token_ids, **kwargs)

    monkeypatch.setattr(detokenizer.IncrementalDetokenizer, "__init__", init)
    monkeypatch.setattr(detokenizer.IncrementalDetokenizer, "update", update)
    return prompt


def sse_events(text: str) -> list[object]:
    events = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_a_failure_in_one_request_fails_it_alone_with_500(url, llm, poisoned):
    base = {"max_tokens": 12, "ignore_eos": True}
    bodies = [
        {"prompt": poisoned, **base},
        {"prompt": poisoned, "stream": True, **base},
        {"prompt": "Paris is the capital of", **base},
        {"prompt": "1, 2, 3,", "stream": True, **base},
    ]
    bad, bad_stream, good, good_stream = asyncio.run(completions(url, bodies))
    error = assert_openai_error(bad, 500)
    assert "injected" in error["message"]

    assert bad_stream.status_code == 200
    events = sse_events(bad_stream.text)
    assert events[-1] == "[DONE]"
    assert set(events[-2]) == {"error"} and "injected" in events[-2]["error"]["message"]
    assert all("choices" in e for e in events[:-2])

    assert good.status_code == 200
    assert good.json()["usage"]["completion_tokens"] == 12
    events = sse_events(good_stream.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert_idle(url, llm)
