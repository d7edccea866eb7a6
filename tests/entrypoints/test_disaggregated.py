"""Prefill/decode disaggregation on one machine: a producer and a consumer engine, each
behind its own server, and `pagedllm router` in front. The pair answers exactly as one
instance answers a prompt whose prefix it has cached (the same KV, the same last
rows computed); a producer that cannot be reached costs only the recomputation."""

from __future__ import annotations

import httpx
import pytest

from pagedllm.entrypoints.openai.api_server import build_app
from pagedllm.entrypoints.router import build_router_app
from tests.conftest import ENGLISH
from tests.entrypoints.conftest import MODEL, ServerThread, start_engine

pytestmark = pytest.mark.slow

PROMPTS = [ENGLISH[:400], ENGLISH[200:700], "Paris is the capital of France. " * 6]


@pytest.fixture(scope="module")
def pair():
    producer = start_engine(kv_transfer_config={"kv_role": "kv_producer", "kv_port": 0})
    port = producer.engine.kv_connector.port
    # the consumer trusts the producer, and one that is down (port 1: nothing listens)
    trusted = [f"127.0.0.1:{port}", "127.0.0.1:1"]
    consumer = start_engine(kv_transfer_config={"kv_role": "kv_consumer", "kv_producers": trusted})
    try:
        with (
            ServerThread(build_app(producer, [MODEL])) as prefill,
            ServerThread(build_app(consumer, [MODEL])) as decode,
            ServerThread(build_router_app([prefill.url], [decode.url])) as router,
        ):
            yield {
                "router": router,
                "decode": decode,
                "prefill": prefill,
                "consumer": consumer,
                "producer": producer,
            }
    finally:
        for engine in (producer, consumer):
            engine.shutdown()


def complete(url: str, prompt: str, **extra) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, **extra}
    answer = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()


def metric(engine, name: str) -> float:
    return engine.engine.get_metrics()[name]


def test_the_pair_answers_as_one_instance_with_the_prefix_cached(pair):
    router, alone = pair["router"].url, pair["prefill"].url
    for prompt in PROMPTS:
        answer = complete(router, prompt)
        # the prefill instance computed the prompt for the router; answering it alone
        # now, it hits its prefix cache: the same KV, the same last rows computed
        expected = complete(alone, prompt)["choices"][0]["text"]
        assert answer["choices"][0]["text"] == expected
        assert "kv_transfer_params" not in answer  # the decode instance answered
        assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16
    consumer, producer = pair["consumer"], pair["producer"]
    assert metric(consumer, "kv_transfer_blocks_loaded_remote") >= len(PROMPTS)
    assert metric(consumer, "kv_transfer_load_failures") == 0
    assert metric(producer, "kv_transfer_blocks_saved") >= metric(
        consumer, "kv_transfer_blocks_loaded_remote"
    )


def test_streamed_chat_through_the_router_equals_the_whole_answer(pair):
    router = pair["router"].url
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": ENGLISH[:300] + " Summarize."}],
        "max_tokens": 10,
        "temperature": 0,
    }
    whole = httpx.post(router + "/v1/chat/completions", json=body, timeout=120).json()
    text = ""
    with httpx.stream(
        "POST", router + "/v1/chat/completions", json={**body, "stream": True}, timeout=120
    ) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("data: {"):
                chunk = httpx.Response(200, content=line[6:]).json()
                for choice in chunk["choices"]:
                    text += choice["delta"].get("content") or ""
    assert text == whole["choices"][0]["message"]["content"]


def test_a_producer_that_cannot_be_reached_costs_only_recomputation(pair):
    decode, consumer = pair["decode"].url, pair["consumer"]
    failures = metric(consumer, "kv_transfer_load_failures")
    gone = {"remote_host": "127.0.0.1", "remote_port": 1}  # trusted, but down
    prompt = ENGLISH[50:500]
    computed = complete(pair["prefill"].url, prompt)["choices"][0]["text"]  # no prefix hit
    answer = complete(decode, prompt, kv_transfer_params=gone)
    assert "prompt_tokens_details" not in answer["usage"]  # nothing cached: recomputed
    assert metric(consumer, "kv_transfer_load_failures") == failures + 1
    assert answer["choices"][0]["text"] == computed
    pool = consumer.engine.scheduler.kv_cache_manager
    assert not pool.block_pool.get_usage()  # nothing held once it answered


def test_a_client_cannot_name_the_producer(pair, caplog):
    """Params naming a producer the consumer does not trust are ignored (it could fill
    the prefix cache with made-up KV), and the router drops a client's own params."""
    decode, consumer = pair["decode"].url, pair["consumer"]
    loads = metric(consumer, "kv_transfer_loads")
    rogue = {"remote_host": "127.0.0.1", "remote_port": 2}
    prompt = ENGLISH[100:520]
    answer = complete(decode, prompt, kv_transfer_params=rogue)
    assert "prompt_tokens_details" not in answer["usage"] and "not in kv_producers" in caplog.text
    assert metric(consumer, "kv_transfer_loads") == loads  # never connected
    through_router = complete(pair["router"].url, ENGLISH[130:560], kv_transfer_params=rogue)
    assert through_router["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16


def test_the_router_survives_a_dead_prefill_instance_and_bad_bodies(pair):
    with ServerThread(build_router_app(["http://127.0.0.1:1"], [pair["decode"].url])) as router:
        answer = complete(router.url, PROMPTS[0])
        assert answer["choices"][0]["text"]
        bad = httpx.post(router.url + "/v1/completions", content=b"{nope", timeout=10)
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        assert httpx.get(router.url + "/health", timeout=10).status_code == 503
    assert httpx.get(pair["router"].url + "/health", timeout=10).status_code == 200
    assert httpx.get(pair["prefill"].url + "/health", timeout=10).status_code == 200


def test_the_producer_names_its_kv_server_in_each_answer(pair):
    answer = complete(pair["prefill"].url, PROMPTS[2], max_tokens=1)
    params = answer["kv_transfer_params"]
    assert params["remote_host"] == "127.0.0.1" and params["remote_port"] > 0
