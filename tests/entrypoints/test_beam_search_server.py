"""Beam search over HTTP (vLLM's `use_beam_search`, `length_penalty`): the server's
answers are the offline `LLM.beam_search` answers, whole and streamed, on both routes;
fields the search cannot honour are refused by name; a client that leaves frees the
beams."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from pagedllm.sampling_params import BeamSearchParams
from tests.entrypoints.conftest import MODEL, TEST_ENGINE_ARGS, ServerThread, start_engine
from tests.entrypoints.test_faults import assert_idle

pytestmark = pytest.mark.slow

PROMPT = "The three most useful things to pack for a long hike are"
MESSAGES = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def exact():
    """A server and an offline LLM on the exact float32 path, so that both compute the
    same logits whatever the batch around them."""
    from pagedllm import LLM
    from pagedllm.entrypoints.openai.api_server import build_app

    llm = start_engine(exact_matmul=True)
    with ServerThread(build_app(llm, [MODEL])) as running:
        yield running.url, llm, LLM(**TEST_ENGINE_ARGS, exact_matmul=True)
    llm.shutdown()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused")


def post(url: str, route: str, body: dict, timeout: httpx.Timeout | float = 120) -> httpx.Response:
    return httpx.post(f"{url}/v1/{route}", json={"model": MODEL, **body}, timeout=timeout)


def streamed_texts(url: str, route: str, body: dict, n: int) -> list[str]:
    texts = [""] * n
    with httpx.stream(
        "POST", f"{url}/v1/{route}", json={"model": MODEL, **body, "stream": True}, timeout=120
    ) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    piece = choice.get("text") or choice.get("delta", {}).get("content")
                    texts[choice["index"]] += piece or ""
    return texts


def test_completions_answer_the_offline_search_best_first(exact):
    url, server_llm, offline = exact
    params = BeamSearchParams(3, 10, length_penalty=0.5)
    (expected,) = offline.beam_search([PROMPT], params)
    body = {
        "prompt": PROMPT,
        "n": 3,
        "max_tokens": 10,
        "use_beam_search": True,
        "length_penalty": 0.5,
    }
    answer = client(url).completions.create(
        model=MODEL,
        prompt=PROMPT,
        n=3,
        max_tokens=10,
        extra_body={"use_beam_search": True, "length_penalty": 0.5},
    )
    got = [c.text for c in answer.choices]
    assert got == [s.text for s in expected.sequences]
    assert len(set(got)) == 3
    assert [c.finish_reason for c in answer.choices] == [
        s.finish_reason for s in expected.sequences
    ]
    assert answer.usage.completion_tokens == sum(len(s.tokens) for s in expected.sequences)
    assert streamed_texts(url, "completions", body, 3) == got
    assert_idle(url, server_llm)


def test_chat_answers_the_offline_search_on_the_rendered_conversation(exact):
    url, server_llm, offline = exact
    tokenizer = offline.get_tokenizer()
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    (expected,) = offline.beam_search({"prompt_token_ids": prompt_ids}, BeamSearchParams(2, 12))
    body = {"messages": MESSAGES, "n": 2, "max_tokens": 12, "use_beam_search": True}
    answer = client(url).chat.completions.create(
        model=MODEL, messages=MESSAGES, n=2, max_tokens=12, extra_body={"use_beam_search": True}
    )
    got = [c.message.content for c in answer.choices]
    assert got == [s.text for s in expected.sequences]
    assert streamed_texts(url, "chat/completions", body, 2) == got
    assert_idle(url, server_llm)


def test_a_client_that_leaves_mid_search_frees_every_beam(exact):
    url, server_llm, _ = exact
    body = {"prompt": PROMPT, "n": 4, "max_tokens": 1000, "use_beam_search": True}
    with pytest.raises(httpx.ReadTimeout):
        post(url, "completions", body, timeout=httpx.Timeout(120, read=1.0))
    assert_idle(url, server_llm)


@pytest.mark.parametrize(
    ("route", "field", "value"),
    [
        ("completions", "logprobs", 2),
        ("completions", "temperature", 0.7),
        ("completions", "stop", ["\n"]),
        ("completions", "top_p", 0.5),
        ("chat", "logprobs", True),
        ("chat", "response_format", {"type": "json_object"}),
    ],
)
def test_fields_beam_search_cannot_honour_are_refused_by_name(server, route, field, value):
    if route == "chat":
        path, body = "chat/completions", {"messages": MESSAGES}
    else:
        path, body = "completions", {"prompt": "x"}
    reply = post(server.url, path, {**body, "max_tokens": 2, "use_beam_search": True, field: value})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert "use_beam_search" in error["message"]
    assert error["param"] == ("structured_outputs" if field == "response_format" else field)
    # neutral values are fine
    ok = post(
        server.url, path, {**body, "max_tokens": 2, "use_beam_search": True, "temperature": 0}
    )
    assert ok.status_code == 200, ok.text


def test_length_penalty_without_beam_search_is_refused(server):
    reply = post(server.url, "completions", {"prompt": "x", "length_penalty": 0.5})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "length_penalty"
