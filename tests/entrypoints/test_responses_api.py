"""OpenAI's Responses API through the official openai client: the same greedy text as chat
completions, streamed and not; instructions, max_output_tokens, JSON schemas, tools,
stored responses with previous_response_id and retrieval, and errors."""

from __future__ import annotations

import json

import openai
import pytest

from tests.entrypoints.conftest import MODEL

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_create_gives_chat_completions_greedy_text(client):
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": QUESTION},
        ],
        max_tokens=20,
        temperature=0,
    )
    response = client.responses.create(
        model=MODEL, input=QUESTION, instructions="Be brief.", max_output_tokens=20, temperature=0
    )
    assert response.output_text == chat.choices[0].message.content
    assert response.status in ("completed", "incomplete")
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens


def test_stream_gives_the_same_text(client):
    # (a prompt without near ties: a prefix-cache hit computes the last prompt rows in
    # another int8 kernel, which can flip a near tie such as QUESTION's first token)
    kwargs = dict(model=MODEL, input="What is 2 + 2?", max_output_tokens=64, temperature=0)
    whole = client.responses.create(**kwargs)
    deltas = []
    with client.responses.stream(**kwargs) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert len(deltas) > 1 and "".join(deltas) == whole.output_text
    assert final.output_text == whole.output_text
    raw = [e.type for e in client.responses.create(stream=True, **kwargs)]
    assert raw[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert raw[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert raw[-1] in ("response.completed", "response.incomplete")


def test_max_output_tokens_makes_it_incomplete(client):
    response = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=2)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"


def test_previous_response_id_continues_a_stored_conversation(client):
    first = client.responses.create(
        model=MODEL, input="My name is Ada.", max_output_tokens=8, temperature=0
    )
    assert client.responses.retrieve(first.id).output_text == first.output_text
    follow = client.responses.create(
        model=MODEL,
        input="What is my name?",
        previous_response_id=first.id,
        max_output_tokens=8,
        temperature=0,
    )
    alone = client.responses.create(
        model=MODEL, input="What is my name?", max_output_tokens=8, temperature=0
    )
    assert follow.usage.input_tokens > alone.usage.input_tokens + 5  # the first turn is in
    unstored = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(model=MODEL, input="Hi", previous_response_id="resp_nope")
    assert info.value.body["param"] == "previous_response_id"


def test_json_schema_text_format_and_forced_tools(client):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    }
    response = client.responses.create(
        model=MODEL,
        input="Name a city as JSON.",
        text={"format": {"type": "json_schema", "name": "city", "schema": schema}},
        max_output_tokens=40,
        temperature=0,
    )
    assert set(json.loads(response.output_text)) == {"city"}
    tool = {
        "type": "function",
        "name": "get_weather",
        "parameters": schema,
    }
    kwargs = dict(
        model=MODEL,
        input="Weather in Paris?",
        tools=[tool],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=60,
        temperature=0,
    )
    response = client.responses.create(**kwargs)
    [call] = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_weather" and set(json.loads(call.arguments)) == {"city"}
    with client.responses.stream(**kwargs) as stream:
        final = stream.get_final_response()
    [streamed] = [item for item in final.output if item.type == "function_call"]
    assert (streamed.name, streamed.arguments) == (call.name, call.arguments)


def test_errors_take_openais_shape(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input=QUESTION, temperature=-1)
    assert "temperature" in info.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input=QUESTION)
