"""What the engine asks of a drafting method. The scheduler only sees each request's
`spec_token_ids`: their count decides the slots it verifies next step."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from pagedllm.core.sched_output import NewRequestData, SchedulerOutput
from pagedllm.request import Request

# A draft slot whose token the proposer fills after scheduling (a draft model runs
# once it knows how many drafts each request may verify and where their KV goes).
PENDING_DRAFT = -1


def decodes_next(request: Request) -> bool:
    """Whether the request's next step computes its last token and samples after it: the
    only steps drafts can follow (not mid-prefill, not preempted, not an embedding,
    which samples nothing), and not under structured output (its grammar would have to
    follow the drafts and roll back the rejected ones)."""
    return (
        request.num_computed_tokens == request.num_tokens - 1
        and not request.is_finished
        and request.pooling is None
        and request.sampling_params.structured_outputs is None
    )


class Proposer(Protocol):
    def propose(self, requests: Iterable[Request]) -> None:
        """Between steps: set `spec_token_ids` on decoding requests, as tokens or as
        PENDING_DRAFT slots that `draft` fills."""

    def draft(self, sched: SchedulerOutput, requests: Mapping[str, NewRequestData]) -> None:
        """After scheduling, before the target's forward: replace every PENDING_DRAFT
        in the scheduled requests' token ids."""

    def observe(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        """A verified step's result for one request."""

    def release(self, request_ids: Iterable[str]) -> None:
        """Forget finished, aborted and preempted requests."""

    def live_request_ids(self) -> set[str]:
        """Requests the proposer keeps state for (checked against the live ones)."""
