"""`POST /v1/responses` and `GET /v1/responses/{id}`: OpenAI's Responses API.

A request becomes a chat completion (`ResponsesRequest.to_chat`, after the stored
conversation of its `previous_response_id`) and enters the engine through the chat path;
only the answer's shape is the Responses API's: a `response` object whose `output` holds
a message with `output_text` (or `function_call` items when tools were called). Streams
send the events the openai client's `responses.stream()` reads: `response.created`,
`response.in_progress`, `response.output_item.added`, `response.content_part.added`,
`response.output_text.delta`..., `response.output_text.done`, `response.content_part.done`,
`response.output_item.done`, then `response.completed` (or `response.incomplete` when
`max_output_tokens` cut it). Responses are kept, unless `store` is false, in a bounded
in-memory store (the oldest leave first).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagedllm.engine.async_llm import RequestStream
from pagedllm.entrypoints.openai.errors import APIError, from_exception
from pagedllm.entrypoints.openai.protocol import (
    SAMPLING_PARAM_NAMES,
    ChatCompletionRequest,
    ResponsesRequest,
)
from pagedllm.entrypoints.openai.serving_base import new_id
from pagedllm.entrypoints.openai.serving_chat import ChatServing
from pagedllm.entrypoints.openai.tool_calls import new_call_id

MAX_STORED_RESPONSES = 1024
_PARAMS = (*SAMPLING_PARAM_NAMES, "input", "instructions", "max_output_tokens", "text")


@dataclass
class _Stored:
    response: dict[str, Any]
    conversation: list[dict[str, Any]]  # every message up to and including this answer


class ResponsesServing(ChatServing):
    """Responses API objects and events from the chat path's engine deltas."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._store: OrderedDict[str, _Stored] = OrderedDict()

    def retrieve(self, response_id: str) -> JSONResponse:
        stored = self._store.get(response_id)
        if stored is None:
            raise APIError(404, f"no response {response_id!r} is stored", param="response_id")
        return JSONResponse(stored.response)

    async def create_response(self, body: ResponsesRequest, raw: Request) -> Response:
        model = self.check_model(body.model)
        history: list[dict[str, Any]] = []
        if body.previous_response_id is not None:
            previous = self._store.get(body.previous_response_id)
            if previous is None:
                raise APIError(
                    404,
                    f"previous_response_id {body.previous_response_id!r} is not stored",
                    param="previous_response_id",
                )
            history = previous.conversation
        chat = body.to_chat(history)
        params, prompt_ids = await self.engine_input(chat, _PARAMS)
        response_id = new_id("resp")
        (stream,) = await self.start(response_id, [prompt_ids], params)
        shell = self._shell(body, response_id, model)
        if body.stream:
            return self.sse(self._events(body, chat, shell, len(prompt_ids), stream), [stream])
        return await self.until_disconnect(
            raw, self._whole(body, chat, shell, len(prompt_ids), stream), [stream]
        )

    def _shell(self, body: ResponsesRequest, response_id: str, model: str) -> dict[str, Any]:
        """The response object before any output (status in_progress)."""
        text_format = body.text.format if body.text and body.text.format else None
        return {
            "id": response_id,
            "object": "response",
            "created_at": int(time.time()),
            "status": "in_progress",
            "model": model,
            "output": [],
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "previous_response_id": body.previous_response_id,
            "store": body.store is not False,
            "text": {"format": {"type": text_format.type if text_format else "text"}},
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or ()],
            "tool_choice": body.tool_choice or "auto",
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "metadata": body.metadata or {},
            "error": None,
            "incomplete_details": None,
            "usage": None,
        }

    def _finish(
        self,
        body: ResponsesRequest,
        chat: ChatCompletionRequest,
        shell: dict[str, Any],
        text: str,
        finish_reason: str | None,
        usage: dict[str, Any],
        message_id: str,
    ) -> dict[str, Any]:
        """The finished response: its output items, status and usage; stored unless
        `store` is false."""
        content, calls = self._calls(chat, text)
        output: list[dict[str, Any]] = []
        if content is not None or not calls:
            output.append(_message_item(message_id, content or "", "completed"))
        for call in calls:
            output.append(
                {
                    "type": "function_call",
                    "id": new_id("fc"),
                    "call_id": new_call_id(),
                    "name": call.name,
                    "arguments": call.arguments,
                    "status": "completed",
                }
            )
        response = {**shell, "output": output, "usage": usage, "status": "completed"}
        if finish_reason == "length":
            response["status"] = "incomplete"
            response["incomplete_details"] = {"reason": "max_output_tokens"}
        if body.store is not False:
            answer: dict[str, Any] = {"role": "assistant", "content": content or ""}
            if calls:
                answer["tool_calls"] = [
                    {"id": item["call_id"], "type": "function",
                     "function": {"name": item["name"], "arguments": item["arguments"]}}
                    for item in output if item["type"] == "function_call"
                ]  # fmt: skip
            conversation = [m.model_dump(exclude_none=True) for m in chat.messages]
            self._store[shell["id"]] = _Stored(response, [*conversation, answer])
            while len(self._store) > MAX_STORED_RESPONSES:
                self._store.popitem(last=False)
        return response

    async def _whole(
        self,
        body: ResponsesRequest,
        chat: ChatCompletionRequest,
        shell: dict[str, Any],
        num_prompt: int,
        stream: RequestStream,
    ) -> Response:
        text, num_output, finish, cached = "", 0, None, 0
        async for _, delta in self.merged([stream]):
            cached = delta.num_cached_tokens
            for c in delta.outputs:
                text += c.text
                num_output += len(c.token_ids)
                finish = c.finish_reason
        usage = _usage(num_prompt, num_output, cached)
        response = self._finish(body, chat, shell, text, finish, usage, new_id("msg"))
        return JSONResponse(response)

    async def _events(
        self,
        body: ResponsesRequest,
        chat: ChatCompletionRequest,
        shell: dict[str, Any],
        num_prompt: int,
        stream: RequestStream,
    ) -> AsyncIterator[str]:
        sequence = iter(range(1 << 62))

        def event(name: str, **payload: Any) -> str:
            data = {"type": name, "sequence_number": next(sequence), **payload}
            return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

        message_id = new_id("msg")
        where = {"item_id": message_id, "output_index": 0, "content_index": 0}

        def message_opens() -> list[str]:
            return [
                event(
                    "response.output_item.added",
                    output_index=0,
                    item=_message_item(message_id, None, "in_progress"),
                ),
                event("response.content_part.added", **where, part=_text_part("")),
            ]

        yield event("response.created", response=shell)
        yield event("response.in_progress", response=shell)
        # with tools the answer may be calls only: its message opens once that is known
        holding = chat.tool_mode() != "none"
        if not holding:
            for opening in message_opens():
                yield opening
        text, num_output, finish, cached = "", 0, None, 0
        try:
            async for _, delta in self.merged([stream]):
                cached = delta.num_cached_tokens
                for c in delta.outputs:
                    text += c.text
                    num_output += len(c.token_ids)
                    finish = c.finish_reason
                    if c.text and not holding:  # with tools, the answer may be calls
                        yield event(
                            "response.output_text.delta", **where, delta=c.text, logprobs=[]
                        )
        except Exception as e:
            error = from_exception(e, SAMPLING_PARAM_NAMES)
            failed = {
                **shell,
                "status": "failed",
                "error": {"code": "server_error", "message": error.message},
            }
            yield event("response.failed", response=failed)
            return
        response = self._finish(
            body, chat, shell, text, finish, _usage(num_prompt, num_output, cached), message_id
        )
        message = next((item for item in response["output"] if item["type"] == "message"), None)
        if message is not None:
            shown = message["content"][0]["text"]
            if holding:
                for opening in message_opens():
                    yield opening
                if shown:
                    yield event("response.output_text.delta", **where, delta=shown, logprobs=[])
            yield event("response.output_text.done", **where, text=shown, logprobs=[])
            yield event("response.content_part.done", **where, part=_text_part(shown))
            yield event("response.output_item.done", output_index=0, item=message)
        for index, item in enumerate(response["output"]):
            if item["type"] == "function_call":
                yield event("response.output_item.added", output_index=index, item=item)
                yield event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    arguments=item["arguments"],
                )
                yield event("response.output_item.done", output_index=index, item=item)
        final = (
            "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        )
        yield event(final, response=response)


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(message_id: str, text: str | None, status: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": message_id,
        "status": status,
        "role": "assistant",
        "content": [] if text is None else [_text_part(text)],
    }


def _usage(num_prompt: int, num_output: int, cached: int) -> dict[str, Any]:
    return {
        "input_tokens": num_prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": num_output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": num_prompt + num_output,
    }
