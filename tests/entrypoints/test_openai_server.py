"""The OpenAI-compatible server end to end, driven by the official `openai` client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

import pagedllm
from tests.entrypoints.conftest import MODEL, ServerThread, metric_value, wait_for

pytestmark = pytest.mark.slow

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].object == "model"


def test_completion_returns_text_usage_and_finish_reason(client):
    r = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0
    )
    choice = r.choices[0]
    assert r.object == "text_completion" and r.model == MODEL
    assert choice.text and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6


def test_completion_takes_token_ids_and_lists_of_prompts(client, async_llm):
    ids = async_llm.tokenize_prompt("Once upon a time")
    by_text = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0
    )
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    many = client.completions.create(
        model=MODEL, prompt=["Once upon a time", "1, 2, 3,"], max_tokens=5, temperature=0, n=2
    )
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == by_text.choices[0].text
    assert many.usage.completion_tokens == 20


def test_echo_prepends_the_prompt_and_scores_it(client):
    prompt = "Paris is the capital of"
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2
    )
    choice = r.choices[0]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) for x in lp.token_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_chat_completion(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, seed=3)
    choice = r.choices[0]
    assert r.object == "chat.completion"
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 10 and 0 < r.usage.completion_tokens <= 8


def test_max_completion_tokens_wins_over_max_tokens(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=20,
        max_completion_tokens=3,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_streamed_chat_concatenates_to_the_same_text(client):
    kwargs = {"model": MODEL, "messages": CHAT, "max_tokens": 24, "seed": 11, "temperature": 0.9}
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_a_client_that_stops_at_the_first_finish_reason_gets_every_token(server, route):
    """The finish_reason comes in a chunk of its own, with an empty delta, after the
    last text (as OpenAI, vLLM and llama-server stream): a reader that stops at the
    first non-null finish_reason has the whole text. Every answer carries a
    system_fingerprint."""
    body = {"model": MODEL, "max_tokens": 12, "temperature": 0, "n": 2}
    body |= {"messages": CHAT} if "chat" in route else {"prompt": "The capital of France is"}
    whole = httpx.post(server.url + route, json=body, timeout=60).json()
    assert whole["system_fingerprint"].startswith(f"pagedllm-{pagedllm.__version__}-")
    texts = {0: "", 1: ""}
    ended: set[int] = set()
    with httpx.stream("POST", server.url + route, json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert chunk["system_fingerprint"] == whole["system_fingerprint"]
            for choice in chunk["choices"]:
                if choice["index"] in ended:
                    continue
                if choice["finish_reason"] is not None:  # the reader stops reading it here
                    ended.add(choice["index"])
                    assert choice.get("delta", {}) == {} and choice.get("text", "") == ""
                    continue
                piece = choice["delta"].get("content") if "chat" in route else choice["text"]
                texts[choice["index"]] += piece or ""
    assert ended == {0, 1}
    for choice in whole["choices"]:
        expected = choice["message"]["content"] if "chat" in route else choice["text"]
        assert texts[choice["index"]] == expected and expected


def test_stream_include_usage_ends_with_a_usage_chunk(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 5
    assert last.usage.total_tokens == last.usage.prompt_tokens + 5
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_stream_is_sse_ending_with_done(server):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert {c["object"] for c in chunks} == {"text_completion"}


def test_n_returns_that_many_choices(client):
    r = client.chat.completions.create(
        model=MODEL, messages=CHAT, n=3, max_tokens=6, seed=5, temperature=1.0
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    streamed = list(
        client.chat.completions.create(
            model=MODEL, messages=CHAT, n=3, max_tokens=6, seed=5, temperature=1.0, stream=True
        )
    )
    texts = {i: "" for i in range(3)}
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == {c.index: c.message.content for c in r.choices}


def test_stop_string_ends_the_completion_without_it(client):
    base = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0
    ).choices[0]
    assert " 6" in base.text
    r = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 6"]
    ).choices[0]
    assert r.finish_reason == "stop" and r.text == base.text[: base.text.index(" 6")]
    kept = client.completions.create(
        model=MODEL,
        prompt="1, 2, 3, 4,",
        max_tokens=12,
        temperature=0,
        stop=" 6",
        extra_body={"include_stop_str_in_output": True},
    ).choices[0]
    assert kept.text == r.text + " 6"


def test_chat_logprobs_with_top_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=5, logprobs=True, top_logprobs=3, temperature=0
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert [x.logprob for x in t.top_logprobs] == sorted(
            (x.logprob for x in t.top_logprobs), reverse=True
        )
        assert bytes(t.bytes).decode() == t.token


def test_vllm_sampling_fields_are_accepted(client):
    r = client.completions.create(
        model=MODEL,
        prompt="Hello",
        max_tokens=4,
        extra_body={
            "top_k": 5,
            "min_p": 0.05,
            "repetition_penalty": 1.2,
            "min_tokens": 4,
            "ignore_eos": True,
            "stop_token_ids": [2],
            "logit_bias": {"42": 5.0},
        },
    )
    assert r.usage.completion_tokens == 4


def test_aborted_stream_frees_its_request_and_blocks(server, client):
    stream = client.completions.create(
        model=MODEL,
        prompt="Write a long story about a dragon.",
        max_tokens=1000,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()  # the client hangs up mid-stream

    def idle() -> bool:
        text = httpx.get(server.url + "/metrics").text
        return (
            metric_value(text, "pagedllm:num_requests_running") == 0
            and metric_value(text, "pagedllm:kv_cache_usage_perc") == 0
        )

    assert wait_for(idle, timeout=10)


def test_metrics_export_the_documented_names(server, client):
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "time_to_first_token_seconds_bucket",
        "inter_token_latency_seconds_bucket",
        "time_per_output_token_seconds_bucket",
        "e2e_request_latency_seconds_bucket",
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "num_preemptions_total",
        "prompt_tokens_total",
        "generation_tokens_total",
        "prefix_cache_queries_total",
        "prefix_cache_hits_total",
    ):
        assert f"pagedllm:{name}" in text, name
    assert metric_value(text, "pagedllm:generation_tokens_total") >= 3
    assert metric_value(text, "pagedllm:e2e_request_latency_seconds_count") >= 1


def test_health_version_tokenize_detokenize(server, async_llm):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json() == {"version": pagedllm.__version__}
    r = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert r["tokens"] == async_llm.tokenize_prompt("Hello world")
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 2048
    back = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back == {"prompt": "Hello world"}
    chat = httpx.post(server.url + "/tokenize", json={"messages": CHAT}).json()
    assert chat["count"] > r["count"]


def test_non_streaming_request_is_aborted_when_its_client_leaves(server):
    def aborted() -> float:
        text = httpx.get(server.url + "/metrics").text
        lines = [line for line in text.splitlines() if 'finished_reason="abort"' in line]
        counts = [line for line in lines if line.startswith("pagedllm:request_success_total")]
        return sum(float(line.rsplit(" ", 1)[1]) for line in counts)

    before = aborted()
    body = {"model": MODEL, "prompt": "Count:", "max_tokens": 1000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=1.0)

    def idle() -> bool:
        text = httpx.get(server.url + "/metrics").text
        return (
            metric_value(text, "pagedllm:num_requests_running") == 0
            and metric_value(text, "pagedllm:kv_cache_usage_perc") == 0
        )

    # 1000 tokens take many seconds: ending within a few means it was aborted
    assert wait_for(lambda: aborted() == before + 1, timeout=5)
    assert wait_for(idle, timeout=5)


@pytest.fixture(scope="module")
def page_server(async_llm, tmp_path_factory):
    from pagedllm.entrypoints.openai.api_server import build_app

    webui = tmp_path_factory.mktemp("webui")
    (webui / "index.html").write_text("<!doctype html><title>chat</title>")
    (webui / "static").mkdir()
    (webui / "static" / "app.js").write_text("console.log(1)")
    app = build_app(
        async_llm, [MODEL], api_key="k", allowed_origins=["http://example.com"], webui_dir=webui
    )
    with ServerThread(app) as running:
        yield running


def test_web_page_and_static_files_are_served_without_a_key(page_server):
    r = httpx.get(page_server.url + "/")
    assert r.status_code == 200 and "<title>chat</title>" in r.text
    assert r.headers["content-type"].startswith("text/html")
    assert httpx.get(page_server.url + "/static/app.js").text == "console.log(1)"


def test_cors_is_off_by_default_and_on_for_allowed_origins(server, page_server):
    origin = {"Origin": "http://example.com"}
    assert (
        "access-control-allow-origin"
        not in httpx.get(server.url + "/v1/models", headers=origin).headers
    )
    preflight = httpx.options(
        page_server.url + "/v1/chat/completions",
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200  # no key needed to ask
    assert preflight.headers["access-control-allow-origin"] == "http://example.com"
    r = httpx.get(page_server.url + "/v1/models", headers={**origin, "Authorization": "Bearer k"})
    assert r.headers["access-control-allow-origin"] == "http://example.com"
