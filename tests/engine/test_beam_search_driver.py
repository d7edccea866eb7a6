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
from pagedllm.engine.beam_search import beam_search
from pagedllm.sample.beam_search import BeamSearchState
from pagedllm.sampling_params import BeamSearchParams
from pagedllm.worker.model_runner import RunnerOutput, SampledRow
from tests.core.fake_worker import FakeWorker

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

    def execute(self, sched, requests, num_samples=None):
        out = {}
        for request_id in self.worker.execute(sched):  # checks KV, returns the samplers
            request = requests[request_id]
            ids, lps = fake_logprobs(request.all_token_ids, request.sampling_params.logprobs)
            out[request_id] = SampledRow([ids[0]], [(ids, lps, lps[0], 1)])
        return RunnerOutput(out, {})

    def release(self, request_ids) -> None:
        pass


def fake_engine(num_blocks: int, block_size: int = 4, max_num_seqs: int = 64):
    scheduler = Scheduler(
        SchedulerConfig(max_num_seqs=max_num_seqs, max_model_len=64),
        CacheConfig(block_size=block_size),
        num_blocks,
    )
    ids = itertools.count()
    return SimpleNamespace(
        scheduler=scheduler,
        runner=FakeRunner(scheduler),
        tokenizer=SimpleNamespace(
            eos_token_id=EOS, decode=lambda t, skip_special_tokens=True: " ".join(map(str, t))
        ),
        model_config=SimpleNamespace(vocab_size=VOCAB),
        new_request_id=lambda: str(next(ids)),
        has_unfinished_requests=scheduler.has_unfinished_requests,
        tokenize_prompt=lambda prompt: (None, list(prompt)),
        count_tokens=lambda sched, sampled: None,
        proposer=None,
    )


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
    engine = fake_engine(num_blocks, block_size, max_num_seqs)
    outputs = beam_search(engine, PROMPTS, params)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        got = [(s.tokens, s.cum_logprob, s.score) for s in output.sequences]
        assert got == expected(prompt, params)
    kv = engine.scheduler.kv_cache_manager
    assert kv.get_num_free_blocks() == kv.num_blocks
    assert not engine.scheduler.requests
    engine.scheduler.check_invariants()
    if num_blocks < 16:
        assert engine.scheduler.num_preemptions_total > 0


def test_an_error_midway_frees_every_beam():
    engine = fake_engine(256)
    execute = engine.runner.execute
    calls = itertools.count()

    def failing(*args):
        if next(calls) == 4:
            raise KeyboardInterrupt
        return execute(*args)

    engine.runner.execute = failing
    with pytest.raises(KeyboardInterrupt):
        beam_search(engine, PROMPTS, BeamSearchParams(3, 9))
    kv = engine.scheduler.kv_cache_manager
    assert kv.get_num_free_blocks() == kv.num_blocks
    assert not engine.scheduler.requests


def test_a_busy_engine_is_refused():
    engine = fake_engine(256)
    beam_search(engine, [[1, 2]], BeamSearchParams(2, 2))  # leaves nothing behind
    engine.has_unfinished_requests = lambda: True
    with pytest.raises(RuntimeError, match="idle engine"):
        beam_search(engine, [[1, 2]], BeamSearchParams(2, 2))
