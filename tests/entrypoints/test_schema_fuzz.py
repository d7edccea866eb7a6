"""The HTTP API against its own OpenAPI schema (schemathesis): no 5xx, documented answers.

Schemathesis reads /openapi.json, generates requests for every operation from the
documented bodies (valid and not), sends them to a real server and checks that no
answer is a server error and that each status, content type and body is one the
schema documents. Generation is kept cheap: the test's copy of the schema bounds
`max_tokens` and `n` (the server's own schema does not), so a request makes at
most a few tokens.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.slow

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# Bounds for the test's copy of the schema: a generated request stays a few tokens long.
BOUNDS = {"max_tokens": 4, "max_completion_tokens": 4, "n": 2, "min_tokens": 4}


def bounded(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with BOUNDS as maxima, and max_tokens required (None means "to the end")."""
    schema = copy.deepcopy(schema)
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        body = schema["components"]["schemas"][name]
        for prop, top in BOUNDS.items():
            if prop in body["properties"]:
                # an enum, not {"type": "integer", ...}: JSON Schema counts 3.0 as an
                # integer and generators send it, which the (strict) protocol refuses
                body["properties"][prop] = {"enum": list(range(1, top + 1))}
        body["required"] = sorted({*body.get("required", []), "max_tokens"})
    # Completions: most random prompts (empty, token ids outside the vocabulary) and the
    # unsupported suffix/best_of are 400s; keep text prompts, so some requests generate.
    completion = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    completion["prompt"] = {"type": "string", "minLength": 1, "maxLength": 64}
    for unsupported in ("suffix", "best_of"):
        completion.pop(unsupported, None)
    # Embeddings: the same for input, and dimensions (any but the model's width is a 400)
    embedding = schema["components"]["schemas"]["EmbeddingRequest"]["properties"]
    embedding["input"] = {"type": "string", "minLength": 1, "maxLength": 64}
    embedding.pop("dimensions", None)
    # Anthropic's and the Responses API's bodies: a few tokens each, and text input
    messages = schema["components"]["schemas"]["MessagesRequest"]["properties"]
    messages["max_tokens"] = {"enum": [1, 2, 3, 4]}
    responses = schema["components"]["schemas"]["ResponsesRequest"]
    responses["properties"]["max_output_tokens"] = {"enum": [1, 2, 3, 4]}
    responses["properties"]["input"] = {"type": "string", "minLength": 1, "maxLength": 64}
    responses["required"] = sorted({*responses.get("required", []), "max_output_tokens"})
    return schema


@pytest.fixture(scope="module")
def document(server) -> dict[str, Any]:
    return httpx.get(server.url + "/openapi.json", timeout=30).json()


def test_openapi_documents_every_post_body(document):
    for path in (
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/tokenize",
        "/detokenize",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/responses",
    ):
        body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"]["$ref"].startswith("#/components/schemas/")
    assert "ChatMessage" in document["components"]["schemas"]


def operation_ids() -> list[str]:
    return [
        "GET /health",
        "GET /version",
        "GET /metrics",
        "GET /v1/models",
        "POST /v1/completions",
        "POST /v1/chat/completions",
        "POST /v1/embeddings",
        "POST /tokenize",
        "POST /detokenize",
        "POST /v1/messages",
        "POST /v1/messages/count_tokens",
        "POST /v1/responses",
        "GET /v1/responses/{response_id}",
        "GET /",
    ]


CASES = [(label, GenerationMode.POSITIVE) for label in operation_ids()] + [
    (label, GenerationMode.NEGATIVE) for label in operation_ids() if label.startswith("POST")
]


# (schemathesis' own pytest integration, `from_fixture`, fails on pytest 9: each
# operation runs here as a Hypothesis test built from the operation's strategy.)
@pytest.mark.parametrize("label,mode", CASES, ids=[f"{m.value} {label}" for label, m in CASES])
def test_api_conforms_to_its_schema(document, server, label, mode):
    api = schemathesis.openapi.from_dict(bounded(document))
    operations = {f"{op.method.upper()} {op.path}": op for op in map(_ok, api.get_all_operations())}
    assert set(operations) == set(operation_ids()), "a route is missing from this test"
    statuses: Counter[int] = Counter()

    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=True,  # the same examples every run: a flaky fuzz test helps no one
    )
    @given(case=operations[label].as_strategy(mode))
    def conforms(case) -> None:
        response = case.call_and_validate(base_url=server.url, checks=CHECKS, timeout=60)
        statuses[response.status_code] += 1

    # The engine flushes subnormal floats to zero (set in this thread when it was built);
    # Hypothesis refuses to generate floats in that mode, so it is off while generating.
    torch.set_flush_denormal(False)
    try:
        conforms()
    finally:
        torch.set_flush_denormal(True)
    print(label, mode.value, dict(statuses))
    if mode is GenerationMode.POSITIVE and label.startswith("POST"):
        assert statuses[200], f"no generated request was accepted: {dict(statuses)}"


def _ok(result):
    return result.ok()
