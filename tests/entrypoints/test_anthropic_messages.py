"""Anthropic's Messages API through the official `anthropic` client: the same greedy text
as chat completions for the same conversation, streamed and not, stop reasons, usage,
count_tokens, x-api-key, and errors in Anthropic's shape."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from tests.entrypoints.conftest import MODEL, ServerThread

SYSTEM = "You are a helpful assistant."
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# the client's newest releases dropped temperature from create(); the API still takes it
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def claude(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


def chat_text(server, max_tokens: int) -> str:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": SYSTEM}, *QUESTION],
        max_tokens=max_tokens,
        temperature=0,
    )
    return reply.choices[0].message.content


def test_create_gives_chat_completions_greedy_text(server, claude):
    message = claude.messages.create(
        model=MODEL, max_tokens=24, system=SYSTEM, messages=QUESTION, extra_body=GREEDY
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text"
    assert message.content[0].text == chat_text(server, 24)
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.output_tokens > 0
    counted = claude.messages.count_tokens(model=MODEL, system=SYSTEM, messages=QUESTION)
    assert message.usage.input_tokens == counted.input_tokens > 10


def test_stream_gives_the_same_text_and_anthropics_events(claude):
    kwargs = dict(model=MODEL, max_tokens=16, system=SYSTEM, messages=QUESTION, extra_body=GREEDY)
    whole = claude.messages.create(**kwargs)
    with claude.messages.stream(**kwargs) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == whole.content[0].text
    assert final.content[0].text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    raw = claude.messages.create(stream=True, **kwargs)
    names = [e.type for e in raw]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) == {"content_block_delta"}


def test_stop_reasons(claude):
    cut = claude.messages.create(model=MODEL, max_tokens=2, messages=QUESTION)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 2
    text = (
        claude.messages.create(model=MODEL, max_tokens=30, messages=QUESTION, extra_body=GREEDY)
        .content[0]
        .text
    )
    word = text.split()[1]
    stopped = claude.messages.create(
        model=MODEL, max_tokens=30, messages=QUESTION, extra_body=GREEDY, stop_sequences=[word]
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == word
    assert word not in stopped.content[0].text


def test_errors_take_anthropics_shape(server, claude):
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(model=MODEL, max_tokens=0, messages=QUESTION)
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in info.value.body["error"]["message"]
    reply = httpx.post(server.url + "/v1/messages", json={"model": MODEL, "messages": QUESTION})
    assert reply.status_code == 400
    assert reply.json()["type"] == "error" and "max_tokens" in reply.json()["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as info:
        claude.messages.create(model="nope", max_tokens=5, messages=QUESTION)
    assert info.value.body["error"]["type"] == "not_found_error"
    image = [{"role": "user", "content": [{"type": "image", "source": {}}]}]
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model=MODEL, max_tokens=5, messages=image)


def test_x_api_key_is_accepted_beside_bearer(async_llm):
    from pagedllm.entrypoints.openai.api_server import build_app

    with ServerThread(build_app(async_llm, [MODEL], api_key="sesame")) as keyed:
        good = anthropic.Anthropic(base_url=keyed.url, api_key="sesame", max_retries=0)
        assert good.messages.create(model=MODEL, max_tokens=2, messages=QUESTION).content
        bad = anthropic.Anthropic(base_url=keyed.url, api_key="wrong", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as info:
            bad.messages.create(model=MODEL, max_tokens=2, messages=QUESTION)
        assert info.value.body["error"]["type"] == "authentication_error"
        bearer = httpx.post(
            keyed.url + "/v1/messages",
            json={"model": MODEL, "max_tokens": 2, "messages": QUESTION},
            headers={"Authorization": "Bearer sesame"},
        )
        assert bearer.status_code == 200


def test_count_tokens_errors_take_anthropics_shape(server):
    reply = httpx.post(server.url + "/v1/messages/count_tokens", json={"model": MODEL})
    assert reply.status_code == 400
    body = reply.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "messages" in body["error"]["message"]
