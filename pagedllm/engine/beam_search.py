"""Beam search inside the engine: every beam stays resident as a Request.

Engines that resubmit each beam as a new request every token pay a prefix lookup
(or a recompute) per beam per token. Here a beam is a running Request that keeps
its blocks: each step schedules every live beam of every prompt once, the model
runner returns each beam's top ``2 * beam_width`` raw logprobs, the pure selection
in ``pagedllm.sample.beam_search`` picks the survivors, and then

- a beam whose first survivor extends it takes that token, as a sampled token;
- its other survivors are forked from it (``Scheduler.fork_request``): children
  share every block, and copy-on-write splits the partly filled last block at
  their first write;
- a beam with no survivor is aborted, which frees its blocks.

The scheduler's order is kept: ``schedule()``, the model, ``update_from_output()``,
then forks and aborts before the next ``schedule()``.

A beam normally samples in the same step as its siblings. When it does not (one
was preempted, or ``max_num_seqs`` left one out), the candidates of those that did
wait until the rest have sampled too; a beam that has sampled and got no token yet
has nothing to compute, so the scheduler passes over it meanwhile (and should the
waiting ones need its blocks, it gives them up and is recomputed later).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tqdm import tqdm

from pagedllm.outputs import BeamSearchOutput, BeamSearchSequence
from pagedllm.request import Request, RequestStatus
from pagedllm.sample.beam_search import BeamSearchState, Candidates
from pagedllm.sampling_params import BeamSearchParams, SamplingParams

if TYPE_CHECKING:
    from pagedllm.engine.llm_engine import LLMEngine, PromptType


@dataclass
class _PromptSearch:
    """One prompt's search: live beam i of ``state`` is the request ``request_ids[i]``."""

    prompt: str | None
    prompt_token_ids: list[int]
    state: BeamSearchState
    request_ids: list[str]
    pending: dict[str, Candidates] = field(default_factory=dict)  # sampled, not yet chosen

    @property
    def ready(self) -> bool:
        return bool(self.request_ids) and len(self.pending) == len(self.request_ids)


@dataclass
class _Plan:
    """What one prompt's step does to its requests, decided before any is changed."""

    search: _PromptSearch
    extend: dict[str, int] = field(default_factory=dict)  # request id → its own next token
    forks: list[tuple[str, str, list[int]]] = field(default_factory=list)  # parent, child, out
    abort: list[str] = field(default_factory=list)


def beam_search(
    engine: LLMEngine,
    prompts: Sequence[PromptType],
    params: BeamSearchParams,
    use_tqdm: bool = False,
) -> list[BeamSearchOutput]:
    """Beam search over every prompt at once; one output per prompt, in order.

    Every prompt is checked before any runs (ValueError). The engine must have no
    other request in flight: its steps would be taken by this loop.
    """
    if not isinstance(params, BeamSearchParams):
        raise ValueError("params must be a BeamSearchParams")
    if engine.has_unfinished_requests():
        raise RuntimeError("beam_search needs an idle engine: other requests are in flight")
    if engine.proposer is not None:
        raise ValueError(
            "beam search does not run with speculative decoding: start the engine without "
            "speculative_config"
        )
    tokenized = [engine.tokenize_prompt(p) for p in prompts]
    sampling = SamplingParams(
        temperature=0.0, max_tokens=params.max_tokens, ignore_eos=True, skip_special_tokens=True
    )
    # Set after validation: the user-facing cap of 20 logprobs does not bind the engine's
    # own use, and beam_width > 10 needs more. EOS and max_tokens are the search's to judge.
    sampling.logprobs = min(2 * params.beam_width, engine.model_config.vocab_size)
    eos = engine.tokenizer.eos_token_id
    scheduler = engine.scheduler
    searches: list[_PromptSearch] = []
    owner: dict[str, _PromptSearch] = {}
    try:
        for text, ids in tokenized:
            request = Request(engine.new_request_id(), ids, sampling, eos_token_id=eos)
            scheduler.add_request(request)
            state = BeamSearchState(
                params.beam_width, params.max_tokens, params.length_penalty, params.ignore_eos, eos
            )
            search = _PromptSearch(text, ids, state, [request.request_id])
            searches.append(search)
            owner[request.request_id] = search
        with tqdm(total=len(searches), desc="Beam search", disable=not use_tqdm) as bar:
            while any(s.request_ids for s in searches):
                bar.update(_step(engine, owner))
    finally:
        # An error or an interrupt midway leaves no beam holding blocks.
        live = [rid for s in searches for rid in s.request_ids]
        scheduler.finish_requests(live, RequestStatus.FINISHED_ABORTED)
        engine.runner.release(live)
    return [_output(engine, s) for s in searches]


def _step(engine: LLMEngine, owner: dict[str, _PromptSearch]) -> int:
    """One engine step for every live beam; returns how many prompts finished."""
    scheduler = engine.scheduler
    sched = scheduler.schedule()
    if sched.is_empty:
        _requeue_waiting_beams(engine, owner)
        return 0
    sampled = engine.runner.execute(sched, scheduler.requests).sampled
    engine.count_tokens(sched, sampled)
    for request_id, row in sampled.items():
        assert row.logprobs is not None  # every beam asks for logprobs
        top_ids, top_logprobs, _, _ = row.logprobs[0]
        owner[request_id].pending[request_id] = (top_ids, top_logprobs)

    searches = {id(s): s for s in owner.values()}.values()
    plans = [p for p in (_plan(engine, s) for s in searches) if p is not None]
    # Beams that sampled this step take their token as the step's sampled token.
    extend_now = {rid: [tok] for p in plans for rid, tok in p.extend.items() if rid in sampled}
    scheduler.update_from_output(sched, extend_now)

    num_done = 0
    for plan in plans:
        requests = scheduler.requests
        for request_id, token in plan.extend.items():
            if request_id not in extend_now:
                # It sampled in an earlier step, waiting for its siblings.
                requests[request_id].append_output_token_ids(token)
        if plan.abort:
            scheduler.finish_requests(plan.abort, RequestStatus.FINISHED_ABORTED)
            engine.runner.release(plan.abort)
            for request_id in plan.abort:
                owner.pop(request_id, None)
        for parent_id, child_id, output_ids in plan.forks:
            _fork(engine, parent_id, child_id, output_ids)
            owner[child_id] = plan.search
        if plan.search.state.done:
            num_done += 1
    return num_done


def _requeue_waiting_beams(engine: LLMEngine, owner: dict[str, _PromptSearch]) -> None:
    """Break a standstill: beams that sampled and wait for their siblings give up blocks.

    Such a beam has nothing to compute, so the scheduler never preempts it, and a
    sibling left waiting for blocks would wait forever. Its candidates are kept; it
    goes back to the queue as a new request, recomputed later (from the prefix cache
    where its full blocks survive), just as if it had been preempted.
    """
    scheduler = engine.scheduler
    stuck = [r for r in scheduler.running if r.request_id in owner[r.request_id].pending]
    if not stuck:
        raise RuntimeError("beam search made no progress: no beam could be scheduled")
    for request in stuck:
        old_id, new_id = request.request_id, engine.new_request_id()
        search = owner.pop(old_id)
        scheduler.finish_requests(old_id, RequestStatus.FINISHED_ABORTED)
        engine.runner.release([old_id])
        scheduler.add_request(
            Request(
                new_id,
                request.prompt_token_ids,
                request.sampling_params,
                eos_token_id=request.eos_token_id,
                arrival_time=request.arrival_time,
                output_token_ids=request.output_token_ids,
            )
        )
        owner[new_id] = search
        search.request_ids[search.request_ids.index(old_id)] = new_id
        search.pending[new_id] = search.pending.pop(old_id)


def _plan(engine: LLMEngine, search: _PromptSearch) -> _Plan | None:
    """Choose one prompt's survivors once all its live beams have sampled."""
    if not search.ready:
        return None
    parents = search.request_ids
    survivors = search.state.step([search.pending[rid] for rid in parents])
    search.pending.clear()
    plan = _Plan(search)
    if search.state.done:  # the last token: every beam ends, none goes on
        plan.abort = list(parents)
        search.request_ids = []
        return plan
    requests = engine.scheduler.requests
    new_ids: list[str] = []
    taken: set[int] = set()
    for survivor in survivors:
        parent_id = parents[survivor.parent]
        if survivor.parent not in taken:
            taken.add(survivor.parent)
            plan.extend[parent_id] = survivor.token_id
            new_ids.append(parent_id)
        else:
            child_id = engine.new_request_id()
            output = [*requests[parent_id].output_token_ids, survivor.token_id]
            plan.forks.append((parent_id, child_id, output))
            new_ids.append(child_id)
    plan.abort = [rid for i, rid in enumerate(parents) if i not in taken]
    search.request_ids = new_ids
    return plan


def _fork(engine: LLMEngine, parent_id: str, child_id: str, output_ids: list[int]) -> None:
    """A new beam sharing its parent's blocks (or, if the parent was preempted, queued)."""
    scheduler = engine.scheduler
    parent = scheduler.requests[parent_id]
    if parent.status is RequestStatus.RUNNING:
        child = parent.fork(child_id, output_token_ids=output_ids)
        scheduler.fork_request(parent_id, [child])
    else:
        # A preempted parent holds no blocks to share: the child is recomputed, taking
        # back from the prefix cache whatever full blocks survived.
        child = Request(
            child_id,
            parent.prompt_token_ids,
            parent.sampling_params,
            eos_token_id=parent.eos_token_id,
            arrival_time=parent.arrival_time,
            output_token_ids=output_ids,
        )
        scheduler.add_request(child)


def _output(engine: LLMEngine, search: _PromptSearch) -> BeamSearchOutput:
    decode = engine.tokenizer.decode
    sequences = [
        BeamSearchSequence(
            tokens=beam.token_ids,
            text=decode(beam.token_ids, skip_special_tokens=True),
            cum_logprob=beam.cum_logprob,
            score=beam.score if beam.score is not None else float("-inf"),
            finish_reason=beam.finish_reason,
        )
        for beam in search.state.best()
    ]
    return BeamSearchOutput(sequences, search.prompt, search.prompt_token_ids)
