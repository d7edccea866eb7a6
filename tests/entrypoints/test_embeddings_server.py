"""`POST /v1/embeddings` in OpenAI's shape: every input form, float and base64 vectors,
usage, and OpenAI-format 4xx errors for what the model cannot do."""

from __future__ import annotations

import base64
import struct

import httpx
import pytest

from tests.entrypoints.conftest import MODEL

pytestmark = pytest.mark.slow


def post(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=60)


def test_every_input_form_gives_unit_vectors_and_usage(server, async_llm):
    hidden = async_llm.engine.model_config.hidden_size
    ids = async_llm.tokenize_prompt("Paged attention")
    for value, count in [
        ("Paged attention", 1),
        (["Paged attention", "continuous batching", "KV cache"], 3),
        (ids, 1),
        ([ids, ids[:2]], 2),
    ]:
        r = post(server, {"model": MODEL, "input": value})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["model"] == MODEL
        assert [d["index"] for d in body["data"]] == list(range(count))
        for d in body["data"]:
            assert d["object"] == "embedding" and len(d["embedding"]) == hidden
            assert abs(sum(x * x for x in d["embedding"]) - 1) < 1e-4
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    text_vector = post(server, {"input": "Paged attention"}).json()["data"][0]["embedding"]
    ids_vector = post(server, {"input": ids}).json()["data"][0]["embedding"]
    assert max(abs(a - b) for a, b in zip(text_vector, ids_vector, strict=True)) < 1e-5


def test_base64_is_the_float_vector_as_little_endian_float32(server):
    floats = post(server, {"input": "hello"}).json()["data"][0]["embedding"]
    encoded = post(server, {"input": "hello", "encoding_format": "base64"}).json()
    raw = base64.b64decode(encoded["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert max(abs(a - b) for a, b in zip(decoded, floats, strict=True)) < 1e-6


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": "x", "dimensions": 64}, 400, "dimensions"),
        ({"input": ""}, 400, "input"),
        ({"input": []}, 400, "input"),
        ({"input": "x", "encoding_format": "int8"}, 400, None),
        ({"input": [10**9]}, 400, "input"),
        ({"input": "x", "model": "other"}, 404, "model"),
    ],
)
def test_bad_requests_are_openai_errors(server, body, status, param):
    r = post(server, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"]
    if param is not None:
        assert error["param"] == param
