"""What one scheduling step decided, as plain data for the worker and the engine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pagedllm.core.block_pool import BlockHash
from pagedllm.core.kv_connector import KVLoad
from pagedllm.sampling_params import SamplingParams


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step.

    The step computes ``token_ids`` at positions ``num_computed_tokens_before`` to
    ``num_computed_tokens_before + num_new_tokens - 1``. ``is_prefill_chunk`` is
    True when tokens remain to be computed after this step: no token is sampled
    for the request (a partial prefill). Otherwise the request samples from the
    logits of its last scheduled position. The last ``num_draft_tokens`` of
    ``token_ids`` are speculative drafts: the step verifies them (one logits row per
    scheduled position) and the request keeps the computed KV of the accepted ones only.
    """

    request_id: str
    num_new_tokens: int
    num_computed_tokens_before: int
    new_block_ids: list[int]  # appended to the block table this step (new request: all)
    is_prefill_chunk: bool
    token_ids: list[int]  # the tokens whose KV this step computes
    num_draft_tokens: int = 0
    # output tokens the request gained since the worker last saw it (a request new to
    # the worker comes whole in SchedulerOutput.new_requests instead)
    new_output_token_ids: Sequence[int] = ()

    @property
    def samples(self) -> bool:
        """Whether a token is sampled for this request after the step."""
        return not self.is_prefill_chunk


@dataclass(slots=True)
class NewRequestData:
    """What the worker keeps of a request, sent the first step it is scheduled (and again
    after a preemption, which drops the worker's copy): after that only its new output
    tokens travel, in ``ScheduledRequest.new_output_token_ids``."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # a copy: the worker appends the deltas to it
    sampling_params: SamplingParams
    eos_token_id: int | None
    pooling: str | None = None  # an embedding request's pooling ("last", "mean", "cls")
    pooling_normalize: bool = True

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids


@dataclass
class SchedulerOutput:
    """A step's batch, in batch order, and the bookkeeping the worker acts on first.

    The worker performs ``block_copies`` (copy-on-write, source to destination, in
    order) before running the step, drops its state for ``finished_req_ids`` and
    ``preempted_req_ids``, and reads each scheduled request's block table from
    ``block_tables`` (group 0's; with more than one KV-cache layer group every group's
    are in ``group_block_tables``, group 0 first). Those are the scheduler's own lists,
    shared to save a copy per request per step: read them before the next
    ``schedule()``, never change them. With a KV connector, the worker first copies out
    ``kv_saves`` ((hash, block id, evicted): their KV is still there), then starts
    ``kv_loads`` (blocks of requests waiting for remote KV), then everything above.

    It holds everything a worker needs, so another process can run the step: the
    requests it has not seen (``new_requests``: prompts, parameters, output so far) and
    for the others only the tokens they gained; ``num_samples`` asks for more than one
    draw from a request's last row (the first tokens of an n > 1 request).
    """

    scheduled_requests: list[ScheduledRequest] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    block_tables: dict[str, list[int]] = field(default_factory=dict)
    group_block_tables: dict[str, list[list[int]]] = field(default_factory=dict)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted_req_ids: list[str] = field(default_factory=list)
    finished_req_ids: set[str] = field(default_factory=set)  # since the previous step
    kv_saves: list[tuple[BlockHash, int, bool]] = field(default_factory=list)
    kv_loads: list[KVLoad] = field(default_factory=list)
    new_requests: list[NewRequestData] = field(default_factory=list)
    num_samples: dict[str, int] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        """True when no token is computed this step."""
        return self.total_num_scheduled_tokens == 0


@dataclass
class SchedulerStats:
    """Counters and gauges for metrics (``pagedllm:`` Prometheus names in comments)."""

    num_running: int = 0  # num_requests_running
    num_waiting: int = 0  # num_requests_waiting
    kv_cache_usage: float = 0.0  # kv_cache_usage_perc, as a fraction
    prefix_cache_queries: int = 0  # prefix_cache_queries (tokens)
    prefix_cache_hits: int = 0  # prefix_cache_hits (tokens)
    num_preemptions_total: int = 0  # num_preemptions_total

    @property
    def prefix_cache_hit_rate(self) -> float:
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        )
