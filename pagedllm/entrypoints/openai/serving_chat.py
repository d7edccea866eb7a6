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
    now_s,
    split_endings,
    sse,
    sse_error,
    token_text,
    top_entries,
    usage,
)
from pagedllm.outputs import Logprob

_PARAMS = (*SAMPLING_PARAM_NAMES, "messages", "top_logprobs", "max_completion_tokens")


@dataclass
class _Choice:
    text: str = ""
    num_tokens: int = 0
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatServing(OpenAIServing):
    """Builds OpenAI `chat.completion` responses and chunks from engine deltas."""

    async def render(self, body: ChatCompletionRequest) -> list[int]:
        """The conversation's prompt token ids (ValueError when the template refuses it)."""
        if not body.messages:
            raise ValueError("messages must not be empty")

        def encode() -> list[int]:
            messages = [m.to_template() for m in body.messages]
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=body.add_generation_prompt is not False
            )
            return self.tokenizer.encode(text, add_special_tokens=False)

        # Always off the loop: a template's cost depends on the template, not on the text.
        return await asyncio.to_thread(encode)

    async def create(self, body: ChatCompletionRequest, raw: Request) -> Response:
        model = self.check_model(body.model)
        try:
            params = body.to_sampling_params()
            prompt_ids = await self.render(body)
        except ValueError as e:
            raise bad_request(e, _PARAMS) from e
        self.check_length(len(prompt_ids), params, "messages")
        request_id = new_id("chatcmpl")
        (stream,) = await self.start(request_id, [prompt_ids], params)
        header = {
            "id": request_id,
            "created": now_s(),
            "model": model,
            "system_fingerprint": self.system_fingerprint,
        }
        num = params.logprobs
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
        async for _, delta in self.merged([stream]):
            cached = delta.num_cached_tokens
            for c in delta.outputs:
                choice = choices[c.index]
                choice.text += c.text
                choice.num_tokens += len(c.token_ids)
                if num is not None:
                    choice.logprobs += self._logprobs(c.token_ids, c.logprobs or [], num)
                choice.finish_reason, choice.stop_reason = c.finish_reason, c.stop_reason
        out = [
            {
                "index": index,
                "message": {"role": "assistant", "content": choice.text},
                "logprobs": None if num is None else {"content": choice.logprobs},
                "finish_reason": choice.finish_reason,
                "stop_reason": choice.stop_reason,
            }
            for index, choice in enumerate(choices)
        ]
        num_completion = sum(c.num_tokens for c in choices)
        return JSONResponse(
            {
                **header,
                "object": "chat.completion",
                "choices": out,
                "usage": usage(num_prompt, num_completion, cached),
            }
        )

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
                    choices.append(
                        {
                            "index": c.index,
                            "delta": {"content": c.text} if c.text else {},
                            "logprobs": logprobs,
                            "finish_reason": c.finish_reason,
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
