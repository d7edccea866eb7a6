"""Tool calling: forced calls ("required", a named function) through the openai client
against a live server, streamed and not; the parsers of free ("auto") answers; tool and
assistant-with-calls messages in the conversation."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest
from pagedllm.entrypoints.openai.serving_chat import ChatServing, _StreamedCalls
from pagedllm.entrypoints.openai.tool_calls import ContentHoldback, parse_auto
from tests.entrypoints.conftest import MODEL

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 30}},
            "required": ["timezone"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def check_calls(calls) -> list[tuple[str, dict]]:
    out = []
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        out.append((call.function.name, arguments))
    return out


def streamed_calls(chunks) -> tuple[list[tuple[str, dict]], str | None]:
    """Calls assembled from stream deltas as the openai client's users do."""
    calls: dict[int, dict] = {}
    finish = None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"name": None, "arguments": ""})
            if delta.function.name:
                call["name"] = delta.function.name
            call["arguments"] += delta.function.arguments or ""
    return [(c["name"], json.loads(c["arguments"])) for c in calls.values()], finish


@pytest.mark.parametrize("seed", range(4))
def test_required_always_calls_a_declared_function_with_valid_arguments(client, seed):
    kwargs = dict(
        model=MODEL,
        messages=MESSAGES,
        tools=[WEATHER, TIME],
        tool_choice="required",
        temperature=0.8,
        seed=seed,
        max_tokens=200,
    )
    reply = client.chat.completions.create(**kwargs)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = check_calls(choice.message.tool_calls)
    assert calls
    streamed, finish = streamed_calls(client.chat.completions.create(stream=True, **kwargs))
    assert streamed == calls and finish == "tool_calls"


def test_one_call_when_parallel_calls_are_off(client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=200,
    )
    assert len(check_calls(reply.choices[0].message.tool_calls)) == 1


def test_a_named_function_gets_its_arguments_streamed_as_they_come(client):
    kwargs = dict(
        model=MODEL,
        messages=MESSAGES,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=100,
    )
    reply = client.chat.completions.create(**kwargs)
    [(name, arguments)] = check_calls(reply.choices[0].message.tool_calls)
    assert name == "get_weather" and reply.choices[0].finish_reason == "tool_calls"
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    argument_chunks = [c for c in chunks if c.choices and c.choices[0].delta.tool_calls is not None]
    assert len(argument_chunks) > 2  # streamed piece by piece, not at the end
    assert streamed_calls(chunks) == ([(name, arguments)], "tool_calls")


def test_conversations_with_calls_and_tool_results_are_accepted(client):
    history = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    reply = client.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER], max_tokens=10, temperature=0
    )
    assert reply.choices[0].message.content


def test_tool_choice_none_offers_no_tools_and_bad_choices_are_400s(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=[WEATHER], tool_choice="none", max_tokens=5
    )
    assert reply.choices[0].message.tool_calls is None
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    with pytest.raises(openai.BadRequestError, match="tool_choice needs tools"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, tool_choice="required")


# ------------------------------------------------------------------ the auto parsers


HERMES = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"timezone": "CET"}}</tool_call>'
)


def test_hermes_calls_are_parsed_and_the_text_before_them_is_the_content():
    content, calls = parse_auto(HERMES, "hermes")
    assert content == "Let me check.\n"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"timezone": "CET"}),
    ]
    assert parse_auto("no calls here", "hermes") == ("no calls here", [])
    broken = "<tool_call>{not json}</tool_call>"
    assert parse_auto(broken, "hermes") == (broken, [])


def test_llama3_json_calls_are_parsed():
    text = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {"timezone": "CET"}}'
    content, calls = parse_auto(text, "llama3_json")
    assert content is None and [c.name for c in calls] == ["get_weather", "get_time"]
    assert parse_auto('{"not": "a call"}', "llama3_json") == ('{"not": "a call"}', [])
    assert parse_auto("plain words", "llama3_json") == ("plain words", [])


@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
@pytest.mark.parametrize("cut", [1, 3, 7])
def test_streamed_auto_answers_agree_with_whole_ones(parser, cut):
    """Deltas of any size give the content and calls the whole text gives."""
    texts = {
        "hermes": [HERMES, "Just text, with a < sign and <tool_c", "plain"],
        "llama3_json": [
            '{"name": "get_weather", "parameters": {"city": "Paris"}}',
            '{"a": 1}',
            "plain <|python",
        ],
    }[parser]
    serving = ChatServing.__new__(ChatServing)
    serving.tool_call_parser = parser
    body = ChatCompletionRequest.model_validate({"messages": MESSAGES, "tools": [WEATHER]})
    for text in texts:
        whole_content, whole_calls = serving._calls(body, text)
        streamer = _StreamedCalls(serving, body)
        content, calls = "", []
        pieces = [text[i : i + cut] for i in range(0, len(text), cut)]
        for k, piece in enumerate(pieces):
            delta, _ = streamer.feed(0, piece, finished=k == len(pieces) - 1)
            content += delta.get("content", "")
            calls += delta.get("tool_calls", [])
        assert content == (whole_content or "")
        assert [c["function"] for c in calls] == [
            {"name": c.name, "arguments": c.arguments} for c in whole_calls
        ]


def test_the_holdback_never_streams_a_marker():
    holdback = ContentHoldback("hermes")
    assert holdback.feed("Hi <tool") == "Hi "
    assert holdback.feed("_call>{") == ""
    assert holdback.flush(has_calls=True) == ""


def test_a_forced_array_cut_by_max_tokens_keeps_its_complete_calls():
    from pagedllm.entrypoints.openai.tool_calls import parse_required

    text = '[{"name": "a", "arguments": {"x": 1}},\n {"name": "b", "arguments": {}}, {"name": "a", "argu'
    assert [(c.name, c.arguments) for c in parse_required(text)] == [
        ("a", '{"x": 1}'),
        ("b", "{}"),
    ]
    assert parse_required('[{"name": "a", "arguments": {}}]')[0].name == "a"
    assert parse_required("[") == []
