"""Structured output through the official openai client against a live server: JSON
schemas (response_format, and the client's `parse` with a pydantic model), any JSON
object, vLLM's structured_outputs and guided_* fields, streamed and not; bad
constraints are 400s naming the field."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pydantic
import pytest

from tests.entrypoints.conftest import MODEL

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "colors": {
                "type": "array",
                "items": {"enum": ["red", "green", "blue"]},
                "minItems": 1,
                "maxItems": 3,
            },
            "note": {"type": "string", "maxLength": 30},
        },
        "required": ["colors"],
        "additionalProperties": False,
    },
    {
        "$defs": {
            "point": {
                "type": "object",
                # ranges bound the digits: an unbounded number may run to max_tokens
                "properties": {
                    "x": {"type": "number", "minimum": -100, "maximum": 100},
                    "y": {"type": "integer", "minimum": 0, "maximum": 1000},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
        "additionalProperties": False,
    },
]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def ask(client, schema, stream: bool = False, seed: int = 0) -> str:
    messages = [{"role": "user", "content": "Give me an example as JSON."}]
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    kwargs = dict(
        model=MODEL,
        messages=messages,
        response_format=response_format,
        temperature=0.8,
        seed=seed,
        max_tokens=160,
    )
    if not stream:
        reply = client.chat.completions.create(**kwargs)
        assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
        return reply.choices[0].message.content
    chunks = client.chat.completions.create(stream=True, **kwargs)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_json_schema_outputs_parse_and_validate(client, index):
    schema = SCHEMAS[index]
    for seed in range(3):
        text = ask(client, schema, seed=seed)
        jsonschema.validate(json.loads(text), schema)
    assert ask(client, schema, stream=True, seed=0) == ask(client, schema, seed=0)


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    age: int = pydantic.Field(ge=0, le=120)


def test_the_clients_parse_helper_gets_a_model_instance(client):
    reply = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Invent a person."}],
        response_format=Person,
        temperature=0.8,
        seed=3,
        max_tokens=100,
    )
    person = reply.choices[0].message.parsed
    assert isinstance(person, Person)


def test_json_object_and_vllm_fields(client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "Reply with a JSON object with the keys name and age."}
        ],
        response_format={"type": "json_object"},
        max_tokens=120,
        temperature=0,
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    reply = client.completions.create(
        model=MODEL,
        prompt="The best fruit is",
        max_tokens=10,
        extra_body={"structured_outputs": {"choice": ["apple", "banana", "cherry"]}},
    )
    assert reply.choices[0].text in ("apple", "banana", "cherry")
    reply = client.completions.create(
        model=MODEL,
        prompt="My phone number is",
        max_tokens=20,
        extra_body={"guided_regex": r" \d{3}-\d{4}"},
    )
    assert re.fullmatch(r" \d{3}-\d{4}", reply.choices[0].text)
    reply = client.completions.create(
        model=MODEL,
        prompt="Answer yes or no: is the sky blue?",
        max_tokens=5,
        extra_body={"guided_grammar": 'root ::= " yes" | " no"'},
    )
    assert reply.choices[0].text in (" yes", " no")


def test_a_grammar_cut_by_max_tokens_ends_with_length(client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "JSON please."}],
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMAS[0]}},
        max_tokens=3,
    )
    assert reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"guided_regex": "(unclosed"}, "does not compile"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "one constraint at most"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "schema"),
        ({"structured_outputs": {"json": {"type": "object"}, "regex": "a"}}, "exactly one"),
    ],
)
def test_bad_constraints_are_400s_naming_structured_outputs(client, extra, message):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=5, extra_body=extra)
    assert message in info.value.body["message"]
    assert info.value.body["param"] == "structured_outputs"


@pytest.mark.parametrize(
    ("route", "field", "value"),
    [
        ("chat", "audio", {"voice": "alloy", "format": "wav"}),
        ("chat", "modalities", ["text", "audio"]),
        ("chat", "functions", [{"name": "f", "parameters": {}}]),
        ("chat", "function_call", "auto"),
        ("chat", "web_search_options", {}),
        ("chat", "prediction", {"type": "content", "content": "x"}),
        ("completions", "store", True),
        ("completions", "service_tier", "flex"),
    ],
)
def test_openai_fields_not_implemented_are_refused_by_name(client, route, field, value):
    """No silent ignoring: a field of OpenAI's API pagedllm does not implement is a 400
    that names it (null, and modalities ["text"], are accepted)."""
    with pytest.raises(openai.BadRequestError) as info:
        if route == "chat":
            client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "x"}],
                max_tokens=2,
                extra_body={field: value},
            )
        else:
            client.completions.create(
                model=MODEL, prompt="x", max_tokens=2, extra_body={field: value}
            )
    assert info.value.body["param"] == field
    assert "not supported" in info.value.body["message"]
    ok = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=2,
        extra_body={"modalities": ["text"], "store": None, "use_beam_search": False},
    )
    assert ok.choices[0].message.content is not None


def test_vllm_fields_are_documented_in_the_openapi_schema(server):
    import httpx

    schemas = httpx.get(server.url + "/openapi.json").json()["components"]["schemas"]
    for body in ("ChatCompletionRequest", "CompletionRequest"):
        properties = schemas[body]["properties"]
        for field in ("top_k", "min_p", "structured_outputs", "guided_json", "prompt_logprobs"):
            assert properties[field]["description"].startswith("vLLM"), (body, field)
    assert "chat_template_kwargs" in schemas["ChatCompletionRequest"]["properties"]
    assert "tools" in schemas["ChatCompletionRequest"]["properties"]
