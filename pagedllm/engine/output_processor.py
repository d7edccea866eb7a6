"""Sampled tokens → RequestOutputs: detokenization, stop strings, logprobs and timings.

One user request may own several sequences (n > 1 children); the processor keeps
one detokenizer per sequence and one RequestOutput per user request.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from pagedllm.request import Request, RequestStatus
from pagedllm.sampling_params import SamplingParams
from pagedllm.tokenizer import Tokenizer
from pagedllm.worker.model_runner import PromptLogprobsChunk, SampledRow

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one step's tokens did to the requests' outputs."""

    outputs: list[RequestOutput]
    stopped_by_string: list[str]  # sequence ids a stop string ended
    failed: dict[str, str] = field(default_factory=dict)  # user request id → what went wrong


@dataclass
class _Sequence:
    index: int
    detokenizer: IncrementalDetokenizer
    completion: CompletionOutput


@dataclass
class RequestState:
    """The engine-side view of one user request across all its sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    sequences: dict[str, _Sequence] = field(default_factory=dict)
    num_cached_tokens: int = 0
    error: str | None = None
    # None for the first prompt token, which nothing predicts; filled chunk by chunk
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    def finished(self) -> bool:
        return len(self.sequences) == self.params.n and all(
            s.completion.finished() for s in self.sequences.values()
        )


class OutputProcessor:
    """Owns every live request's text state; turns each step's tokens into outputs."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}  # by user request id
        self.owner: dict[str, str] = {}  # sequence id → user request id

    def add_request(
        self, request: Request, prompt: str | None, arrival_time: float | None = None
    ) -> None:
        state = RequestState(
            request_id=request.request_id,
            prompt=prompt,
            prompt_token_ids=request.prompt_token_ids,
            params=request.sampling_params,
            metrics=RequestMetrics(arrival_time=arrival_time or time.monotonic()),
            prompt_logprobs=None if request.sampling_params.prompt_logprobs is None else [None],
        )
        self.states[request.request_id] = state
        self.add_sequence(request.request_id, request.request_id, 0)

    def add_sequence(self, user_request_id: str, sequence_id: str, index: int) -> None:
        state = self.states[user_request_id]
        detok = IncrementalDetokenizer(self.tokenizer.hf, state.prompt_token_ids, state.params)
        completion = CompletionOutput(
            index=index,
            text="",
            token_ids=[],
            cumulative_logprob=None if state.params.logprobs is None else 0.0,
            logprobs=None if state.params.logprobs is None else [],
        )
        state.sequences[sequence_id] = _Sequence(index, detok, completion)
        self.owner[sequence_id] = user_request_id

    def process(
        self,
        sampled: dict[str, SampledRow],
        requests: dict[str, Request],
        finished: dict[str, Request],
        scheduled_ids: list[str],
        prompt_logprobs: dict[str, PromptLogprobsChunk] | None = None,
    ) -> StepResult:
        """Apply a step's tokens: the changed outputs, stop-string ends and failures.

        `requests` are the live sequences, `finished` those the scheduler just ended.
        A request whose processing raised is left out of the outputs and named in
        `failed`; the caller aborts it (``abort(..., error=...)``).
        """
        now = time.monotonic()
        for seq_id, chunk in (prompt_logprobs or {}).items():
            state = self.states.get(self.owner.get(seq_id, ""))
            if state is not None:
                self._add_prompt_logprobs(state, chunk)
        touched: dict[str, RequestState] = {}
        for seq_id in scheduled_ids:
            state = self.states.get(self.owner.get(seq_id, ""))
            if state is not None and state.metrics.first_scheduled_time is None:
                state.metrics.first_scheduled_time = now
        stopped_by_string: list[str] = []
        failed: dict[str, str] = {}
        for seq_id, row in sampled.items():
            user_id = self.owner.get(seq_id)
            if user_id is None or user_id in failed:
                continue
            state = self.states[user_id]
            try:
                stopped = self._apply(state, seq_id, row, requests, finished, now)
            except Exception as e:
                # Fault isolation: a bug or a bad token in one request (its detokenizer,
                # its logprobs) fails that request alone; the batch goes on.
                logger.exception("processing request %s failed", user_id)
                failed[user_id] = f"processing the output failed: {type(e).__name__}: {e}"
                touched.pop(user_id, None)
                continue
            if stopped:
                stopped_by_string.append(seq_id)
            touched[user_id] = state
        outputs = [self._output(state, now) for state in touched.values()]
        return StepResult(outputs, stopped_by_string, failed)

    def _apply(
        self,
        state: RequestState,
        seq_id: str,
        row: SampledRow,
        requests: dict[str, Request],
        finished: dict[str, Request],
        now: float,
    ) -> bool:
        """Add one sequence's sampled tokens; True if a stop string ended it."""
        seq = state.sequences[seq_id]
        request = finished.get(seq_id) or requests.get(seq_id)
        if request is not None and not state.num_cached_tokens:
            state.num_cached_tokens = request.num_cached_tokens
        done = request is None or request.is_finished
        stopped_on_token = (
            done and request is not None and (request.status is RequestStatus.FINISHED_STOPPED)
        )
        update = seq.detokenizer.update(
            row.token_ids, finished=done, stopped_on_token=stopped_on_token
        )
        completion = seq.completion
        completion.token_ids.extend(row.token_ids)
        completion.text += update.delta_text
        if row.logprobs is not None and completion.logprobs is not None:
            self._add_logprobs(completion, row, state.params.logprobs or 0)
        metrics = state.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.last_token_time = now
        metrics.num_generation_tokens += len(row.token_ids)
        if update.stop_string is not None and not done:
            completion.finish_reason = "stop"
            completion.stop_reason = update.stop_string
            return True
        if done and request is not None:
            completion.finish_reason = request.status.finish_reason
            completion.stop_reason = (
                update.stop_string if update.stop_string is not None else request.stop_reason
            )
        return False

    def _add_logprobs(self, completion: CompletionOutput, row: SampledRow, num: int) -> None:
        assert row.logprobs is not None and completion.logprobs is not None
        decode = self.tokenizer.decode
        for token_id, (top_ids, top_lps, lp, rank) in zip(row.token_ids, row.logprobs, strict=True):
            entry = {token_id: Logprob(lp, rank, decode([token_id], skip_special_tokens=False))}
            for r, (tid, tlp) in enumerate(zip(top_ids[:num], top_lps[:num], strict=True)):
                if tid not in entry:
                    entry[tid] = Logprob(tlp, r + 1, decode([tid], skip_special_tokens=False))
            completion.logprobs.append(entry)
            completion.cumulative_logprob = (completion.cumulative_logprob or 0.0) + lp

    def _add_prompt_logprobs(self, state: RequestState, chunk: PromptLogprobsChunk) -> None:
        """Append a chunk's scores; rows seen before (a preempted prompt recomputed) are skipped."""
        recorded = state.prompt_logprobs
        if recorded is None:
            return
        num = state.params.prompt_logprobs or 0
        decode = self.tokenizer.decode
        ids = state.prompt_token_ids
        # entry k of the chunk scores prompt token chunk.start + 1 + k, i.e. list index the same
        for k in range(len(recorded) - 1 - chunk.start, len(chunk.rows)):
            top_ids, top_lps, lp, rank = chunk.rows[k]
            token_id = ids[chunk.start + 1 + k]
            entry = {token_id: Logprob(lp, rank, decode([token_id], skip_special_tokens=False))}
            for r, (tid, tlp) in enumerate(zip(top_ids[:num], top_lps[:num], strict=True)):
                if tid not in entry:
                    entry[tid] = Logprob(tlp, r + 1, decode([tid], skip_special_tokens=False))
            recorded.append(entry)

    def abort(
        self, user_request_id: str, reason: str = "abort", error: str | None = None
    ) -> RequestOutput | None:
        """Mark every unfinished sequence of a request as ended and return its final output."""
        state = self.states.get(user_request_id)
        if state is None:
            return None
        for seq in state.sequences.values():
            if seq.completion.finish_reason is None:
                seq.completion.finish_reason = reason
        state.error = error
        return self._output(state, time.monotonic(), force_finished=True)

    def sequence_ids(self, user_request_id: str) -> list[str]:
        state = self.states.get(user_request_id)
        return list(state.sequences) if state else []

    def _output(
        self, state: RequestState, now: float, force_finished: bool = False
    ) -> RequestOutput:
        finished = force_finished or state.finished()
        if finished:
            state.metrics.finished_time = now
            for seq_id in state.sequences:
                self.owner.pop(seq_id, None)
            self.states.pop(state.request_id, None)
        completions = sorted(
            (s.completion for s in state.sequences.values()), key=lambda c: c.index
        )
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=[_snapshot(c) for c in completions],
            finished=finished,
            metrics=state.metrics,
            num_cached_tokens=state.num_cached_tokens,
            prompt_logprobs=None if state.prompt_logprobs is None else list(state.prompt_logprobs),
            error=state.error,
        )


def _snapshot(c: CompletionOutput) -> CompletionOutput:
    """A copy whose lists later steps will not grow under the caller."""
    return CompletionOutput(
        index=c.index,
        text=c.text,
        token_ids=list(c.token_ids),
        cumulative_logprob=c.cumulative_logprob,
        logprobs=None if c.logprobs is None else list(c.logprobs),
        finish_reason=c.finish_reason,
        stop_reason=c.stop_reason,
    )
