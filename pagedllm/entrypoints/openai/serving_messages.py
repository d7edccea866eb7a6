"""`POST /v1/messages` and `/v1/messages/count_tokens`: Anthropic's Messages API.

A request becomes the same chat completion (`MessagesRequest.to_chat`) and enters the
engine through the chat path (template, limits, validation); only the answer's shape is
Anthropic's. Streams send Anthropic's named events: `message_start`,
`content_block_start`, `content_block_delta` (text deltas), `content_block_stop`,
`message_delta` (the stop reason and output tokens), `message_stop`; an error midway is
an `error` event.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagedllm.engine.async_llm import RequestStream
from pagedllm.entrypoints.openai.errors import bad_request, from_exception
from pagedllm.entrypoints.openai.protocol import (
    SAMPLING_PARAM_NAMES,
    CountTokensRequest,
    MessagesRequest,
)
from pagedllm.entrypoints.openai.serving_base import new_id
from pagedllm.entrypoints.openai.serving_chat import ChatServing

_PARAMS = (*SAMPLING_PARAM_NAMES, "messages", "system", "stop_sequences")


def event(name: str, payload: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"


def stop_reason(finish_reason: str | None, stop: int | str | None) -> tuple[str | None, str | None]:
    """Anthropic's (stop_reason, stop_sequence) for the engine's finish reason."""
    if finish_reason == "length":
        return "max_tokens", None
    if finish_reason == "stop":
        if isinstance(stop, str):
            return "stop_sequence", stop
        return "end_turn", None
    return None, None


class MessagesServing(ChatServing):
    """Anthropic's message objects and events from the chat path's engine deltas."""

    async def count_tokens(self, body: CountTokensRequest) -> JSONResponse:
        self.check_model(body.model)
        try:
            ids = await self.render(body.to_chat())
        except ValueError as e:
            raise bad_request(e, _PARAMS) from e
        return JSONResponse({"input_tokens": len(ids)})

    async def create_message(self, body: MessagesRequest, raw: Request) -> Response:
        model = self.check_model(body.model)
        params, prompt_ids = await self.engine_input(body.to_chat(), _PARAMS)
        message_id = new_id("msg")
        (stream,) = await self.start(message_id, [prompt_ids], params)
        if body.stream:
            events = self._events(message_id, model, len(prompt_ids), stream)
            return self.sse(events, [stream])
        return await self.until_disconnect(
            raw, self._message(message_id, model, len(prompt_ids), stream), [stream]
        )

    async def _message(
        self, message_id: str, model: str, num_prompt: int, stream: RequestStream
    ) -> Response:
        text, num_output = "", 0
        finish: str | None = None
        stop: int | str | None = None
        async for _, delta in self.merged([stream]):
            for c in delta.outputs:
                text += c.text
                num_output += len(c.token_ids)
                finish, stop = c.finish_reason, c.stop_reason
        reason, sequence = stop_reason(finish, stop)
        return JSONResponse(
            {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": reason,
                "stop_sequence": sequence,
                "usage": {"input_tokens": num_prompt, "output_tokens": num_output},
            }
        )

    async def _events(
        self, message_id: str, model: str, num_prompt: int, stream: RequestStream
    ) -> AsyncIterator[str]:
        yield event(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": num_prompt, "output_tokens": 0},
                },
            },
        )
        yield event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        )
        num_output = 0
        finish: str | None = None
        stop: int | str | None = None
        try:
            async for _, delta in self.merged([stream]):
                for c in delta.outputs:
                    num_output += len(c.token_ids)
                    finish, stop = c.finish_reason, c.stop_reason
                    if c.text:
                        yield event(
                            "content_block_delta",
                            {
                                "type": "content_block_delta",
                                "index": 0,
                                "delta": {"type": "text_delta", "text": c.text},
                            },
                        )
        except Exception as e:
            yield event("error", from_exception(e, SAMPLING_PARAM_NAMES).body(anthropic=True))
            return
        yield event("content_block_stop", {"type": "content_block_stop", "index": 0})
        reason, sequence = stop_reason(finish, stop)
        yield event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": sequence},
                "usage": {"output_tokens": num_output},
            },
        )
        yield event("message_stop", {"type": "message_stop"})
