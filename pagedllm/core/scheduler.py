"""Iteration-level scheduling: which requests run in the next step, and how far.

One rule covers prefill, chunked prefill, decode, prefix hits and resumption
after preemption: each step moves every chosen request's ``num_computed_tokens``
toward its ``num_tokens``, within the step's token budget. Running requests are
served first, in admission order (one decode token each, or their next prefill
chunk); waiting requests are admitted after them while budget, sequence slots and
free blocks last. When a running request cannot get a block, the most recently
admitted request (under "priority": the lowest priority one) is preempted: its
blocks are freed and it goes back to the head of the waiting queue to be
recomputed later, taking back whatever of its KV survived in the prefix cache.
With a KV connector (core/kv_connector.py), a waiting request whose prompt blocks
past the prefix hit the connector holds is admitted into ``loading`` instead: it
holds its blocks while the worker fills them, then joins ``running``.

The engine calls, per step and in this order: ``schedule()``, the model on the
returned batch, ``update_from_output()``. Aborts (``finish_requests``), new
arrivals and forks happen between steps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from pagedllm.config import CacheConfig, SchedulerConfig
from pagedllm.core.block_pool import BlockHash
from pagedllm.core.invariants import require
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.kv_connector import KVConnectorScheduler, KVLoad
from pagedllm.core.request_queue import make_request_queue
from pagedllm.core.sched_output import (
    NewRequestData,
    ScheduledRequest,
    SchedulerOutput,
    SchedulerStats,
)
from pagedllm.request import Request, RequestStatus
from pagedllm.sampling_params import SamplingParams


class QueueFullError(RuntimeError):
    """The waiting queue is at ``max_waiting``: try again later (HTTP 503)."""


class Scheduler:
    """Decides each step's batch and owns every unfinished request's state."""

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_blocks: int,
        sliding_windows: Sequence[int | None] = (None,),
        kv_connector: KVConnectorScheduler | None = None,
    ) -> None:
        """``sliding_windows``: one entry per KV-cache layer group (None: full attention).
        ``kv_connector``: where blocks past the prefix cache are kept (one group only)."""
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        self.max_model_len = scheduler_config.max_model_len
        self.block_size = cache_config.block_size
        self.kv_cache_manager = KVCacheManager(
            num_blocks,
            cache_config.block_size,
            cache_config.enable_prefix_caching,
            sliding_windows,
            scheduler_config.max_num_batched_tokens,
        )
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.waiting = make_request_queue(scheduler_config.policy)
        self.running: list[Request] = []  # in admission order; forks follow their parent
        self.finished_req_ids: set[str] = set()  # since the last schedule()
        # what the worker holds of each request: how many output tokens it has seen
        self._worker_output_lens: dict[str, int] = {}
        self.num_prompt_tokens_total = 0  # prompt positions computed (prompt_tokens_total)
        self.num_preemptions_total = 0
        if kv_connector is not None and len(sliding_windows) > 1:
            raise ValueError("a KV connector needs a model with one KV-cache layer group")
        self.kv_connector = kv_connector
        if kv_connector is not None:
            self.kv_cache_manager.block_pool.block_events = []
        # WAITING_FOR_REMOTE_KV: (tokens hit locally, blocks loading, first admission)
        self.loading: dict[str, Request] = {}
        self._loads: dict[str, tuple[int, int, bool]] = {}
        self._kv_loads: list[KVLoad] = []  # started since the last schedule()
        # aborted while loading: their blocks are freed once the load is reported
        self._free_after_load: set[str] = set()
        self.num_remote_tokens_total = 0  # prompt tokens a connector supplied
        # Where a request without max_tokens stops: the end of the context, or of the
        # whole KV pool when that is smaller (the last sampled token needs no slot).
        # Without the cap such a request would be refused outright on a small pool.
        self.default_max_len = self.kv_cache_manager.max_sequence_tokens(self.max_model_len - 1) + 1

    # ---------------------------------------------------------------- intake

    def add_request(self, request: Request, admitted: bool = False) -> None:
        """Queue a new request, or refuse it now if it could never run to the end.

        Raises ValueError (request marked FINISHED_IGNORED) when its prompt plus
        max_tokens exceeds the model's context or the whole KV pool, and
        QueueFullError when the waiting queue is full, unless `admitted`: the request
        continues one already admitted (a beam search's re-queued beam), which a full
        queue must not fail midway.
        """
        if request.request_id in self.requests or request.request_id in self._free_after_load:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens:
            raise ValueError(
                f"request {request.request_id!r} must be new (WAITING, nothing computed), "
                f"got status {request.status.name}"
            )
        request.resolve_max_tokens(self.default_max_len)
        problem = self._never_fits(request)
        if problem is not None:
            request.status = RequestStatus.FINISHED_IGNORED
            raise ValueError(f"request {request.request_id!r} rejected: {problem}")
        max_waiting = self.scheduler_config.max_waiting
        if not admitted and max_waiting is not None and len(self.waiting) >= max_waiting:
            raise QueueFullError(
                f"request {request.request_id!r} refused: {len(self.waiting)} requests are "
                f"already waiting (max_waiting={max_waiting})"
            )
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def _never_fits(self, request: Request) -> str | None:
        """Why the request can never finish here, or None if it can."""
        num_prompt = request.num_prompt_tokens
        max_len = self.max_model_len
        if num_prompt == 0:
            return "the prompt is empty"
        if num_prompt >= max_len:
            return (
                f"the prompt has {num_prompt} tokens but max_model_len is {max_len}, "
                "leaving no room for output"
            )
        max_tokens = request.max_tokens
        assert max_tokens is not None  # resolved by the caller
        if num_prompt + max_tokens > max_len:
            return (
                f"the prompt ({num_prompt} tokens) plus max_tokens ({max_tokens}) is "
                f"{num_prompt + max_tokens} tokens, more than max_model_len ({max_len}); "
                f"set max_tokens to at most {max_len - num_prompt}"
            )
        kv = self.kv_cache_manager
        # Before the check below: on a small pool a default max_tokens may be < 1.
        if kv.blocks_needed(num_prompt) > kv.num_blocks:
            return (
                f"the prompt has {num_prompt} tokens but the whole KV cache holds "
                f"{kv.max_sequence_tokens(num_prompt)} ({kv.num_blocks} KV-cache blocks)"
            )
        # The last sampled token is never fed back, so it needs no KV slot.
        num_blocks = kv.blocks_needed(num_prompt + max_tokens - 1)
        if num_blocks > kv.num_blocks:
            return (
                f"the prompt ({num_prompt} tokens) plus max_tokens ({max_tokens}) needs up to "
                f"{num_blocks} KV-cache blocks but the whole cache has {kv.num_blocks}"
            )
        return None

    # -------------------------------------------------------------- schedule

    def schedule(self) -> SchedulerOutput:
        """Choose the next step's batch; advances each chosen request's computed tokens."""
        cfg = self.scheduler_config
        kv = self.kv_cache_manager
        budget = cfg.max_num_batched_tokens
        max_seqs = cfg.max_num_seqs
        scheduled: list[ScheduledRequest] = []
        num_scheduled: dict[str, int] = {}
        preempted: list[str] = []
        running = self.running
        allocate_slots = kv.allocate_slots

        i = 0
        while i < len(running) and budget > 0 and len(scheduled) < max_seqs:
            request = running[i]
            before = request.num_computed_tokens
            num_new = len(request.all_token_ids) - before
            # Running requests are past their prompt (a prompt without chunking is
            # admitted whole), so only a chunked prefill is ever cut to the budget.
            if num_new > budget:
                num_new = budget
            elif num_new <= 0:
                i += 1
                continue
            drafts = request.spec_token_ids
            num_drafts = 0
            if drafts:
                request.spec_token_ids = []
                if num_new == 1:
                    num_drafts = self._num_drafts(request, len(drafts), budget - 1)
                    new_ids = allocate_slots(request, 1 + num_drafts) if num_drafts else None
                    if new_ids is None:
                        num_drafts = 0  # no room for them: decode plainly
                    else:
                        num_new = 1 + num_drafts
            if not num_drafts:
                new_ids = allocate_slots(request, num_new)
            while new_ids is None:
                victim_index = self._victim_index()
                victim = running.pop(victim_index)
                if victim.request_id in num_scheduled:
                    # Only under "priority": give back what it was given this step.
                    budget += num_scheduled.pop(victim.request_id)
                    scheduled = [s for s in scheduled if s.request_id != victim.request_id]
                if victim_index < i:
                    i -= 1
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
                new_ids = allocate_slots(request, num_new)
            if new_ids is None:
                continue  # the request preempted itself; running[i] is the next one
            after = before + num_new
            # Drafts count as computed only once verified (update_from_output).
            request.num_computed_tokens = after - num_drafts
            tokens = request.all_token_ids
            scheduled.append(
                ScheduledRequest(
                    request.request_id,
                    num_new,
                    before,
                    new_ids,
                    after - num_drafts < len(tokens),
                    tokens[before : after - num_drafts] + drafts[:num_drafts],
                    num_drafts,
                )
            )
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            i += 1

        # Admitting while preempting would only preempt again next step.
        if not preempted:
            budget = self._admit_waiting(budget, scheduled, num_scheduled)

        output = SchedulerOutput(
            scheduled_requests=scheduled,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=cfg.max_num_batched_tokens - budget,
            block_tables={s.request_id: kv.get_block_table(s.request_id) for s in scheduled},
            group_block_tables=(
                {s.request_id: kv.get_group_block_tables(s.request_id) for s in scheduled}
                if kv.num_groups > 1
                else {}
            ),
            block_copies=kv.take_pending_copies(),
            preempted_req_ids=preempted,
            finished_req_ids=self.finished_req_ids,
            new_requests=self._account(scheduled),
        )
        self.finished_req_ids = set()
        if self.kv_connector is not None:
            output.kv_loads, self._kv_loads = self._kv_loads, []
            output.kv_saves = self.take_kv_saves()
        return output

    def _account(self, scheduled: list[ScheduledRequest]) -> list[NewRequestData]:
        """The scheduled requests the worker has not seen, whole; for the others, set
        the output tokens gained since it last did on their ScheduledRequest. Counts the
        prompt tokens the step computes."""
        new: list[NewRequestData] = []
        seen = self._worker_output_lens
        requests = self.requests
        for s in scheduled:
            request_id = s.request_id
            request = requests[request_id]
            before, prompt = s.num_computed_tokens_before, len(request.prompt_token_ids)
            if before < prompt:
                self.num_prompt_tokens_total += min(before + s.num_new_tokens, prompt) - before
            output = request.output_token_ids
            known, now = seen.get(request_id), len(output)
            if known is None:
                new.append(
                    NewRequestData(
                        request_id,
                        request.prompt_token_ids,
                        list(output),
                        request.sampling_params,
                        request.eos_token_id,
                        request.pooling,
                        request.pooling_normalize,
                    )
                )
            elif known != now:
                s.new_output_token_ids = output[known:]
            seen[request_id] = now
        return new

    def take_kv_saves(self) -> list[tuple[BlockHash, int, bool]]:
        """Blocks cached or evicted since the last call that the connector wants saved,
        as (hash, block id, evicted): their KV stays intact until the next step runs. The
        engine takes them after each step too, so a block is saved as soon as computed."""
        if self.kv_connector is None:
            return []
        wants = self.kv_connector.wants_block
        events = self.kv_cache_manager.block_pool.take_block_events()
        return [e for e in events if wants(e[0], e[2])]

    def _admit_waiting(
        self,
        budget: int,
        scheduled: list[ScheduledRequest],
        num_scheduled: dict[str, int],
    ) -> int:
        """Move waiting requests to running while budget, slots and blocks last."""
        cfg = self.scheduler_config
        kv = self.kv_cache_manager
        waiting = self.waiting
        while (
            waiting
            and budget > 0
            and len(self.running) + len(self.loading) < cfg.max_num_seqs
            and len(scheduled) < cfg.max_num_seqs
        ):
            request = waiting.peek()
            computed_blocks, num_hit = kv.get_computed_blocks(request)
            remote = self._remote_block_hashes(request, num_hit)
            if remote:
                num_remote = len(remote) * self.block_size
                if kv.allocate_slots(request, num_remote, computed_blocks, num_hit) is None:
                    break
                waiting.pop()
                self._start_load(request, num_hit, remote)
                continue
            num_new = request.num_tokens - num_hit
            if not cfg.enable_chunked_prefill and num_new > budget:
                break
            num_new = min(num_new, budget)
            new_ids = kv.allocate_slots(request, num_new, computed_blocks, num_hit)
            if new_ids is None:
                break  # keep the order: nobody overtakes the head of the queue
            waiting.pop()
            if request.status is RequestStatus.WAITING:
                request.num_cached_tokens = num_hit
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit
            self.running.append(request)
            scheduled.append(self._scheduled(request, num_hit, num_new, new_ids))
            num_scheduled[request.request_id] = num_new
            budget -= num_new
        return budget

    def _remote_block_hashes(self, request: Request, num_hit: int) -> list[BlockHash]:
        """The prompt's blocks right after the local hit that the connector can supply."""
        if self.kv_connector is None:
            return []
        hashes = self.kv_cache_manager.prompt_block_hashes(request)[num_hit // self.block_size :]
        if not hashes:
            return []
        params = request.sampling_params.kv_transfer_params
        return hashes[: max(0, self.kv_connector.num_loadable_blocks(hashes, params))]

    def _start_load(self, request: Request, num_hit: int, hashes: list[BlockHash]) -> None:
        """Park an admitted request while the worker fills its blocks from the connector."""
        first = num_hit // self.block_size
        block_ids = self.kv_cache_manager.get_block_ids(request.request_id)
        first_admission = request.status is RequestStatus.WAITING
        request.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.loading[request.request_id] = request
        self._loads[request.request_id] = (num_hit, len(hashes), first_admission)
        self._kv_loads.append(
            KVLoad(
                request.request_id,
                hashes,
                block_ids[first : first + len(hashes)],
                request.sampling_params.kv_transfer_params,
            )
        )

    def finish_kv_loads(self, num_loaded: dict[str, int]) -> None:
        """Resume requests whose loads ended: ``num_loaded[id]`` leading blocks arrived
        (fewer than asked: the transfer failed there and the rest is recomputed)."""
        kv = self.kv_cache_manager
        for request_id, num_blocks in num_loaded.items():
            if request_id in self._free_after_load:
                self._free_after_load.discard(request_id)
                kv.free(request_id)
                continue
            request = self.loading.pop(request_id, None)
            if request is None:
                continue
            num_hit, num_asked, first_admission = self._loads.pop(request_id)
            num_remote = max(0, min(num_blocks, num_asked)) * self.block_size
            self.num_remote_tokens_total += num_remote
            request.num_computed_tokens = num_hit + num_remote
            if first_admission:
                request.num_cached_tokens = num_hit + num_remote
            request.status = RequestStatus.RUNNING
            kv.cache_blocks(request, request.num_computed_tokens)
            self.running.append(request)

    @property
    def num_pending_loads(self) -> int:
        """Loads the worker has not reported yet (aborted requests' included)."""
        return len(self.loading) + len(self._free_after_load)

    @staticmethod
    def _scheduled(
        request: Request, before: int, num_new: int, new_ids: list[int]
    ) -> ScheduledRequest:
        after = before + num_new
        request.num_computed_tokens = after
        return ScheduledRequest(
            request.request_id,
            num_new,
            before,
            new_ids,
            after < len(request.all_token_ids),
            request.all_token_ids[before:after],
        )

    @staticmethod
    def _num_drafts(request: Request, proposed: int, budget: int) -> int:
        """How many of a decoding request's drafts to verify: within the step's budget,
        and never more than its remaining output allows (one token always comes from the
        step itself), so a verified step cannot pass max_tokens or the context."""
        max_tokens = request.max_tokens
        assert max_tokens is not None
        room = max_tokens - request.num_output_tokens - 1
        return max(0, min(proposed, budget, room))

    def _victim_index(self) -> int:
        """Index in ``running`` of the request to preempt next."""
        running = self.running
        if self.scheduler_config.policy == "priority":
            # Lowest priority (largest value), then latest arrival, then latest admitted.
            best = len(running) - 1
            best_key = (running[best].priority, running[best].arrival_time)
            for j in range(len(running) - 2, -1, -1):
                key = (running[j].priority, running[j].arrival_time)
                if key > best_key:
                    best, best_key = j, key
            return best
        return len(running) - 1

    def _preempt(self, request: Request) -> None:
        """Free the request's blocks and queue it for recomputation."""
        self.kv_cache_manager.free(request.request_id)
        self._worker_output_lens.pop(request.request_id, None)  # the worker drops it too
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.prepend(request)

    # ---------------------------------------------------------------- update

    def update_from_output(
        self,
        scheduler_output: SchedulerOutput,
        sampled_token_ids: dict[str, list[int]],
        forks: Mapping[str, Sequence[tuple[str, int, SamplingParams]]] | None = None,
    ) -> list[Request]:
        """Record a finished step: cache full blocks, append sampled tokens, stop.

        Requests still mid-prefill sample nothing. A request that stops partway through
        its tokens (a stop inside accepted drafts) keeps those up to the stop, and its
        list in ``sampled_token_ids`` is cut there too. ``forks``: the first draws of n > 1
        requests, per parent (child id, its first token, its parameters): the children
        share the parent's blocks before the parent takes its own first token. Returns
        the requests that finished in this step, their blocks already freed (children
        their first token ended among them, never having run).
        """
        cache_blocks = self.kv_cache_manager.cache_blocks
        requests = self.requests
        running = RequestStatus.RUNNING
        max_len = self.max_model_len
        ended_at_fork = [
            child
            for parent_id, children in (forks or {}).items()
            for child in self._fork_first_draws(parent_id, children)
        ]
        finished: list[Request] = []
        for sched in scheduler_output.scheduled_requests:
            request_id = sched.request_id
            request = requests.get(request_id)
            if request is None or request.status is not running:
                continue  # aborted since the step was scheduled
            sampled = sampled_token_ids.get(request_id, ())
            if sched.num_draft_tokens:
                # Keep the KV of the last token and of the accepted drafts: the tokens
                # the step emits, but the last one, which is not computed yet. Their
                # blocks are cached below, once the drafts are part of the sequence.
                request.num_computed_tokens = sched.num_computed_tokens_before + max(
                    1, len(sampled)
                )
                self.kv_cache_manager.rollback(request_id, request.num_computed_tokens)
            else:
                num_computed = request.num_computed_tokens
                cache_blocks(request, num_computed)
                if num_computed < len(request.all_token_ids):
                    continue
                if request.pooling is not None:  # an embedding: done with its prompt
                    request.status = RequestStatus.FINISHED_STOPPED
                    finished.append(request)
                    continue
            several = len(sampled) > 1  # a verification's accepted drafts and its token
            num_before = request.num_output_tokens if several else 0
            for token_id in sampled:
                request.append_output_token_ids(token_id)
                if request.check_stop(max_len):
                    finished.append(request)
                    if several and isinstance(sampled, list):
                        del sampled[request.num_output_tokens - num_before :]
                    break
            if sched.num_draft_tokens:
                cache_blocks(request, min(request.num_computed_tokens, request.num_tokens))
        if finished:
            for request in finished:
                self._release(request)
            self.running = [r for r in self.running if not r.is_finished]
        return finished + ended_at_fork

    def _fork_first_draws(
        self, parent_id: str, children: Sequence[tuple[str, int, SamplingParams]]
    ) -> list[Request]:
        """Fork an n > 1 request's children from their first draws; returns those their
        first token already ends (EOS, max_tokens 1): never forked, as a child with
        nothing left to generate cannot be."""
        parent = self.requests[parent_id]
        ended, live = [], []
        for child_id, token, params in children:
            child = parent.fork(child_id, sampling_params=params, output_token_ids=[token])
            child.resolve_max_tokens(self.default_max_len)
            (ended if child.check_stop(self.max_model_len) else live).append(child)
        if live:
            self.fork_request(parent_id, live)
        return ended

    def finish_requests(
        self, request_ids: str | Iterable[str], status: RequestStatus
    ) -> list[Request]:
        """End requests from outside (abort, stop string) and free all they hold.

        Unknown or already finished ids are ignored, so an abort racing a
        natural finish is harmless. Returns the requests finished by this call.
        """
        if not status.is_finished:
            raise ValueError(f"status must be a finished status, got {status.name}")
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        done: list[Request] = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request.status is RequestStatus.WAITING_FOR_REMOTE_KV:
                # its blocks are being written: they go back once the load is reported
                del self.loading[request_id], self._loads[request_id]
                self._free_after_load.add(request_id)
            elif request.status is not RequestStatus.RUNNING:
                self.waiting.remove(request)
            request.status = status
            self._release(request)
            done.append(request)
        if done:
            self.running = [r for r in self.running if not r.is_finished]
        return done

    def _release(self, request: Request) -> None:
        if request.request_id not in self._free_after_load:
            self.kv_cache_manager.free(request.request_id)
        del self.requests[request.request_id]
        self._worker_output_lens.pop(request.request_id, None)
        self.finished_req_ids.add(request.request_id)

    # ------------------------------------------------------------------ fork

    def fork_request(self, parent_id: str, children: list[Request]) -> None:
        """Add children that share every block of a running parent (n > 1, beams).

        Call between ``update_from_output`` and the next ``schedule``. Each child
        (see ``Request.fork``) must agree with the parent on every token whose KV
        is computed and have at least one more to compute; it may differ in the
        last, not yet computed token (beam search). Children run right after the
        parent. All-or-nothing: on ValueError nothing has changed.
        """
        parent = self.requests.get(parent_id)
        if parent is None or parent.status is not RequestStatus.RUNNING:
            raise ValueError(f"cannot fork {parent_id!r}: it is not a running request")
        num_computed = parent.num_computed_tokens
        prefix = parent.all_token_ids[:num_computed]
        seen: set[str] = set()
        for child in children:
            cid = child.request_id
            if cid in self.requests or cid in seen or cid in self._free_after_load:
                raise ValueError(f"cannot fork into {cid!r}: request_id already in use")
            seen.add(cid)
            if child.prompt_token_ids != parent.prompt_token_ids:
                raise ValueError(f"fork child {cid!r} must have its parent's prompt")
            if child.num_tokens <= num_computed or child.all_token_ids[:num_computed] != prefix:
                raise ValueError(
                    f"fork child {cid!r} must share the parent's {num_computed} computed "
                    "tokens and have a token left to compute"
                )
            child.resolve_max_tokens(self.default_max_len)
            problem = self._never_fits(child)
            if problem is None and child.num_output_tokens >= (child.max_tokens or 0):
                problem = f"it already has max_tokens ({child.max_tokens}) output tokens"
            if problem is not None:
                raise ValueError(f"cannot fork into {cid!r}: {problem}")

        for child in children:
            self.kv_cache_manager.fork(parent_id, child.request_id)
            child.parent_id = parent_id
            child.status = RequestStatus.RUNNING
            child.num_computed_tokens = num_computed
            child.num_cached_tokens = parent.num_cached_tokens
            self.requests[child.request_id] = child
        at = self.running.index(parent) + 1
        self.running[at:at] = children

    # --------------------------------------------------------------- queries

    def get_request(self, request_id: str) -> Request | None:
        """An unfinished request by id (finished ones are forgotten)."""
        return self.requests.get(request_id)

    def has_unfinished_requests(self) -> bool:
        """Requests alive, or loads still to be reported (their blocks to be freed)."""
        return bool(self.requests) or bool(self._free_after_load)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.loading)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks in use, in [0, 1]."""
        return self.kv_cache_manager.get_usage()

    @property
    def stats(self) -> SchedulerStats:
        """A snapshot of the gauges and counters the metrics module exports."""
        kv = self.kv_cache_manager
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=self.num_waiting,
            kv_cache_usage=kv.get_usage(),
            prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            num_preemptions_total=self.num_preemptions_total,
        )

    def check_invariants(self) -> None:
        """Raise InvariantError unless queues, requests and blocks agree (tests, debug)."""
        kv = self.kv_cache_manager
        require(
            len(self.running) + len(self.waiting) + len(self.loading) == len(self.requests),
            f"lost a request: {len(self.running)} running + {len(self.waiting)} waiting + "
            f"{len(self.loading)} loading != {len(self.requests)} unfinished",
        )
        for rid, request in self.loading.items():
            require(
                request.status is RequestStatus.WAITING_FOR_REMOTE_KV,
                f"loading {rid!r} has status {request.status.name}",
            )
            require(self.requests.get(rid) is request, f"loading {rid!r} is not a known request")
            require(kv.holds_blocks(rid), f"loading {rid!r} holds no blocks")
        for request in self.running:
            rid = request.request_id
            require(request.status is RequestStatus.RUNNING, f"running {rid!r} is not RUNNING")
            require(self.requests.get(rid) is request, f"running {rid!r} is not a known request")
            require(
                request.num_computed_tokens <= request.num_tokens,
                f"{rid!r} computed more tokens than it has",
            )
            num_slots = len(kv.get_block_ids(rid)) * self.block_size
            require(
                num_slots >= request.num_computed_tokens,
                f"{rid!r} has computed tokens without slots",
            )
        for request in self.waiting:
            rid = request.request_id
            require(
                request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED),
                f"waiting {rid!r} has status {request.status.name}",
            )
            require(self.requests.get(rid) is request, f"waiting {rid!r} is not a known request")
            require(request.num_computed_tokens == 0, f"waiting {rid!r} has computed tokens")
            require(not kv.holds_blocks(rid), f"waiting {rid!r} holds blocks")
        kv.check_invariants(self.requests.keys() | self._free_after_load, self.requests)
