"""`POST /v1/completions`: text or token-id prompts, one or many, streamed or whole.

Choice `i * n + k` is completion k of prompt i, as in OpenAI's API. With `echo`
the prompt's text (and, with `logprobs`, its scores) comes before the completion.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagedllm.engine.async_llm import RequestStream
from pagedllm.entrypoints.openai.errors import APIError, bad_request
from pagedllm.entrypoints.openai.protocol import SAMPLING_PARAM_NAMES, CompletionRequest
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
from pagedllm.outputs import Logprob


@dataclass
class _Prompt:
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None] | None = None


@dataclass
class _Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob] | None] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionServing(OpenAIServing):
    """Builds OpenAI `text_completion` responses and chunks from engine deltas."""

    async def create(self, body: CompletionRequest, raw: Request) -> Response:
        model = self.check_model(body.model)
        try:
            params = body.to_sampling_params()
            prompts = [await self._prompt(p) for p in body.prompts()]
        except ValueError as e:
            raise bad_request(e, (*SAMPLING_PARAM_NAMES, "prompt", "suffix", "best_of")) from e
        for p in prompts:
            self.check_length(len(p.token_ids), params, "prompt")
        request_id = new_id("cmpl")
        streams = await self.start(request_id, [p.token_ids for p in prompts], params)
        header = self.response_header(request_id, model)
        num = body.logprobs
        if body.stream:
            return self.sse(self._stream(body, header, prompts, streams, num), streams)
        return await self.until_disconnect(
            raw, self._full(body, header, prompts, streams, num), streams
        )

    async def _prompt(self, prompt: str | list[int]) -> _Prompt:
        def prepare() -> _Prompt:
            ids = self.llm.tokenize_prompt(prompt)
            if isinstance(prompt, str):
                return _Prompt(prompt, ids)
            return _Prompt(self.tokenizer.decode(ids, skip_special_tokens=False), ids)

        try:
            return await self.off_loop(prepare, len(prompt))
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from e

    async def _full(
        self,
        body: CompletionRequest,
        header: dict[str, Any],
        prompts: list[_Prompt],
        streams: list[RequestStream],
        num: int | None,
    ) -> Response:
        n = body.n or 1
        choices = [_Choice() for _ in range(len(prompts) * n)]
        cached = 0
        async for i, delta in self.merged(streams):
            if delta.prompt_logprobs is not None:
                prompts[i].logprobs = delta.prompt_logprobs
            cached += delta.num_cached_tokens if delta.finished else 0
            for c in delta.outputs:
                choice = choices[i * n + c.index]
                choice.text += c.text
                choice.token_ids += c.token_ids
                choice.logprobs += c.logprobs or []
                choice.finish_reason, choice.stop_reason = c.finish_reason, c.stop_reason
        out = []
        for index, choice in enumerate(choices):
            prompt = prompts[index // n]
            text, ids, lps = choice.text, choice.token_ids, choice.logprobs
            if body.echo:
                text = prompt.text + text
                ids = prompt.token_ids + ids
                lps = (prompt.logprobs or [None] * len(prompt.token_ids)) + lps
            entry = {
                "index": index,
                "text": text,
                "logprobs": None if num is None else self._logprobs(ids, lps, num, 0),
                "finish_reason": choice.finish_reason,
                "stop_reason": choice.stop_reason,
            }
            if body.prompt_logprobs is not None:
                entry["prompt_logprobs"] = prompt_logprobs_json(prompt.logprobs, self.tokenizer)
            out.append(entry)
        num_prompt = sum(len(p.token_ids) for p in prompts)
        num_completion = sum(len(c.token_ids) for c in choices)
        return JSONResponse(
            {
                **header,
                "object": "text_completion",
                "choices": out,
                "usage": usage(num_prompt, num_completion, cached),
            }
        )

    async def _stream(
        self,
        body: CompletionRequest,
        header: dict[str, Any],
        prompts: list[_Prompt],
        streams: list[RequestStream],
        num: int | None,
    ) -> AsyncIterator[str]:
        n = body.n or 1
        include_usage = body.include_usage
        base = {**header, "object": "text_completion"}
        if include_usage:
            base["usage"] = None
        offsets = [0] * (len(prompts) * n)  # text offset of each choice, for logprobs
        echoed: set[int] = set()
        num_completion = cached = 0
        try:
            async for i, delta in self.merged(streams):
                prompt = prompts[i]
                if delta.prompt_logprobs is not None:
                    prompt.logprobs = delta.prompt_logprobs
                cached += delta.num_cached_tokens if delta.finished else 0
                choices = []
                for c in delta.outputs:
                    index = i * n + c.index
                    text, ids, lps = c.text, c.token_ids, list(c.logprobs or [])
                    num_completion += len(ids)
                    if body.echo and index not in echoed:
                        echoed.add(index)
                        text = prompt.text + text
                        ids = prompt.token_ids + ids
                        lps = (prompt.logprobs or [None] * len(prompt.token_ids)) + lps
                    logprobs = None
                    if num is not None:
                        logprobs = self._logprobs(ids, lps, num, offsets[index])
                        offsets[index] += sum(len(t) for t in logprobs["tokens"])
                    choices.append(
                        {
                            "index": index,
                            "text": text,
                            "logprobs": logprobs,
                            "finish_reason": c.finish_reason,
                            "stop_reason": c.stop_reason,
                        }
                    )
                for part in split_endings(choices, {"text": "", "logprobs": None}):
                    if part:
                        yield sse({**base, "choices": part})
            if include_usage:
                num_prompt = sum(len(p.token_ids) for p in prompts)
                yield sse(
                    {**base, "choices": [], "usage": usage(num_prompt, num_completion, cached)}
                )
        except Exception as e:
            yield sse_error(e)
        yield sse("[DONE]")

    def _logprobs(
        self, ids: list[int], entries: list[dict[int, Logprob] | None], num: int, offset: int
    ) -> dict[str, Any]:
        """OpenAI's legacy logprobs object: tokens, their logprobs, the top `num`, offsets."""
        tokens, token_logprobs, tops, offsets = [], [], [], []
        for token_id, entry in zip(ids, entries, strict=True):
            lp = None if entry is None else entry.get(token_id)
            text = token_text(token_id, lp, self.tokenizer)
            tokens.append(text)
            token_logprobs.append(None if lp is None else finite(lp.logprob))
            if entry is None:
                tops.append(None)
            else:
                top = top_entries(entry, num)
                tops.append({token_text(t, x, self.tokenizer): finite(x.logprob) for t, x in top})
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": tops,
            "text_offset": offsets,
        }
