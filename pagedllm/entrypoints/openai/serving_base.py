"""What the completion and chat endpoints share: model check, prompt limits, streams, SSE.

A request's engine requests are aborted whenever its response ends early, tied to
the response's lifetime rather than to a generator that may never start: the
client disconnected (before the first byte, mid-stream, or while a non-streaming
answer was being built), stopped reading for `SEND_TIMEOUT_S`, a sibling prompt
was refused, or the server is shutting down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

import pagedllm
from pagedllm.engine.async_llm import AsyncLLM, RequestDelta, RequestStream
from pagedllm.entrypoints.openai.errors import APIError, from_exception
from pagedllm.entrypoints.openai.protocol import SAMPLING_PARAM_NAMES
from pagedllm.outputs import Logprob
from pagedllm.sampling_params import BeamSearchParams, SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")
# Inputs up to this many characters or ids are tokenized on the event loop (a few ms).
_INLINE_SIZE = 16_384
# A stream whose client has not taken a chunk for this long is ended and its requests
# aborted: a reader that stalls must not hold KV blocks and unread text for ever.
SEND_TIMEOUT_S = 60.0


class OpenAIServing:
    """State shared by the endpoints: the engine, the model's names, the context length."""

    def __init__(self, llm: AsyncLLM, served_model_names: Sequence[str]) -> None:
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.model_names = list(served_model_names)
        self.max_model_len = llm.max_model_len
        # stable for one build of one model, as vLLM's: the version and the model's file
        self.system_fingerprint = f"pagedllm-{pagedllm.__version__}-{llm.engine.model_path.stem}"
        # a prefill instance (kv_producer) names its KV server in every response, for the
        # router to pass to a decode instance as that request's kv_transfer_params
        self.kv_transfer_params = llm.engine.kv_transfer_params()

    def response_header(self, request_id: str, model: str) -> dict[str, Any]:
        """The fields every completion response and chunk starts with."""
        header = {
            "id": request_id,
            "created": now_s(),
            "model": model,
            "system_fingerprint": self.system_fingerprint,
        }
        if self.kv_transfer_params is not None:
            header["kv_transfer_params"] = self.kv_transfer_params
        return header

    def check_model(self, name: str | None) -> str:
        """The name to answer with; 404 for a model this server does not serve."""
        if name is None or name in self.model_names:
            return self.model_names[0]
        raise APIError(
            404, f"the model {name!r} does not exist", param="model", code="model_not_found"
        )

    def check_length(
        self, num_prompt: int, params: SamplingParams | BeamSearchParams, prompt_param: str
    ) -> None:
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
        self,
        base_id: str,
        prompts: Sequence[list[int]],
        params: SamplingParams | BeamSearchParams,
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
        """(prompt index, delta) from every stream as they come.

        Ending early aborts nothing here: `sse` and `until_disconnect` abort the streams
        when the response ends, which covers a reader that never started as well.
        """
        iterator = _single(streams[0]) if len(streams) == 1 else _merge(streams)
        try:
            async for item in iterator:
                yield item
        finally:
            await iterator.aclose()

    def abort_unfinished(self, streams: Sequence[RequestStream]) -> None:
        for stream in streams:
            if not stream.finished:
                self.llm.abort(stream.request_id)

    def sse(self, content: AsyncIterator[str], streams: Sequence[RequestStream]) -> SSEResponse:
        """The event stream of `content`; however the response ends, `streams` end too."""
        return SSEResponse(content, on_close=lambda: self.abort_unfinished(streams))

    async def until_disconnect(
        self, request: Request, work: Awaitable[Response], streams: Sequence[RequestStream]
    ) -> Response:
        """A non-streaming answer; a disconnect cancels it, and `streams` end either way."""
        try:
            return await until_disconnect(request.receive, work)
        finally:
            self.abort_unfinished(streams)


async def _single(stream: RequestStream) -> AsyncIterator[tuple[int, RequestDelta]]:
    async for delta in stream:
        yield 0, delta


async def _merge(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestDelta]]:
    """Deltas of several streams as they come, one read pending per stream.

    Reading only when the consumer asks keeps unread deltas in their streams, where
    they are merged, instead of in a queue of their own.
    """
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):
                i = pending.pop(task)
                try:
                    delta = task.result()
                except StopAsyncIteration:
                    continue
                yield i, delta
                pending[asyncio.ensure_future(anext(streams[i]))] = i
    finally:
        for task in pending:
            task.cancel()


def split_endings(
    choices: list[dict[str, Any]], empty: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """OpenAI's stream shape: a choice's last text (and logprobs) come in one chunk and its
    `finish_reason` in the next, with an empty delta (`empty`: the choice's content fields,
    emptied). Clients that read text only while finish_reason is null lose nothing.
    Returns (the choices for the content chunk, those for the endings chunk)."""
    content, endings = [], []
    for choice in choices:
        if choice["finish_reason"] is None:
            content.append(choice)
            continue
        endings.append({**choice, **empty})
        if any(choice[key] != value for key, value in empty.items()):
            content.append({**choice, "finish_reason": None, "stop_reason": None})
    return content, endings


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


def prompt_logprobs_json(
    entries: list[dict[int, Logprob] | None] | None, tokenizer: Any
) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token (None for the first, which nothing
    predicts) its id's and the top ids' logprob, rank and text, keyed by id."""
    if entries is None:
        return None
    return [
        None
        if entry is None
        else {
            str(token_id): {
                "logprob": finite(lp.logprob),
                "rank": lp.rank,
                "decoded_token": token_text(token_id, lp, tokenizer),
            }
            for token_id, lp in entry.items()
        }
        for entry in entries
    ]


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def sse_error(error: BaseException) -> str:
    return sse(from_exception(error, SAMPLING_PARAM_NAMES).body())


class SSEResponse(StreamingResponse):
    """Server-sent events that end early when the client leaves or stops reading.

    `on_close` runs however the response ends, even if the client left before the
    first chunk, when the body's generator never started (so its `finally` never runs).
    """

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_or_give_up(message: Message) -> None:
            await asyncio.wait_for(send(message), SEND_TIMEOUT_S)

        try:
            await until_disconnect(receive, super().__call__(scope, _never, send_or_give_up))
        except TimeoutError:
            logger.warning("a client read nothing for %.0f s; its stream is ended", SEND_TIMEOUT_S)
        except (ClientDisconnect, OSError):
            pass  # the client left while a chunk was being sent: nobody is left to tell
        finally:
            try:
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                self.on_close()


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T | Response:
    """`work`, cancelled if the client disconnects first (then a 499 nobody will read)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        return Response(status_code=499)  # the work is cancelled below
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        # Let the cancellation finish, so the body's generator is closed before anyone
        # calls aclose() on it (which fails on a generator still running).
        await asyncio.wait({task})


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _never() -> Message:
    """A receive for Starlette's own disconnect listener: this class listens instead."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")
