"""One request on the synchronous engine, its text streamed to a terminal as it grows.

Shared by `pagedllm generate` and `pagedllm chat`. Ctrl-C during a reply becomes a
flag checked between engine steps: a KeyboardInterrupt raised inside `step()` could
leave the scheduler half-updated, so the request is aborted only between steps.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams


class StopOnSigint:
    """While active, SIGINT (Ctrl-C) sets `requested` instead of raising KeyboardInterrupt."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: signal.Handlers | Callable | int | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def __enter__(self) -> StopOnSigint:
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)


@dataclass
class Reply:
    """A finished (or stopped) completion: its text and what it cost."""

    text: str
    finish_reason: str | None  # "stop", "length" or "abort" (Ctrl-C)
    prompt_tokens: int
    generated_tokens: int
    ttft: float | None  # seconds from queueing to the first token
    decode_seconds: float | None  # first token → last token
    elapsed: float

    @property
    def interrupted(self) -> bool:
        return self.finish_reason == "abort"

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed: tokens after the first over the time they took (llama.cpp's eval rate)."""
        if not self.decode_seconds or self.generated_tokens < 2:
            return None
        return (self.generated_tokens - 1) / self.decode_seconds

    def timings(self) -> str:
        """One line: prompt tokens, TTFT, generated tokens, tokens/s."""
        ttft = "n/a" if self.ttft is None else f"{self.ttft * 1000:.1f} ms"
        tps = self.tokens_per_second
        rate = "n/a" if tps is None else f"{tps:.1f} tokens/s"
        return (
            f"prompt: {self.prompt_tokens} tokens | TTFT: {ttft} | "
            f"generated: {self.generated_tokens} tokens in {self.elapsed:.2f} s | {rate}"
        )


def stream_reply(
    engine: LLMEngine,
    prompt_token_ids: list[int],
    params: SamplingParams,
    write: Callable[[str], object],
) -> Reply:
    """Run one request to its end, passing each new piece of text to `write`.

    Ctrl-C aborts the request between steps and returns what was generated so far.
    A prompt the engine refuses raises ValueError before anything is written.
    """
    request_id = engine.new_request_id()
    start = time.monotonic()
    engine.add_request(request_id, {"prompt_token_ids": prompt_token_ids}, params)
    last: RequestOutput | None = None
    printed = 0
    try:
        with StopOnSigint() as sigint:
            while last is None or not last.finished:
                if sigint.requested:
                    aborted = engine.abort_request(request_id)
                    last = aborted[0] if aborted else last
                    break
                for output in engine.step():
                    if output.request_id != request_id:
                        continue
                    text = output.outputs[0].text
                    if len(text) > printed:
                        write(text[printed:])
                        printed = len(text)
                    last = output
    except BaseException:
        engine.abort_request(request_id)
        raise
    assert last is not None  # the loop ends only with an output
    completion = last.outputs[0]
    metrics = last.metrics
    decode = None
    if metrics.first_token_time is not None and metrics.last_token_time is not None:
        decode = metrics.last_token_time - metrics.first_token_time
    return Reply(
        text=completion.text[:printed],
        finish_reason=completion.finish_reason,
        prompt_tokens=len(prompt_token_ids),
        generated_tokens=len(completion.token_ids),
        ttft=metrics.time_to_first_token,
        decode_seconds=decode,
        elapsed=time.monotonic() - start,
    )
