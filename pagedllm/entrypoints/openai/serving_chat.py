"""`POST /v1/chat/completions`: messages rendered by the model's chat template.

Streaming sends, per choice, a first chunk with the assistant role, then content
deltas; a choice's `finish_reason` comes after its last text, in a chunk whose delta
is empty (as OpenAI, vLLM and llama-server send it). With
`stream_options.include_usage` every chunk has `"usage": null` and one last chunk
with no choices carries the usage.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagedllm.engine.async_llm import RequestStream
from pagedllm.entrypoints.openai.errors import bad_request
from pagedllm.entrypoints.openai.protocol import SAMPLING_PARAM_NAMES, ChatCompletionRequest
from pagedllm.entrypoints.openai.serving_base import (
    OpenAIServing,
    finite,
    new_id,
    prompt_logprobs_json,
    split_endings,
    sse,
    sse_error,
    token_text,
    top_entries,
    usage,
)
from pagedllm.entrypoints.openai.tool_calls import (
    TOOL_CALL_PARSERS,
    ContentHoldback,
    ToolCall,
    new_call_id,
    parse_auto,
    parse_required,
)
from pagedllm.outputs import Logprob
from pagedllm.sampling_params import BeamSearchParams, SamplingParams

_PARAMS = (
    *SAMPLING_PARAM_NAMES,
    "messages",
    "top_logprobs",
    "max_completion_tokens",
    "tool_choice",
    "tools",
    "chat_template_kwargs",
)


@dataclass
class _Choice:
    text: str = ""
    num_tokens: int = 0
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatServing(OpenAIServing):
    """Builds OpenAI `chat.completion` responses and chunks from engine deltas; with
    tools, parses the answers' calls into `tool_calls` (tool_calls.py)."""

    def __init__(self, *args: Any, tool_call_parser: str = "hermes", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(
                f"tool_call_parser must be one of {TOOL_CALL_PARSERS}, got {tool_call_parser!r}"
            )
        self.tool_call_parser = tool_call_parser

    def _calls(self, body: ChatCompletionRequest, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of one finished answer under the body's tool mode."""
        mode = body.tool_mode()
        if mode == "none":
            return text, []
        if mode == "named":
            return None, [ToolCall(body.named_function()["name"], text)]
        if mode == "required":
            return None, parse_required(text)
        return parse_auto(text, self.tool_call_parser)

    async def render(self, body: ChatCompletionRequest) -> list[int]:
        """The conversation's prompt token ids (ValueError when the template refuses it)."""
        if not body.messages:
            raise ValueError("messages must not be empty")

        tools = None
        if body.tool_mode() != "none":
            tools = [{"type": "function", "function": f} for f in body.tool_functions()]

        def encode() -> list[int]:
            messages = [m.to_template() for m in body.messages]
            text = self.tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=body.add_generation_prompt is not False,
                tools=tools,
                extra_variables=body.chat_template_kwargs,
            )
            return self.tokenizer.encode(text, add_special_tokens=False)

        # Always off the loop: a template's cost depends on the template, not on the text.
        return await asyncio.to_thread(encode)

    async def engine_input(
        self, body: ChatCompletionRequest, params_named: tuple[str, ...] = _PARAMS
    ) -> tuple[SamplingParams | BeamSearchParams, list[int]]:
        """The one place a conversation becomes engine input (chat, and Anthropic's
        messages): its sampling params and prompt ids, checked; 400 naming the field."""
        try:
            params = body.to_sampling_params()
            prompt_ids = await self.render(body)
        except ValueError as e:
            raise bad_request(e, params_named) from e
        self.check_length(len(prompt_ids), params, "messages")
        return params, prompt_ids

    async def create(self, body: ChatCompletionRequest, raw: Request) -> Response:
        model = self.check_model(body.model)
        params, prompt_ids = await self.engine_input(body)
        request_id = new_id("chatcmpl")
        (stream,) = await self.start(request_id, [prompt_ids], params)
        header = self.response_header(request_id, model)
        num = params.logprobs if isinstance(params, SamplingParams) else None
        if body.stream:
            return self.sse(self._stream(body, header, len(prompt_ids), stream, num), [stream])
        return await self.until_disconnect(
            raw, self._full(body, header, len(prompt_ids), stream, num), [stream]
        )

    async def _full(
        self,
        body: ChatCompletionRequest,
        header: dict[str, Any],
        num_prompt: int,
        stream: RequestStream,
        num: int | None,
    ) -> Response:
        choices = [_Choice() for _ in range(body.n or 1)]
        cached = 0
        prompt_logprobs = None
        async for _, delta in self.merged([stream]):
            cached = delta.num_cached_tokens
            if delta.prompt_logprobs is not None:
                prompt_logprobs = delta.prompt_logprobs
            for c in delta.outputs:
                choice = choices[c.index]
                choice.text += c.text
                choice.num_tokens += len(c.token_ids)
                if num is not None:
                    choice.logprobs += self._logprobs(c.token_ids, c.logprobs or [], num)
                choice.finish_reason, choice.stop_reason = c.finish_reason, c.stop_reason
        out = []
        for index, choice in enumerate(choices):
            content, calls = self._calls(body, choice.text)
            message: dict[str, Any] = {"role": "assistant", "content": content}
            finish_reason = choice.finish_reason
            if calls:
                message["tool_calls"] = [call.to_openai(new_call_id()) for call in calls]
                if finish_reason == "stop":
                    finish_reason = "tool_calls"
            out.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": None if num is None else {"content": choice.logprobs},
                    "finish_reason": finish_reason,
                    "stop_reason": choice.stop_reason,
                }
            )
        num_completion = sum(c.num_tokens for c in choices)
        response = {
            **header,
            "object": "chat.completion",
            "choices": out,
            "usage": usage(num_prompt, num_completion, cached),
        }
        if body.prompt_logprobs is not None:
            response["prompt_logprobs"] = prompt_logprobs_json(prompt_logprobs, self.tokenizer)
        return JSONResponse(response)

    async def _stream(
        self,
        body: ChatCompletionRequest,
        header: dict[str, Any],
        num_prompt: int,
        stream: RequestStream,
        num: int | None,
    ) -> AsyncIterator[str]:
        base: dict[str, Any] = {**header, "object": "chat.completion.chunk"}
        if body.include_usage:
            base["usage"] = None
        num_completion = cached = 0
        tools = _StreamedCalls(self, body)
        try:
            for index in range(body.n or 1):
                first = {"role": "assistant", "content": ""}
                choice = {"index": index, "delta": first, "logprobs": None, "finish_reason": None}
                yield sse({**base, "choices": [choice]})
            async for _, delta in self.merged([stream]):
                cached = delta.num_cached_tokens
                choices = []
                for c in delta.outputs:
                    num_completion += len(c.token_ids)
                    logprobs = None
                    if num is not None:
                        logprobs = {"content": self._logprobs(c.token_ids, c.logprobs or [], num)}
                    finish_reason = c.finish_reason
                    delta_body, made_calls = tools.feed(c.index, c.text, finish_reason is not None)
                    if made_calls and finish_reason == "stop":
                        finish_reason = "tool_calls"
                    choices.append(
                        {
                            "index": c.index,
                            "delta": delta_body,
                            "logprobs": logprobs,
                            "finish_reason": finish_reason,
                            "stop_reason": c.stop_reason,
                        }
                    )
                for part in split_endings(choices, {"delta": {}, "logprobs": None}):
                    if part:
                        yield sse({**base, "choices": part})
            if body.include_usage:
                yield sse(
                    {**base, "choices": [], "usage": usage(num_prompt, num_completion, cached)}
                )
        except Exception as e:
            yield sse_error(e)
        yield sse("[DONE]")

    def _logprobs(
        self, ids: list[int], entries: list[dict[int, Logprob]], num: int
    ) -> list[dict[str, Any]]:
        """OpenAI's chat logprobs: per token its text, logprob, UTF-8 bytes and the top `num`."""
        out = []
        for token_id, entry in zip(ids, entries, strict=True):
            lp = entry.get(token_id)
            text = token_text(token_id, lp, self.tokenizer)
            out.append(
                {
                    "token": text,
                    "logprob": None if lp is None else finite(lp.logprob),
                    "bytes": list(text.encode()),
                    "top_logprobs": [
                        {
                            "token": (t := token_text(tid, x, self.tokenizer)),
                            "logprob": finite(x.logprob),
                            "bytes": list(t.encode()),
                        }
                        for tid, x in top_entries(entry, num)
                    ],
                }
            )
        return out


class _StreamedCalls:
    """Turns each choice's text deltas into chat deltas under the body's tool mode: plain
    content; a named function's arguments as they come; a forced ("required") answer's
    calls at its end; an "auto" answer's content up to its first call, then its calls."""

    def __init__(self, serving: ChatServing, body: ChatCompletionRequest) -> None:
        self.serving = serving
        self.body = body
        self.mode = body.tool_mode()
        self.texts: dict[int, str] = {}
        self.holdbacks: dict[int, ContentHoldback] = {}
        self.started: set[int] = set()

    def feed(self, index: int, text: str, finished: bool) -> tuple[dict[str, Any], bool]:
        """(the chunk's delta, whether the choice made calls) for one output delta."""
        mode = self.mode
        if mode == "none":
            return ({"content": text} if text else {}), False
        self.texts[index] = self.texts.get(index, "") + text
        if mode == "named":
            return self._named(index, text), True
        # the whole answer is parsed once, at its end
        calls = self.serving._calls(self.body, self.texts[index])[1] if finished else []
        delta: dict[str, Any] = {}
        if mode == "auto":
            holdback = self.holdbacks.get(index)
            if holdback is None:
                holdback = ContentHoldback(self.serving.tool_call_parser)
                self.holdbacks[index] = holdback
            content = holdback.feed(text)
            if finished:
                content += holdback.flush(bool(calls))
            if content:
                delta["content"] = content
        if calls:
            delta["tool_calls"] = [
                {"index": i, **call.to_openai(new_call_id())} for i, call in enumerate(calls)
            ]
        return delta, bool(calls)

    def _named(self, index: int, text: str) -> dict[str, Any]:
        call: dict[str, Any] = {"index": 0, "function": {"arguments": text}}
        if index not in self.started:  # the first chunk names the call
            self.started.add(index)
            name = self.body.named_function()["name"]
            call = {"index": 0, "id": new_call_id(), "type": "function",
                    "function": {"name": name, "arguments": text}}  # fmt: skip
        elif not text:
            return {}
        return {"tool_calls": [call]}
