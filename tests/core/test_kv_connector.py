"""The scheduler with a KV connector: blocks evicted from the pool are saved, a later
prompt loads them back while it waits in WAITING_FOR_REMOTE_KV, and a load that fails
or an abort mid-load loses nothing. The fake worker checks every block's content."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagedllm.config import CacheConfig, SchedulerConfig
from pagedllm.core.kv_cache_manager import hash_request_tokens
from pagedllm.core.scheduler import Scheduler
from pagedllm.request import RequestStatus
from tests.core.fake_worker import FakeConnector, FakeWorker
from tests.core.test_properties import SETTINGS, prompts
from tests.core.utils import make_request

PROMPT = list(range(1, 42))  # 10 full blocks of 4, one token more


def make(num_blocks: int = 16, max_num_seqs: int = 8) -> tuple[Scheduler, FakeWorker]:
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64)
    connector = FakeConnector()
    scheduler = Scheduler(config, CacheConfig(block_size=4), num_blocks, kv_connector=connector)
    return scheduler, FakeWorker(scheduler, vocab_size=10, connector=connector)


def run(worker: FakeWorker, *requests, max_steps: int = 500) -> None:
    for request in requests:
        worker.scheduler.add_request(request)
    for _ in range(max_steps):
        if not worker.scheduler.has_unfinished_requests():
            return
        worker.step()
    raise AssertionError("requests never finished")


def evict_prompt(worker: FakeWorker) -> None:
    """Run PROMPT, then a prompt that takes over every block it left cached."""
    run(worker, make_request("first", PROMPT, max_tokens=2))
    num_slots = worker.scheduler.kv_cache_manager.num_blocks * 4
    run(worker, make_request("other", [90 + i % 7 for i in range(num_slots - 1)], max_tokens=2))
    assert (
        worker.scheduler.kv_cache_manager.block_pool.get_cached_block(
            hash_request_tokens(PROMPT, 4)[0]
        )
        is None
    )


def test_evicted_blocks_are_saved_and_a_later_prompt_loads_them():
    scheduler, worker = make()
    evict_prompt(worker)
    connector = worker.connector
    hashes = hash_request_tokens(PROMPT, 4)
    assert set(hashes) <= set(connector.store)  # every block of the prompt was saved once
    request = make_request("again", PROMPT, max_tokens=3)
    scheduler.add_request(request)
    worker.step()
    out = worker.last_output
    assert out.scheduled_requests == [] and request.status is RequestStatus.WAITING_FOR_REMOTE_KV
    [load] = out.kv_loads
    assert (
        load.block_hashes == hashes
        and load.block_ids == scheduler.kv_cache_manager.get_block_ids("again")[:10]
    )
    assert scheduler.num_waiting == 1 and scheduler.num_pending_loads == 1
    worker.step()  # the load is reported: the request runs from its 41st token
    worker.step()
    [sched] = worker.last_output.scheduled_requests
    assert (sched.num_computed_tokens_before, sched.num_new_tokens) == (40, 1)
    run(worker)
    assert request.num_cached_tokens == 40 and request.num_output_tokens == 3
    assert scheduler.num_remote_tokens_total == 40
    # the loaded blocks are back in the prefix cache: a third request hits them locally
    third = make_request("third", PROMPT, max_tokens=1)
    scheduler.add_request(third)
    worker.step()
    assert worker.last_output.kv_loads == [] and third.num_cached_tokens == 40


def test_a_failed_load_recomputes_from_the_first_missing_block():
    scheduler, worker = make()
    evict_prompt(worker)
    hashes = hash_request_tokens(PROMPT, 4)
    worker.connector.broken.add(hashes[3])
    request = make_request("again", PROMPT, max_tokens=2)
    run(worker, request)
    assert request.num_cached_tokens == 12 and request.num_output_tokens == 2
    assert scheduler.kv_cache_manager.get_num_free_blocks() == 16


def test_an_abort_mid_load_frees_the_blocks_once_the_load_is_reported():
    scheduler, worker = make()
    evict_prompt(worker)
    scheduler.add_request(make_request("again", PROMPT, max_tokens=2))
    worker.step()
    assert scheduler.loading
    [gone] = scheduler.finish_requests("again", RequestStatus.FINISHED_ABORTED)
    assert gone.status is RequestStatus.FINISHED_ABORTED and not scheduler.requests
    kv = scheduler.kv_cache_manager
    assert kv.holds_blocks("again")  # still being written by the load
    assert scheduler.has_unfinished_requests() and scheduler.num_pending_loads == 1
    scheduler.check_invariants()
    worker.step()
    assert not scheduler.has_unfinished_requests() and kv.get_num_free_blocks() == 16
    scheduler.check_invariants()


def test_loading_requests_count_against_max_num_seqs():
    scheduler, worker = make(num_blocks=32, max_num_seqs=1)
    evict_prompt(worker)
    scheduler.add_request(make_request("again", PROMPT, max_tokens=2))
    scheduler.add_request(make_request("next", 5, max_tokens=2))
    worker.step()
    assert list(scheduler.loading) == ["again"] and worker.last_output.scheduled_requests == []
    run(worker)


def test_no_connector_tracks_no_evictions_and_a_sliding_model_refuses_one():
    scheduler = Scheduler(SchedulerConfig(), CacheConfig(block_size=4), 4)
    assert scheduler.kv_cache_manager.block_pool.block_events is None
    assert scheduler.schedule().kv_saves == [] and scheduler.take_kv_saves() == []
    with pytest.raises(ValueError, match="one KV-cache layer group"):
        Scheduler(SchedulerConfig(), CacheConfig(), 4, (None, 8), kv_connector=FakeConnector())


def test_requests_that_compute_their_whole_prompt_never_load():
    _scheduler, worker = make()
    evict_prompt(worker)
    request = make_request("again", PROMPT, max_tokens=1, prompt_logprobs=0)
    run(worker, request)
    assert request.num_cached_tokens == 0 and worker.connector.num_loaded == 0


class OneInFour(set):
    """About one block in four fails to load."""

    def __contains__(self, block_hash: object) -> bool:
        return isinstance(block_hash, bytes) and block_hash[0] % 4 == 0


@SETTINGS
@given(
    workload=st.lists(st.tuples(prompts, st.integers(1, 12)), min_size=1, max_size=12),
    num_blocks=st.integers(8, 16),
    failing=st.booleans(),
    on_compute=st.booleans(),
)
def test_random_workloads_with_a_connector_finish_without_leaks(
    workload, num_blocks, failing, on_compute
):
    """A tight pool evicts (and saves) blocks every few steps and later prompts load
    them back, some loads failing partway; the fake worker checks every read."""
    config = SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=16, max_model_len=48)
    connector = FakeConnector(on_compute)
    scheduler = Scheduler(config, CacheConfig(block_size=2), num_blocks, kv_connector=connector)
    worker = FakeWorker(scheduler, vocab_size=10, connector=connector)
    accepted = []
    if failing:
        connector.broken = OneInFour()
    for k, (prompt, max_tokens) in enumerate(workload):
        request = make_request(f"r{k}", prompt, max_tokens)
        try:
            scheduler.add_request(request)
        except ValueError:
            continue
        accepted.append(request)
        for _ in range(k % 3):
            worker.step()
    run(worker, max_steps=3000)
    assert all(r.num_output_tokens == r.max_tokens for r in accepted)
    kv = scheduler.kv_cache_manager
    kv.check_invariants(set())
    assert kv.get_num_free_blocks() == kv.num_blocks


def test_an_id_aborted_mid_load_is_not_reused_until_its_load_ends():
    scheduler, worker = make()
    evict_prompt(worker)
    scheduler.add_request(make_request("again", PROMPT, max_tokens=2))
    worker.step()
    scheduler.finish_requests("again", RequestStatus.FINISHED_ABORTED)
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(make_request("again", PROMPT, max_tokens=2))
    worker.step()  # the load is reported, the blocks freed: the id is free again
    run(worker, make_request("again", PROMPT, max_tokens=2))
