"""The seam between the engine and its workers: a step is plain data, and the engine
reads nothing of the scheduler's while a worker runs it."""

from __future__ import annotations

import io
import pickle

import pytest

from pagedllm import SamplingParams
from pagedllm.config import EngineArgs
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.request import Request
from pagedllm.sampling_params import BeamSearchParams


class _NoRequests(pickle.Pickler):
    def persistent_id(self, obj: object) -> None:
        assert not isinstance(obj, Request), "a step must not carry the scheduler's Request"


class _GuardedScheduler:
    """The engine's scheduler, refusing every use from the moment a step is handed to the
    executor until the step's update."""

    def __init__(self, scheduler: object) -> None:
        self._real, self.locked = scheduler, False

    def __getattr__(self, name: str) -> object:
        assert not (self.locked and name != "update_from_output"), (
            f"the engine read scheduler.{name} between schedule and update"
        )
        if name == "update_from_output":
            self.locked = False
        return getattr(self._real, name)


@pytest.mark.slow
@pytest.mark.parametrize("speculative", [True, False])
def test_a_step_is_plain_data_and_the_engine_waits_for_its_update(speculative):
    """Parallel sampling (forked at the update), speculation (drafts cut at a stop) or a
    beam search (which does not run beside it), logprobs and a stop string: every step's
    SchedulerOutput pickles without one Request, and the scheduler is left alone while
    the step runs."""
    engine = LLMEngine(
        EngineArgs(
            kv_cache_memory=0.05,
            speculative_config={"method": "ngram", "num_speculative_tokens": 3}
            if speculative
            else None,
        )
    )
    guard = _GuardedScheduler(engine.scheduler)
    engine.scheduler = engine.beams.scheduler = guard  # type: ignore[assignment]
    execute = engine.executor.execute
    sizes: list[int] = []

    def checked(output):
        buffer = io.BytesIO()
        _NoRequests(buffer).dump(output)
        sizes.append(len(buffer.getvalue()))
        guard.locked = True
        return execute(output)

    engine.executor.execute = checked  # type: ignore[method-assign]
    engine.add_request(
        "n", "List the numbers: 1, 2, 3,", SamplingParams(n=3, seed=7, max_tokens=12)
    )
    engine.add_request(
        "stop", "Count: one, two, three,", SamplingParams(max_tokens=30, stop=["six"], logprobs=1)
    )
    engine.add_request("greedy", "1, 2, 3, 4, 5, 6, 7, 8,", SamplingParams(max_tokens=20))
    if not speculative:
        engine.add_request("beams", "The sky is", BeamSearchParams(beam_width=3, max_tokens=8))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert len(done["n"].outputs) == 3
    assert all(len(seq.token_ids) == 12 for seq in done["n"].outputs)
    assert "six" not in done["stop"].outputs[0].text
    assert len(done["stop"].outputs[0].logprobs) == len(done["stop"].outputs[0].token_ids)
    assert sizes and (engine.spec_stats.num_drafts > 0) == speculative
    if not speculative:
        assert len(done["beams"].outputs) == 3
    engine.check_invariants()
    engine.close()
