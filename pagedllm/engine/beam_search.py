"""Beam search inside the engine's step: every beam stays resident as a Request.

Engines that resubmit each beam as a new request every token pay a prefix lookup
(or a recompute) per beam per token. Here a beam is a running Request that keeps
its blocks, scheduled in the same continuous batch as every other request: the
model runner returns each beam's top ``2 * beam_width`` raw logprobs, the pure
selection in ``pagedllm.sample.beam_search`` picks the survivors, and then

- a beam whose first survivor extends it takes that token, as a sampled token;
- its other survivors are forked from it (``Scheduler.fork_request``): children
  share every block, and copy-on-write splits the partly filled last block at
  their first write;
- a beam with no survivor is aborted, which frees its blocks.

The engine calls ``take`` between the model and ``update_from_output`` (beam rows
leave the step's sampled rows; the beams extended now get their token as the
step's sampled token) and ``apply`` after it (forks, aborts, finished searches).

A beam normally samples in the same step as its siblings. When it does not (one
was preempted, or ``max_num_seqs`` left one out), the candidates of those that did
wait until the rest have sampled too; a beam that has sampled and got no token yet
has nothing to compute, so the scheduler passes over it meanwhile (and should the
waiting ones need its blocks, ``unstick`` gives them up: it is recomputed later).
"""

from __future__ import annotations

import time
from collections.abc import Container
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagedllm.request import Request, RequestStatus
from pagedllm.sample.beam_search import BeamSearchState, Candidates
from pagedllm.sampling_params import BeamSearchParams, SamplingParams

if TYPE_CHECKING:
    from pagedllm.core.scheduler import Scheduler
    from pagedllm.tokenizer import Tokenizer
    from pagedllm.worker.model_runner import SampledRow


@dataclass
class _Search:
    """One prompt's search: live beam i of ``state`` is the request ``request_ids[i]``."""

    user_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    state: BeamSearchState
    request_ids: list[str]
    metrics: RequestMetrics
    pending: dict[str, Candidates] = field(default_factory=dict)  # sampled, not yet chosen
    num_cached_tokens: int = 0
    num_beams_made: int = 0

    @property
    def ready(self) -> bool:
        return bool(self.request_ids) and len(self.pending) == len(self.request_ids)

    def new_beam_id(self, taken: Container[str]) -> str:
        """The next beam's request id, never one in `taken` (a caller may have named a
        request so)."""
        while True:
            self.num_beams_made += 1
            beam_id = f"{self.user_id}#beam{self.num_beams_made - 1}"
            if beam_id not in taken:
                return beam_id


@dataclass
class _Plan:
    """What one prompt's step does to its requests, decided before any is changed."""

    search: _Search
    extend: dict[str, int] = field(default_factory=dict)  # request id → its own next token
    # a later survivor of a parent: (parent, its slot in beam_ids, its token)
    forks: list[tuple[str, int, int]] = field(default_factory=list)
    abort: list[str] = field(default_factory=list)
    beam_ids: list[str] = field(default_factory=list)  # the next beams; forks' named in apply
    first_token: bool = False


class BeamSearchDriver:
    """The engine's live beam searches, advanced by the engine's own step."""

    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._searches: dict[str, _Search] = {}  # user request id → its search
        self._owner: dict[str, _Search] = {}  # live beam's request id → its search
        self._plans: list[_Plan] = []
        self._extended_now: set[str] = set()

    def __contains__(self, user_id: str) -> bool:
        return user_id in self._searches

    def live_request_ids(self) -> list[str]:
        return list(self._owner)

    def add(
        self,
        user_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: BeamSearchParams,
        arrival_time: float,
        priority: int = 0,
    ) -> None:
        """Start a search with one beam: the prompt (ValueError if it can never fit)."""
        if user_id in self._searches:
            raise ValueError(f"request_id {user_id!r} is already in use")
        sampling = SamplingParams(
            temperature=0.0, max_tokens=params.max_tokens, ignore_eos=True, skip_special_tokens=True
        )
        # Set after validation: the user-facing cap of 20 logprobs does not bind the
        # engine's own use, and beam_width > 10 needs more. EOS and max_tokens are the
        # search's to judge.
        sampling.logprobs = min(2 * params.beam_width, self.vocab_size)
        tokenizer = self.tokenizer
        # as the scheduler resolves it: the user's value, or the context the prompt leaves
        max_tokens = params.max_tokens or self.scheduler.default_max_len - len(prompt_token_ids)
        state = BeamSearchState(
            params.beam_width,
            max_tokens,
            params.length_penalty,
            params.ignore_eos,
            tokenizer.eos_token_id,
            tokenizer.end_of_turn_ids,
        )
        search = _Search(user_id, prompt, prompt_token_ids, state, [], RequestMetrics(arrival_time))
        beam_id = search.new_beam_id(self.scheduler.requests)
        request = Request(
            beam_id,
            prompt_token_ids,
            sampling,
            tokenizer.eos_token_id,
            arrival_time=arrival_time,
            priority=priority,
        )
        self.scheduler.add_request(request)  # raises if it can never fit
        assert request.max_tokens == max_tokens
        search.request_ids = [beam_id]
        self._searches[user_id] = search
        self._owner[beam_id] = search

    # ------------------------------------------------------------------- step

    def take(self, sampled: dict[str, SampledRow]) -> dict[str, list[int]]:
        """Move the beams' rows out of ``sampled`` and choose the survivors of every
        search whose beams have all sampled; returns the tokens of the beams extended
        now, to be recorded by ``update_from_output`` with the step's other tokens."""
        touched: dict[str, _Search] = {}
        sampled_now: set[str] = set()
        for request_id in [r for r in sampled if r in self._owner]:
            row = sampled.pop(request_id)
            assert row.logprobs is not None  # every beam asks for logprobs
            top_ids, top_logprobs, _, _ = row.logprobs[0]
            search = self._owner[request_id]
            search.pending[request_id] = (top_ids, top_logprobs)
            touched[search.user_id] = search
            sampled_now.add(request_id)
        self._plans = [p for p in map(self._plan, touched.values()) if p is not None]
        extend_now = {
            rid: [token]
            for plan in self._plans
            for rid, token in plan.extend.items()
            if rid in sampled_now
        }
        self._extended_now = set(extend_now)
        return extend_now

    def apply(self) -> list[RequestOutput]:
        """Carry out the step's plans (after ``update_from_output``); returns the
        outputs of the searches that ended."""
        outputs: list[RequestOutput] = []
        for plan in self._plans:
            requests = self.scheduler.requests
            search = plan.search
            if plan.first_token:
                first = requests.get(search.request_ids[0])
                search.num_cached_tokens = first.num_cached_tokens if first is not None else 0
            for request_id, token in plan.extend.items():
                if request_id not in self._extended_now:
                    # It sampled in an earlier step, waiting for its siblings.
                    requests[request_id].append_output_token_ids(token)
            self._abort_beams(plan.abort)
            for parent_id, slot, token in plan.forks:
                # the parent took its own token above (or in the update): the child's
                # differs in that last one
                child_id = search.new_beam_id(requests)
                output = [*requests[parent_id].output_token_ids[:-1], token]
                self._fork(parent_id, child_id, output)
                self._owner[child_id] = search
                plan.beam_ids[slot] = child_id
            search.request_ids = plan.beam_ids
            if plan.search.state.done:
                outputs.append(self._output(self._searches.pop(plan.search.user_id)))
        self._plans = []
        self._extended_now = set()
        return outputs

    def unstick(self) -> bool:
        """Break a standstill (the step scheduled nothing): beams that sampled and wait
        for their siblings give up their blocks. True if any did.

        Such a beam has nothing to compute, so the scheduler never preempts it, and a
        sibling left waiting for blocks would wait forever. Its candidates are kept; it
        goes back to the queue as a new request, recomputed later (from the prefix cache
        where its full blocks survive), just as if it had been preempted.
        """
        scheduler = self.scheduler
        stuck = [
            r
            for r in scheduler.running
            if r.request_id in self._owner and r.request_id in self._owner[r.request_id].pending
        ]
        for request in stuck:
            old_id = request.request_id
            search = self._owner.pop(old_id)
            new_id = search.new_beam_id(scheduler.requests)
            scheduler.finish_requests(old_id, RequestStatus.FINISHED_ABORTED)
            scheduler.add_request(
                _requeued(request, new_id, request.output_token_ids), admitted=True
            )
            self._owner[new_id] = search
            search.request_ids[search.request_ids.index(old_id)] = new_id
            search.pending[new_id] = search.pending.pop(old_id)
        return bool(stuck)

    def abort(self, user_id: str, error: str | None = None) -> RequestOutput:
        """End a search now, freeing every beam; its output has no sequences.

        Every request the search owns is freed, whatever its plan said (a step that
        failed between ``take`` and ``apply`` leaves plans half done)."""
        search = self._searches.pop(user_id)
        self._abort_beams([rid for rid, owner in self._owner.items() if owner is search])
        self._plans = [plan for plan in self._plans if plan.search is not search]
        search.metrics.finished_time = time.monotonic()
        return RequestOutput(
            user_id,
            search.prompt,
            search.prompt_token_ids,
            [],
            finished=True,
            metrics=search.metrics,
            error=error,
        )

    # --------------------------------------------------------------- helpers

    def _plan(self, search: _Search) -> _Plan | None:
        """Choose one prompt's survivors once all its live beams have sampled."""
        if not search.ready:
            return None
        parents = search.request_ids
        plan = _Plan(search)
        if search.metrics.first_token_time is None:
            search.metrics.first_token_time = time.monotonic()
            plan.first_token = True
        survivors = search.state.step([search.pending[rid] for rid in parents])
        search.pending.clear()
        if search.state.done:  # the last token: every beam ends, none goes on
            plan.abort = list(parents)
            return plan
        taken: set[int] = set()
        for survivor in survivors:
            parent_id = parents[survivor.parent]
            if survivor.parent not in taken:
                taken.add(survivor.parent)
                plan.extend[parent_id] = survivor.token_id
                plan.beam_ids.append(parent_id)
            else:  # named in apply: choosing reads nothing of the scheduler's
                plan.forks.append((parent_id, len(plan.beam_ids), survivor.token_id))
                plan.beam_ids.append("")
        plan.abort = [rid for i, rid in enumerate(parents) if i not in taken]
        return plan

    def _abort_beams(self, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)
        for request_id in request_ids:
            self._owner.pop(request_id, None)

    def _fork(self, parent_id: str, child_id: str, output_ids: list[int]) -> None:
        """A new beam sharing its parent's blocks (or, if the parent was preempted, queued)."""
        scheduler = self.scheduler
        parent = scheduler.requests[parent_id]
        if parent.status is RequestStatus.RUNNING:
            child = parent.fork(child_id, output_token_ids=output_ids)
            scheduler.fork_request(parent_id, [child])
        else:
            # A preempted parent holds no blocks to share: the child is recomputed,
            # taking back from the prefix cache whatever full blocks survived.
            scheduler.add_request(_requeued(parent, child_id, output_ids), admitted=True)

    def _output(self, search: _Search) -> RequestOutput:
        """A finished search as a request's output: its beams, best score first."""
        now = time.monotonic()
        metrics = search.metrics
        metrics.last_token_time = metrics.finished_time = now
        best = search.state.best()
        metrics.num_generation_tokens = len(best[0].token_ids) if best else 0
        completions = [
            CompletionOutput(
                index=i,
                text=self.tokenizer.decode(beam.token_ids, skip_special_tokens=True),
                token_ids=beam.token_ids,
                cumulative_logprob=beam.cum_logprob,
                logprobs=None,
                finish_reason=beam.finish_reason,
            )
            for i, beam in enumerate(best)
        ]
        return RequestOutput(
            search.user_id,
            search.prompt,
            search.prompt_token_ids,
            completions,
            finished=True,
            metrics=metrics,
            num_cached_tokens=search.num_cached_tokens,
        )


def _requeued(beam: Request, request_id: str, output_token_ids: list[int]) -> Request:
    """A new request recomputing a beam's tokens (a preempted parent's child, or a beam
    giving up its blocks): admitted already, so a full waiting queue takes it too."""
    return Request(
        request_id,
        beam.prompt_token_ids,
        beam.sampling_params,
        eos_token_id=beam.eos_token_id,
        arrival_time=beam.arrival_time,
        priority=beam.priority,
        output_token_ids=output_token_ids,
    )
