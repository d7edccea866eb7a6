"""Tool calling on chat completions: the prompt that offers the tools, the grammar that
forces a call, and the parsers that turn a model's text into OpenAI's `tool_calls`.

`tool_choice` decides the mode, as vLLM does:
- "none": tools are not offered; the answer is text.
- "auto" (the default with tools): tools are offered; the model's text is parsed by the
  server's `--tool-call-parser`: "hermes" (Hermes/Qwen `<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>` blocks) or "llama3_json" (Llama 3's `{"name": ..., "parameters":
  {...}}`, after an optional `<|python_tag|>`, several joined by `;`).
- "required": the output is forced by the grammar engine to a JSON array of one or more
  calls (one when `parallel_tool_calls` is false) of declared functions, each with
  arguments valid under its schema, so it always parses.
- a named function: the output is forced to that function's arguments.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

TOOL_CALL_PARSERS = ("hermes", "llama3_json")
_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def to_openai(self, call_id: str) -> dict[str, Any]:
        return {
            "id": call_id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object", "properties": {}}


def required_schema(functions: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """A JSON array of calls to the declared functions, each valid under its schema."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"enum": [function["name"]]},
                "arguments": _parameters(function),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for function in functions
    ]
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def named_schema(function: dict[str, Any]) -> dict[str, Any]:
    """The arguments of one named function."""
    return _parameters(function)


def parse_required(text: str) -> list[ToolCall]:
    """The calls of a grammar-forced "required" output (a JSON array). An array cut by
    max_tokens (a small model may repeat calls until then) keeps its complete calls."""
    decoder = json.JSONDecoder()
    position = text.find("[") + 1
    calls = []
    while position > 0:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        try:
            call, position = decoder.raw_decode(text, position)
        except ValueError:
            break  # the end of the array, or a call cut short
        calls.append(ToolCall(call["name"], json.dumps(call["arguments"])))
    return calls


def parse_auto(text: str, parser: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a free answer: the text before the first call is the content."""
    if parser == "hermes":
        return _parse_hermes(text)
    if parser == "llama3_json":
        return _parse_llama3_json(text)
    raise ValueError(f"tool_call_parser must be one of {TOOL_CALL_PARSERS}, got {parser!r}")


def _as_call(value: Any, arguments_key: str) -> ToolCall | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(arguments_key, value.get("arguments", {}))
    if isinstance(arguments, str):  # some models quote the arguments
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments))


def _parse_hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    start = text.find(_HERMES_OPEN)
    if start < 0:
        return text, []
    calls = []
    rest = text[start:]
    while (open_at := rest.find(_HERMES_OPEN)) >= 0:
        body_start = open_at + len(_HERMES_OPEN)
        close_at = rest.find(_HERMES_CLOSE, body_start)
        body = rest[body_start : close_at if close_at >= 0 else len(rest)]
        try:
            call = _as_call(json.loads(body), "arguments")
        except ValueError:
            call = None
        if call is None:
            return text, []  # not a well-formed call: leave the text as it is
        calls.append(call)
        if close_at < 0:
            break
        rest = rest[close_at + len(_HERMES_CLOSE) :]
    content = text[:start]
    return content if content.strip() else None, calls


def _parse_llama3_json(text: str) -> tuple[str | None, list[ToolCall]]:
    body = text.strip()
    if body.startswith(_PYTHON_TAG):
        body = body[len(_PYTHON_TAG) :]
    if not body.lstrip().startswith("{"):
        return text, []
    calls = []
    decoder = json.JSONDecoder()
    position = 0
    while position < len(body):
        while position < len(body) and body[position] in " \t\r\n;":
            position += 1
        if position >= len(body):
            break
        try:
            value, position = decoder.raw_decode(body, position)
        except ValueError:
            return text, []
        call = _as_call(value, "parameters")
        if call is None:
            return text, []
        calls.append(call)
    return None, calls


class ContentHoldback:
    """Streams an "auto" answer's content up to the start of its first tool call.

    A delta may end inside the marker ("<tool_c"): that tail is held back until the next
    delta shows whether it starts a call. Once a call starts, nothing more streams as
    content; the calls are parsed from the whole text at the end.
    """

    def __init__(self, parser: str) -> None:
        self.parser = parser
        self.text = ""
        self.sent = 0
        self.in_call = False

    def feed(self, delta: str) -> str:
        """The content to stream now."""
        self.text += delta
        if self.in_call:
            return ""
        if self.parser == "hermes":
            marker = self.text.find(_HERMES_OPEN, self.sent)
            if marker >= 0:
                self.in_call = True
                return self._send_to(marker)
            return self._send_to(len(self.text) - _partial_suffix(self.text, _HERMES_OPEN))
        # llama3_json: a call is the whole answer, so an answer that opens like one is held
        stripped = self.text.lstrip()
        if not stripped:
            return ""
        if stripped.startswith("{") or _PYTHON_TAG.startswith(stripped[: len(_PYTHON_TAG)]):
            if stripped.startswith(("{", _PYTHON_TAG)):
                self.in_call = True
            return ""
        return self._send_to(len(self.text))

    def flush(self, has_calls: bool) -> str:
        """What is still held back, once the answer has ended: nothing more when it made
        calls, else the rest of its text (a held tail, or an answer that only looked
        like a call)."""
        return "" if has_calls else self._send_to(len(self.text))

    def _send_to(self, end: int) -> str:
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0
