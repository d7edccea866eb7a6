"""stream_reply: text streamed as it grows; Ctrl-C aborts between steps, never inside one."""

from __future__ import annotations

import os
import signal

import pytest

from pagedllm.entrypoints.streaming import StopOnSigint, stream_reply
from pagedllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagedllm.sampling_params import SamplingParams


class FakeEngine:
    """Grows one request's text by a word per step; `interrupt_at` sends Ctrl-C mid-step."""

    def __init__(self, words: list[str], interrupt_at: int | None = None) -> None:
        self.words = words
        self.interrupt_at = interrupt_at
        self.steps = 0
        self.aborted: list[str] = []
        self.request_id = ""
        self.in_step = False

    def new_request_id(self) -> str:
        return "r0"

    def add_request(self, request_id: str, prompt: dict, params: SamplingParams) -> None:
        self.request_id = request_id
        self.metrics = RequestMetrics(arrival_time=0.0)

    def _output(self, finish_reason: str | None) -> RequestOutput:
        n = self.steps
        completion = CompletionOutput(
            0, "".join(self.words[:n]), list(range(n)), None, None, finish_reason
        )
        return RequestOutput(
            self.request_id, None, [1, 2, 3], [completion], finish_reason is not None, self.metrics
        )

    def step(self) -> list[RequestOutput]:
        self.in_step = True
        self.steps += 1
        if self.steps == self.interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)  # arrives while the step is running
        self.metrics.first_token_time = self.metrics.first_token_time or 1.0
        self.metrics.last_token_time = float(self.steps)
        done = self.steps == len(self.words)
        self.in_step = False
        return [self._output("length" if done else None)]

    def abort_request(self, request_id: str) -> list[RequestOutput]:
        assert not self.in_step
        self.aborted.append(request_id)
        return [self._output("abort")]


def test_streams_each_new_piece_once() -> None:
    engine = FakeEngine(["Hello", ",", " world", "!"])
    pieces: list[str] = []
    reply = stream_reply(engine, [1, 2, 3], SamplingParams(), pieces.append)  # type: ignore[arg-type]
    assert pieces == ["Hello", ",", " world", "!"]
    assert reply.text == "Hello, world!"
    assert reply.finish_reason == "length"
    assert (reply.prompt_tokens, reply.generated_tokens) == (3, 4)
    assert reply.tokens_per_second == pytest.approx(3 / 3.0)  # 3 tokens after the first in 3 s
    assert not engine.aborted


def test_sigint_during_a_step_aborts_after_it() -> None:
    engine = FakeEngine(["a", "b", "c", "d", "e", "f"], interrupt_at=2)
    pieces: list[str] = []
    reply = stream_reply(engine, [1, 2, 3], SamplingParams(), pieces.append)  # type: ignore[arg-type]
    assert engine.steps == 2  # the interrupted step finished; no step ran after it
    assert engine.aborted == ["r0"]
    assert reply.interrupted
    assert reply.text == "ab" == "".join(pieces)


def test_sigint_handler_is_restored() -> None:
    # Python's own handler, whatever pytest inherited: a shell starts background jobs
    # with SIGINT ignored, and then Python installs none.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopOnSigint() as sigint:
            os.kill(os.getpid(), signal.SIGINT)
            assert sigint.requested
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, inherited)
