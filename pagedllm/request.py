"""A request as the engine tracks it: token ids, progress, status and stop checks.

The scheduler's single rule works on two numbers per request: ``num_tokens`` (prompt
plus output so far) and ``num_computed_tokens`` (tokens whose KV is in the cache).
Each step moves the second toward the first; a request samples a new token only in
a step after which they are equal.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from pagedllm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    """Where a request is in its life; every status from FINISHED_STOPPED on is final."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    # admitted, its blocks allocated, while a KV connector loads part of its prompt's KV
    WAITING_FOR_REMOTE_KV = enum.auto()
    FINISHED_STOPPED = enum.auto()  # EOS, a stop token id or a stop string
    FINISHED_LENGTH_CAPPED = enum.auto()  # max_tokens or the model's context reached
    FINISHED_ABORTED = enum.auto()  # cancelled by the user or the engine
    FINISHED_IGNORED = enum.auto()  # rejected at admission: it could never fit

    @property
    def is_finished(self) -> bool:
        """True for the four final statuses."""
        return self.value >= RequestStatus.FINISHED_STOPPED.value

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's ``finish_reason`` for a final status, None while alive."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_IGNORED: "length",
}


@dataclass(eq=False)
class Request:
    """One sequence being generated; forked children are Requests too.

    ``output_token_ids`` and ``all_token_ids`` must only grow through
    :meth:`append_output_token_ids`, which keeps the two lists in step.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0  # lower is served first under the "priority" policy
    # Extra prefix-cache key: requests with different salts never share blocks.
    cache_salt: str | None = None
    parent_id: str | None = None  # set on forked children
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prefix-cache hit at first admission
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None  # the stop token id or stop string
    num_preemptions: int = 0
    # Draft tokens proposed for the next step (speculative decoding): scheduled after the
    # last token and verified by the step; never part of the sequence until accepted.
    spec_token_ids: list[int] = field(default_factory=list, repr=False)
    # An embedding request: its prompt is computed and pooled, nothing is sampled, and it
    # ends (blocks freed) with its last prefill chunk. "last", "mean" or "cls".
    pooling: str | None = None
    pooling_normalize: bool = True
    all_token_ids: list[int] = field(init=False, repr=False)
    _max_tokens: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.output_token_ids = list(self.output_token_ids)
        self.all_token_ids = self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def needs_every_prompt_state(self) -> bool:
        """Whether the hidden state of every prompt position is read (mean or cls pooling):
        such a request computes its whole prompt, prefix-cache hits or not."""
        return self.pooling in ("mean", "cls")

    @property
    def max_tokens(self) -> int | None:
        """Output tokens allowed; an int once the scheduler has admitted the request."""
        if self._max_tokens is not None:
            return self._max_tokens
        return self.sampling_params.max_tokens

    def resolve_max_tokens(self, max_model_len: int) -> int:
        """Fix max_tokens: the user's value, or whatever context the prompt leaves."""
        if self.sampling_params.max_tokens is not None:
            self._max_tokens = self.sampling_params.max_tokens
        else:
            self._max_tokens = max_model_len - self.num_prompt_tokens
        return self._max_tokens

    def append_output_token_ids(self, token_ids: int | list[int]) -> None:
        """Add sampled tokens to the output (and to all_token_ids)."""
        if isinstance(token_ids, int):
            self.output_token_ids.append(token_ids)
            self.all_token_ids.append(token_ids)
        else:
            self.output_token_ids.extend(token_ids)
            self.all_token_ids.extend(token_ids)

    def check_stop(self, max_model_len: int) -> bool:
        """Decide, after a token was appended, whether the request is finished.

        Sets ``status`` (and ``stop_reason`` for a stop token) and returns True when
        it is. Stop strings are the output processor's job, not this one.
        """
        params = self.sampling_params
        output = self.output_token_ids
        num_output = len(output)
        if num_output and num_output >= params.min_tokens:
            last = output[-1]
            if last == self.eos_token_id and not params.ignore_eos:
                self.status = RequestStatus.FINISHED_STOPPED
                return True
            if params.stop_token_ids and last in params.stop_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                self.stop_reason = last
                return True
        max_tokens = self._max_tokens
        if max_tokens is None:
            max_tokens = params.max_tokens
        if (max_tokens is not None and num_output >= max_tokens) or (
            len(self.all_token_ids) >= max_model_len
        ):
            self.status = RequestStatus.FINISHED_LENGTH_CAPPED
            return True
        return False

    def fork(
        self,
        child_request_id: str,
        sampling_params: SamplingParams | None = None,
        output_token_ids: list[int] | None = None,
    ) -> Request:
        """A child with this request's tokens, ready for ``Scheduler.fork_request``.

        ``output_token_ids`` lets beam search give the child a different last token;
        the tokens whose KV is already computed must stay the parent's.
        """
        child = Request(
            request_id=child_request_id,
            prompt_token_ids=self.prompt_token_ids,
            sampling_params=sampling_params or self.sampling_params,
            eos_token_id=self.eos_token_id,
            arrival_time=self.arrival_time,
            priority=self.priority,
            cache_salt=self.cache_salt,
            parent_id=self.request_id,
            output_token_ids=(
                self.output_token_ids if output_token_ids is None else output_token_ids
            ),
            num_computed_tokens=self.num_computed_tokens,
            num_cached_tokens=self.num_cached_tokens,
            status=self.status,
        )
        return child
