"""The OpenAPI document at /openapi.json, with the request bodies the routes parse by hand.

The POST routes take a raw `Request` so the guard's size limit applies before a byte
is parsed; FastAPI therefore cannot see their bodies. `describe_bodies` adds each
body's JSON schema (from the pydantic models in protocol.py) to the generated
document, so clients and schema-driven tests (schemathesis) know what to send.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from pagedllm.entrypoints.openai.protocol import AnthropicErrorResponse, ErrorResponse

_REF = "#/components/schemas/{model}"

SSE_OR_JSON: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A JSON response, or server-sent events (`data: {...}` lines) when streaming",
        "content": {
            "application/json": {},
            # one event: `data: <JSON chunk>` lines, the last one `data: [DONE]`
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                    "required": ["data"],
                }
            },
        },
    }
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status answered with OpenAI's error object."""
    return {status: {"model": ErrorResponse} for status in statuses}


def anthropic_error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for an Anthropic route: each status answered with Anthropic's error."""
    return {status: {"model": AnthropicErrorResponse} for status in statuses}


def describe_bodies(app: FastAPI, bodies: Mapping[str, type[BaseModel]]) -> None:
    """Make `app.openapi()` document `bodies` (POST path → model) as JSON request bodies."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for path, model in bodies.items():
                body = model.model_json_schema(ref_template=_REF)
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
                schema["paths"][path]["post"]["requestBody"] = {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}
                    },
                }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
