"""What the completion and chat endpoints share: model check, prompt limits, streams, SSE.

A request's engine requests are aborted whenever the handler stops early: the
client disconnected, a sibling prompt was refused, or the server is shutting down.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from pagedllm.engine.async_llm import AsyncLLM, RequestDelta, RequestStream
from pagedllm.entrypoints.openai.errors import APIError, from_exception
from pagedllm.entrypoints.openai.protocol import SAMPLING_PARAM_NAMES
from pagedllm.outputs import Logprob
from pagedllm.sampling_params import SamplingParams

T = TypeVar("T")
# Inputs up to this many characters or ids are tokenized on the event loop (a few ms).
_INLINE_SIZE = 16_384


class OpenAIServing:
    """State shared by the endpoints: the engine, the model's names, the context length."""

    def __init__(self, llm: AsyncLLM, served_model_names: Sequence[str]) -> None:
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.model_names = list(served_model_names)
        self.max_model_len = llm.max_model_len

    def check_model(self, name: str | None) -> str:
        """The name to answer with; 404 for a model this server does not serve."""
        if name is None or name in self.model_names:
            return self.model_names[0]
        raise APIError(
            404, f"the model {name!r} does not exist", param="model", code="model_not_found"
        )

    def check_length(self, num_prompt: int, params: SamplingParams, prompt_param: str) -> None:
        """400 unless the prompt plus max_tokens fits the context, as vLLM words it."""
        limit = self.max_model_len
        if num_prompt >= limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, your "
                f"{prompt_param} has {num_prompt} tokens, leaving no room for output.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if params.max_tokens is not None and num_prompt + params.max_tokens > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {num_prompt + params.max_tokens} tokens ({num_prompt} in the "
                f"{prompt_param}, {params.max_tokens} in the completion). Please reduce the "
                f"length of the {prompt_param} or the completion.",
                param="max_tokens",
                code="context_length_exceeded",
            )

    async def start(
        self, base_id: str, prompts: Sequence[list[int]], params: SamplingParams
    ) -> list[RequestStream]:
        """Queue one engine request per prompt, all at once; all or none are kept."""
        adds = [
            self.llm.add_request(f"{base_id}-{i}", {"prompt_token_ids": ids}, params)
            for i, ids in enumerate(prompts)
        ]
        results = await asyncio.gather(*adds, return_exceptions=True)
        streams = [r for r in results if isinstance(r, RequestStream)]
        if len(streams) < len(results):
            for stream in streams:
                self.llm.abort(stream.request_id)
            error = next(r for r in results if not isinstance(r, RequestStream))
            assert isinstance(error, BaseException)
            if not isinstance(error, Exception):
                raise error
            raise from_exception(error, SAMPLING_PARAM_NAMES) from error
        return streams

    async def off_loop(self, fn: Callable[[], T], size: int) -> T:
        """`fn()`, in a worker thread when `size` (characters, token ids) makes it slow.

        Tokenizing 4 MB of text takes about 2.5 s; the tokenizer releases the GIL,
        so in a thread it leaves the event loop serving other clients meanwhile.
        """
        if size < _INLINE_SIZE:
            return fn()
        return await asyncio.to_thread(fn)

    async def merged(
        self, streams: Sequence[RequestStream]
    ) -> AsyncIterator[tuple[int, RequestDelta]]:
        """(prompt index, delta) from every stream as they come; leaving early aborts them all."""
        iterator = _single(streams[0]) if len(streams) == 1 else _merge(streams)
        try:
            async for item in iterator:
                yield item
        finally:
            await iterator.aclose()
            for stream in streams:
                if not stream.finished:
                    self.llm.abort(stream.request_id)


async def _single(stream: RequestStream) -> AsyncIterator[tuple[int, RequestDelta]]:
    async for delta in stream:
        yield 0, delta


async def _merge(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestDelta]]:
    queue: asyncio.Queue[tuple[int, RequestDelta | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for delta in stream:
                queue.put_nowait((i, delta))
        except Exception as e:
            queue.put_nowait((i, e))
        queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def top_entries(entry: dict[int, Logprob], num: int) -> list[tuple[int, Logprob]]:
    """The `num` most likely candidates of a logprobs entry, by rank."""
    ranked = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)
    return [(tid, lp) for tid, lp in ranked if lp.rank is not None and lp.rank <= num][:num]


def finite(logprob: float) -> float:
    """A logprob JSON can carry: -inf (a banned token) becomes -9999.0, as in vLLM."""
    return max(logprob, -9999.0) if logprob == logprob else -9999.0


def token_text(token_id: int, lp: Logprob | None, tokenizer: Any) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return tokenizer.decode([token_id], skip_special_tokens=False)


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def sse_error(error: BaseException) -> str:
    return sse(from_exception(error, SAMPLING_PARAM_NAMES).body())


class SSEResponse(StreamingResponse):
    """Server-sent events whose generator is closed (so its requests aborted) however it ends."""

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


async def until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run a non-streaming handler, cancelling it (and so aborting its requests) on disconnect."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        return Response(status_code=499)  # nobody is left to read it
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
