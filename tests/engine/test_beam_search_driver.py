"""The beam-search driver over the real scheduler and a fake model, without torch weights.

The fake model's logprobs are a fixed function of a sequence's tokens, so the
driver (forks, appends, aborts over resident requests) must find exactly what the
pure selection finds when fed the same logprobs directly, whatever the scheduler
does meanwhile: preempt beams for want of blocks, or leave some out of a step for
want of sequence slots. The fake worker checks every step's KV reads and writes.
"""

from __future__ import annotations

import itertools
import math
import random
from types import SimpleNamespace

import pytest

from pagedllm.config import CacheConfig, SchedulerConfig
from pagedllm.core.scheduler import Scheduler
from pagedllm.engine.beam_search import BeamSearchDriver
from pagedllm.sample.beam_search import BeamSearchState
from pagedllm.sampling_params import BeamSearchParams
from pagedllm.worker.model_runner import RunnerOutput, SampledRow
from tests.core.fake_worker import FakeWorker
from tests.core.utils import make_request

VOCAB = 12
EOS = 0


def fake_logprobs(tokens: list[int], k: int) -> tuple[list[int], list[float]]:
    """The top-k (ids, logprobs) of a made-up distribution fixed by the tokens."""
    rng = random.Random(",".join(map(str, tokens)))
    logits = [rng.gauss(0.0, 2.0) for _ in range(VOCAB)]
    norm = math.log(sum(math.exp(x) for x in logits))
    ranked = sorted(range(VOCAB), key=lambda t: -logits[t])[:k]
    return ranked, [logits[t] - norm for t in ranked]


class FakeRunner:
    def __init__(self, scheduler: Scheduler) -> None:
        self.worker = FakeWorker(scheduler, VOCAB)

    def execute(self, sched, requests):
        out = {}
        for request_id in self.worker.execute(sched):  # checks KV, returns the samplers
            request = requests[request_id]
            ids, lps = fake_logprobs(request.all_token_ids, request.sampling_params.logprobs)
            out[request_id] = SampledRow([ids[0]], [(ids, lps, lps[0], 1)])
        return RunnerOutput(out, {})


def fake_driver(num_blocks: int, block_size: int = 4, max_num_seqs: int = 64):
    # a waiting queue the prompts fill: re-queued beams must be taken all the same
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_model_len=64, max_waiting=len(PROMPTS))
    scheduler = Scheduler(
        config,
        CacheConfig(block_size=block_size),
        num_blocks,
    )
    tokenizer = SimpleNamespace(
        eos_token_id=EOS,
        end_of_turn_ids=[],
        decode=lambda t, skip_special_tokens=True: " ".join(map(str, t)),
    )
    driver = BeamSearchDriver(scheduler, tokenizer, VOCAB)
    driver.runner = FakeRunner(scheduler)  # type: ignore[attr-defined]
    return driver


def run(
    driver: BeamSearchDriver,
    prompts,
    params,
    fail_at_step: int | None = None,
    fail_after_take: bool = False,
):
    """The beam part of `LLMEngine.step`, until every search ends; outputs by prompt.
    Rows of other requests (not beams) are recorded as plain tokens, as the engine does."""
    scheduler = driver.scheduler
    for i, prompt in enumerate(prompts):
        driver.add(f"search{i}", None, prompt, params, arrival_time=0.0)
    outputs = {}
    for step in itertools.count():
        if len(outputs) == len(prompts):
            break
        if step == fail_at_step and not fail_after_take:
            raise KeyboardInterrupt
        sched = scheduler.schedule()
        if sched.is_empty:
            assert driver.unstick(), "beam search made no progress"
            continue
        sampled = driver.runner.execute(sched, scheduler.requests).sampled
        tokens = driver.take(sampled)
        if step == fail_at_step and fail_after_take:
            raise KeyboardInterrupt
        scheduler.update_from_output(
            sched, tokens | {rid: row.token_ids[:1] for rid, row in sampled.items()}
        )
        for output in driver.apply():
            outputs[output.request_id] = output
        scheduler.check_invariants()
        assert set(driver.live_request_ids()) <= set(scheduler.requests)
    return [outputs[f"search{i}"] for i in range(len(prompts))]


def expected(prompt: list[int], params: BeamSearchParams):
    state = BeamSearchState(
        params.beam_width, params.max_tokens, params.length_penalty, params.ignore_eos, EOS
    )
    k = 2 * params.beam_width
    while not state.done:
        state.step([fake_logprobs(prompt + beam.token_ids, k) for beam in state.live])
    return [(b.token_ids, b.cum_logprob, b.score) for b in state.best()]


PROMPTS = [[5, 6, 7, 8, 9, 10], [3, 1, 4, 1, 5], [2, 7, 1, 8, 2, 8, 1]]


@pytest.mark.parametrize(
    ("num_blocks", "block_size", "max_num_seqs"),
    [(256, 4, 64), (12, 4, 64), (256, 4, 3), (8, 2, 2)],
    # starved: beams that sampled must give up their blocks to waiting siblings
    ids=["roomy", "preempting", "few-seq-slots", "starved"],
)
@pytest.mark.parametrize("ignore_eos", [True, False])
def test_driver_finds_what_the_pure_search_finds(num_blocks, block_size, max_num_seqs, ignore_eos):
    params = BeamSearchParams(3, 9, length_penalty=0.7, ignore_eos=ignore_eos)
    driver = fake_driver(num_blocks, block_size, max_num_seqs)
    outputs = run(driver, PROMPTS, params)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        got = [(c.token_ids, c.cumulative_logprob) for c in output.outputs]
        assert got == [(tokens, cum) for tokens, cum, _ in expected(prompt, params)]
        assert output.finished and output.prompt_token_ids == prompt
    scheduler = driver.scheduler
    kv = scheduler.kv_cache_manager
    assert kv.get_num_free_blocks() == kv.num_blocks
    assert not scheduler.requests
    assert not driver.live_request_ids()
    scheduler.check_invariants()
    if num_blocks < 16:
        assert scheduler.num_preemptions_total > 0


@pytest.mark.parametrize("fail_after_take", [False, True], ids=["between-steps", "mid-step"])
def test_an_abort_midway_frees_every_beam(fail_after_take):
    driver = fake_driver(256)
    with pytest.raises(KeyboardInterrupt):
        run(
            driver, PROMPTS, BeamSearchParams(3, 9), fail_at_step=4, fail_after_take=fail_after_take
        )
    assert len(driver.live_request_ids()) > len(PROMPTS)  # forks were live
    for i in range(len(PROMPTS)):
        output = driver.abort(f"search{i}", error="gone")
        assert output.finished and output.outputs == [] and output.error == "gone"
    kv = driver.scheduler.kv_cache_manager
    assert kv.get_num_free_blocks() == kv.num_blocks
    assert not driver.scheduler.requests
    assert not driver.live_request_ids()
    assert "search0" not in driver


def test_a_search_id_in_use_is_refused():
    driver = fake_driver(256)
    driver.add("a", None, [1, 2], BeamSearchParams(2, 2), arrival_time=0.0)
    with pytest.raises(ValueError, match="already in use"):
        driver.add("a", None, [1, 2], BeamSearchParams(2, 2), arrival_time=0.0)


def test_beam_ids_step_around_requests_a_caller_named_so():
    driver = fake_driver(256)
    taken = make_request("search0#beam1", 4, max_tokens=40)
    driver.scheduler.add_request(taken)
    params = BeamSearchParams(3, 9)
    (output,) = run(driver, PROMPTS[:1], params)
    assert [(c.token_ids, c.cumulative_logprob) for c in output.outputs] == [
        (tokens, cum) for tokens, cum, _ in expected(PROMPTS[0], params)
    ]
    assert "search0#beam1" in driver.scheduler.requests  # untouched
