"""vLLM's extra request fields over HTTP: prompt_logprobs (completions and chat) and
chat_template_kwargs."""

from __future__ import annotations

import math

import httpx
import pytest

from pagedllm.tokenizer import load_tokenizer
from tests.entrypoints.conftest import MODEL


def post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{route}", json={"model": MODEL, **body}, timeout=60)


def test_completion_prompt_logprobs_score_every_prompt_token(server):
    tokenizer = load_tokenizer(None)
    prompt = "The capital of France is Paris"
    ids = tokenizer.encode(prompt)
    reply = post(server, "completions", {"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 2})
    assert reply.status_code == 200, reply.text
    entries = reply.json()["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    for token_id, entry in zip(ids[1:], entries[1:], strict=True):
        assert str(token_id) in entry  # the prompt's own token, whatever its rank
        assert 2 <= len(entry) <= 3
        assert all(v["logprob"] <= 0 and math.isfinite(v["logprob"]) for v in entry.values())
        ranks = sorted(v["rank"] for v in entry.values())
        assert ranks[:2] == [1, 2]
    # the model knows this one: " Paris" is its first choice after "is"
    paris = entries[-1][str(ids[-1])]
    assert paris["rank"] == 1 and paris["decoded_token"].strip() == "Paris"


def test_chat_prompt_logprobs_and_no_streaming(server):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "prompt_logprobs": 0}
    reply = post(server, "chat/completions", body)
    assert reply.status_code == 200, reply.text
    entries = reply.json()["prompt_logprobs"]
    assert entries[0] is None and all(len(e) == 1 for e in entries[1:])
    refused = post(server, "chat/completions", {**body, "stream": True})
    assert refused.status_code == 400 and "prompt_logprobs" in refused.json()["error"]["message"]
    refused = post(server, "completions", {"prompt": "x", "prompt_logprobs": 1, "stream": True})
    assert refused.status_code == 400


def test_chat_template_kwargs_reach_the_template_but_not_its_conversation(server):
    tokenizer = load_tokenizer(None)
    template = "{{ greeting }}|{% for m in messages %}{{ m.content }}{% endfor %}"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}],
        chat_template=template,
        extra_variables={"greeting": "hi"},
    )
    assert text == "hi|x"
    with pytest.raises(ValueError, match="may not set"):
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}],
            chat_template=template,
            extra_variables={"messages": []},
        )
    reply = post(
        server,
        "chat/completions",
        {
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 2,
            "chat_template_kwargs": {"enable_thinking": False},
        },
    )
    assert reply.status_code == 200, reply.text
    reply = post(
        server,
        "chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "chat_template_kwargs": {"tools": 1}},
    )
    assert reply.status_code == 400 and "may not set" in reply.json()["error"]["message"]
