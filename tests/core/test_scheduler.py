"""Scheduler scenarios: batching, chunked prefill, prefix hits, forks, preemption."""

import pytest

from pagedllm.config import CacheConfig, SchedulerConfig
from pagedllm.core.scheduler import QueueFullError, Scheduler
from pagedllm.request import RequestStatus
from tests.core.fake_worker import FakeWorker
from tests.core.utils import make_request


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 16,
    prefix_caching: bool = True,
    **sched: object,
) -> tuple[Scheduler, FakeWorker]:
    config = SchedulerConfig(**sched)  # type: ignore[arg-type]
    cache = CacheConfig(block_size=block_size, enable_prefix_caching=prefix_caching)
    scheduler = Scheduler(config, cache, num_blocks)
    return scheduler, FakeWorker(scheduler)


def run_to_completion(worker: FakeWorker, max_steps: int = 1000) -> list[str]:
    """Step until nothing is left; return request ids in the order they finished."""
    order = []
    for _ in range(max_steps):
        if not worker.scheduler.has_unfinished_requests():
            return order
        order += [r.request_id for r in worker.step()]
    raise AssertionError("requests never finished")


def test_prefill_then_one_decode_token_per_step():
    sched, worker = make_scheduler()
    sched.add_request(make_request("a", 20, max_tokens=3))
    out = sched.schedule()
    [first] = out.scheduled_requests
    assert (first.num_new_tokens, first.num_computed_tokens_before) == (20, 0)
    assert first.samples and first.new_block_ids == [0, 1]
    assert out.block_tables == {"a": [0, 1]}
    assert sched.update_from_output(out, worker.execute(out)) == []
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"a": 1} and out.total_num_scheduled_tokens == 1
    sched.update_from_output(out, worker.execute(out))
    out = sched.schedule()
    [done] = sched.update_from_output(out, worker.execute(out))
    assert done.status is RequestStatus.FINISHED_LENGTH_CAPPED and done.num_output_tokens == 3
    assert sched.schedule().finished_req_ids == {"a"}
    assert sched.kv_cache_usage == 0.0 and not sched.has_unfinished_requests()


def test_chunked_prefill_mixes_a_long_prompt_with_decodes():
    sched, worker = make_scheduler(max_num_batched_tokens=64)
    sched.add_request(make_request("short", 10, max_tokens=50))
    worker.step()
    sched.add_request(make_request("long", list(range(100, 300))))
    worker.step()
    out = worker.last_output
    assert out.num_scheduled_tokens == {"short": 1, "long": 63}
    long_chunk = out.scheduled_requests[1]
    assert long_chunk.is_prefill_chunk and not long_chunk.samples
    assert sched.get_request("long").num_output_tokens == 0  # mid-prefill: no token
    chunks = []
    while sched.get_request("long").num_output_tokens == 0:
        worker.step()
        chunks.append(worker.last_output.num_scheduled_tokens)
    assert chunks == [{"short": 1, "long": 63}] * 2 + [{"short": 1, "long": 11}]


def test_without_chunked_prefill_a_prompt_runs_whole_or_waits_in_order():
    sched, worker = make_scheduler(
        max_num_batched_tokens=64, max_model_len=64, enable_chunked_prefill=False
    )
    sched.add_request(make_request("a", [1] * 40, max_tokens=4))
    sched.add_request(make_request("b", [2] * 40, max_tokens=4))
    sched.add_request(make_request("c", [3] * 30, max_tokens=4))
    worker.step()
    # b does not fit in what a left, and c may not overtake it.
    assert worker.last_output.num_scheduled_tokens == {"a": 40}
    worker.step()
    assert worker.last_output.num_scheduled_tokens == {"a": 1, "b": 40}
    assert run_to_completion(worker) == ["a", "b", "c"]


def test_max_num_seqs_caps_the_batch():
    sched, worker = make_scheduler(max_num_seqs=2)
    for k in range(3):
        sched.add_request(make_request(f"r{k}", 5, max_tokens=2))
    worker.step()
    assert set(worker.last_output.num_scheduled_tokens) == {"r0", "r1"}
    assert sched.num_running == 2 and sched.num_waiting == 1
    assert run_to_completion(worker) == ["r0", "r1", "r2"]


def test_parallel_sampling_holds_the_prompt_once():
    sched, worker = make_scheduler(num_blocks=64)
    sched.add_request(make_request("p", 100, max_tokens=20))
    worker.step()  # prefill and first token
    parent = sched.get_request("p")
    children = [parent.fork(f"p.{k}") for k in range(1, 4)]
    sched.fork_request("p", children)
    assert [r.request_id for r in sched.running] == ["p", "p.1", "p.2", "p.3"]
    assert sched.kv_cache_manager.stats().num_blocks_used == 7  # ceil(100/16), not 4x
    worker.step()
    # Each of the first three writers copies the partial last block; the fourth
    # writes the original in place.
    assert len(worker.last_output.block_copies) == 3
    assert sched.kv_cache_manager.stats().num_blocks_used == 7 + 3
    full = [sched.kv_cache_manager.get_block_ids(r.request_id)[:6] for r in sched.running]
    assert all(ids == full[0] for ids in full)  # the 6 full prompt blocks stay shared
    assert all(c.parent_id == "p" for c in children)
    run_to_completion(worker)
    assert sched.kv_cache_manager.get_num_free_blocks() == 64


def test_beam_search_forks_and_frees_without_leaks():
    sched, worker = make_scheduler(num_blocks=40, block_size=4)
    sched.add_request(make_request("beam", 10, max_tokens=12))
    worker.step()
    beams = ["beam"]
    for step in range(8):
        # Keep the best 4: fork the first live beam into new beams with other
        # last tokens, and drop the rest (beam search's prune).
        src = sched.get_request(beams[0])
        new = [
            src.fork(f"b{step}.{k}", output_token_ids=[*src.output_token_ids[:-1], 40 + k])
            for k in range(4)
        ]
        sched.fork_request(src.request_id, new)
        sched.finish_requests(beams, RequestStatus.FINISHED_ABORTED)
        beams = [b.request_id for b in new]
        worker.step()
        sched.check_invariants()
    sched.finish_requests(beams, RequestStatus.FINISHED_STOPPED)
    assert not sched.has_unfinished_requests()
    assert sched.kv_cache_manager.get_num_free_blocks() == 40
    sched.check_invariants()


def test_repeated_request_hits_every_full_prompt_block():
    sched, worker = make_scheduler()
    prompt = list(range(7, 7 + 100))
    sched.add_request(make_request("first", prompt, max_tokens=5))
    run_to_completion(worker)
    sched.add_request(make_request("again", prompt, max_tokens=5))
    worker.step()
    again = worker.last_output.scheduled_requests[0]
    assert again.num_computed_tokens_before == 96  # all 6 full blocks of 100 tokens
    assert again.num_new_tokens == 4
    assert sched.stats.prefix_cache_hits == 96
    assert sched.stats.prefix_cache_queries == 200
    assert sched.stats.prefix_cache_hit_rate == pytest.approx(0.48)
    run_to_completion(worker)
    done_again = sched.kv_cache_manager  # nothing leaked
    assert done_again.get_num_free_blocks() == 64


def test_preemption_under_a_small_pool_finishes_everything_in_fcfs_order():
    # 6 requests of 24 + 24 tokens each need 3 blocks of 16 at the end; 8 blocks
    # hold at most two of them at full length.
    sched, worker = make_scheduler(num_blocks=8, max_num_batched_tokens=256)
    for k in range(6):
        sched.add_request(make_request(f"r{k}", [k + 1] * 24, max_tokens=24, arrival_time=k))
    order = run_to_completion(worker)
    assert order == [f"r{k}" for k in range(6)]
    assert sched.stats.num_preemptions_total > 0
    assert sched.kv_cache_manager.get_num_free_blocks() == 8


def test_preempted_request_goes_back_to_the_head_and_reuses_its_cached_blocks():
    sched, worker = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    sched.add_request(make_request("old", 7, max_tokens=6, arrival_time=0))
    sched.add_request(make_request("new", [9] * 7, max_tokens=6, arrival_time=1))
    sched.add_request(make_request("later", 3, max_tokens=2, arrival_time=2))
    worker.step()  # both prefill: 2 blocks each, pool full
    worker.step()  # 8th tokens fill the blocks
    assert not worker.last_output.preempted_req_ids
    worker.step()  # old needs a third block: new (most recent) is preempted
    out = worker.last_output
    assert out.preempted_req_ids == ["new"]
    assert "new" not in out.num_scheduled_tokens
    new = sched.get_request("new")
    assert new.status is RequestStatus.PREEMPTED and new.num_preemptions == 1
    assert [r.request_id for r in sched.waiting] == ["new", "later"]
    run_to_completion(worker)
    assert new.num_cached_tokens == 0  # the hit at first admission, not at resumption


def test_resumed_request_takes_back_its_surviving_blocks():
    sched, worker = make_scheduler(num_blocks=7, block_size=4, max_num_batched_tokens=64)
    sched.add_request(make_request("a", 8, max_tokens=6, arrival_time=0))
    sched.add_request(make_request("b", [5] * 8, max_tokens=10, arrival_time=1))
    for _ in range(6):
        worker.step()
    assert worker.last_output.preempted_req_ids == ["b"]  # when a needed its 4th block
    b = sched.get_request("b")
    assert b.num_tokens == 13 and b.num_computed_tokens == 0
    worker.step()
    # Its three full blocks survived in the cache: only the last token is recomputed.
    [resumed] = worker.last_output.scheduled_requests
    assert (resumed.request_id, resumed.num_computed_tokens_before) == ("b", 12)
    assert resumed.num_new_tokens == 1
    assert sched.stats.prefix_cache_hits == 12
    run_to_completion(worker)


def test_priority_policy_preempts_the_lowest_priority_even_if_scheduled():
    sched, worker = make_scheduler(
        num_blocks=4, block_size=4, max_num_batched_tokens=64, policy="priority"
    )
    sched.add_request(make_request("low", 7, max_tokens=6, priority=5, arrival_time=0))
    sched.add_request(make_request("high", [9] * 7, max_tokens=6, priority=0, arrival_time=1))
    worker.step()
    assert [s.request_id for s in worker.last_output.scheduled_requests] == ["high", "low"]
    worker.step()
    worker.step()  # high (first in running) needs a block: low is preempted
    assert worker.last_output.preempted_req_ids == ["low"]
    assert run_to_completion(worker) == ["high", "low"]


def test_priority_victim_already_scheduled_this_step_is_unscheduled():
    sched, worker = make_scheduler(
        num_blocks=4, block_size=4, max_num_batched_tokens=64, policy="priority"
    )
    sched.add_request(make_request("low", 5, max_tokens=6, priority=5, arrival_time=0))
    worker.step()
    sched.add_request(make_request("high", [9] * 7, max_tokens=6, priority=0, arrival_time=1))
    worker.step()
    worker.step()
    assert [r.request_id for r in sched.running] == ["low", "high"]
    assert sched.kv_cache_manager.get_num_free_blocks() == 0
    worker.step()  # low decodes in place, then high needs a third block
    out = worker.last_output
    assert out.preempted_req_ids == ["low"]
    assert list(out.num_scheduled_tokens) == ["high"]
    assert out.total_num_scheduled_tokens == 1
    assert run_to_completion(worker) == ["high", "low"]


def test_request_preempts_itself_when_it_is_the_last_resort():
    sched, worker = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    sched.add_request(make_request("a", 7, max_tokens=6, arrival_time=0))
    sched.add_request(make_request("b", [9] * 7, max_tokens=6, arrival_time=1))
    worker.step()
    worker.step()
    # Abort a in a way that leaves b last: b needs a block and a holds the rest.
    sched.running.reverse()  # b first, a last (as if a were admitted later)
    worker.step()
    assert worker.last_output.preempted_req_ids == ["a"]
    run_to_completion(worker)


def test_abort_frees_a_request_wherever_it_is():
    sched, worker = make_scheduler(num_blocks=16, max_num_batched_tokens=32)
    sched.add_request(make_request("running", 40))
    sched.add_request(make_request("waiting", 10))
    worker.step()  # running is mid-prefill, waiting waits
    assert sched.num_waiting == 1
    done = sched.finish_requests(["running", "waiting", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert [r.request_id for r in done] == ["running", "waiting"]
    assert all(r.status is RequestStatus.FINISHED_ABORTED for r in done)
    assert sched.kv_cache_manager.get_num_free_blocks() == 16
    assert sched.schedule().finished_req_ids == {"running", "waiting"}
    assert sched.finish_requests("running", RequestStatus.FINISHED_ABORTED) == []
    with pytest.raises(ValueError, match="finished status"):
        sched.finish_requests("x", RequestStatus.RUNNING)
    sched.check_invariants()


def test_abort_between_schedule_and_update_is_skipped_by_update():
    sched, worker = make_scheduler()
    sched.add_request(make_request("a", 10))
    out = sched.schedule()
    sampled = worker.execute(out)
    sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert sched.update_from_output(out, sampled) == []
    sched.check_invariants()


def test_stop_token_and_eos_finish_in_update():
    sched, _ = make_scheduler()
    sched.add_request(make_request("eos", 5, ignore_eos=False, eos_token_id=3))
    sched.add_request(make_request("stop", 5, stop_token_ids=[8]))
    out = sched.schedule()
    done = sched.update_from_output(out, {"eos": [3], "stop": [8]})
    assert [(r.request_id, r.status, r.stop_reason) for r in done] == [
        ("eos", RequestStatus.FINISHED_STOPPED, None),
        ("stop", RequestStatus.FINISHED_STOPPED, 8),
    ]


def test_several_tokens_in_one_update_stop_at_the_first_stop():
    sched, _ = make_scheduler()
    sched.add_request(make_request("a", 5, max_tokens=3))
    out = sched.schedule()
    [done] = sched.update_from_output(out, {"a": [1, 2, 3, 4, 5]})
    assert done.output_token_ids == [1, 2, 3]


def test_update_without_a_sampled_token_leaves_the_request_waiting_for_one():
    sched, _ = make_scheduler()
    sched.add_request(make_request("a", 5))
    out = sched.schedule()
    assert sched.update_from_output(out, {}) == []
    assert sched.schedule().is_empty  # nothing to compute until a token arrives


def test_admission_rejects_what_can_never_fit():
    sched, _ = make_scheduler(num_blocks=4, max_model_len=100)
    too_long = make_request("a", 100, max_tokens=None)
    with pytest.raises(ValueError, match="no room for output"):
        sched.add_request(too_long)
    assert too_long.status is RequestStatus.FINISHED_IGNORED
    with pytest.raises(ValueError, match="set max_tokens to at most 10"):
        sched.add_request(make_request("b", 90, max_tokens=11))
    with pytest.raises(ValueError, match="needs up to 5 KV-cache blocks but the whole cache has 4"):
        sched.add_request(make_request("c", 60, max_tokens=20))
    with pytest.raises(ValueError, match="empty"):
        sched.add_request(make_request("d", []))
    sched.add_request(make_request("e", 60, max_tokens=5))  # 64 slots: fits exactly
    assert sched.get_request("e").max_tokens == 5
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(make_request("e", 3))
    assert sched.get_num_unfinished_requests() == 1


def test_max_tokens_none_resolves_to_the_rest_of_the_context():
    sched, _ = make_scheduler(max_model_len=100)
    req = make_request("a", 30, max_tokens=None)
    assert req.max_tokens is None
    sched.add_request(req)
    assert req.max_tokens == 70


def test_add_request_refuses_a_request_already_in_progress():
    sched, _ = make_scheduler()
    req = make_request("a", 3)
    req.status = RequestStatus.RUNNING
    with pytest.raises(ValueError, match="must be new"):
        sched.add_request(req)


def test_full_waiting_queue_refuses_new_requests():
    sched, _ = make_scheduler(max_waiting=1)
    sched.add_request(make_request("a", 3))
    with pytest.raises(QueueFullError, match="max_waiting=1"):
        sched.add_request(make_request("b", 3))
    # a continuation of an admitted request (a re-queued beam) is never refused
    sched.add_request(make_request("c", 3), admitted=True)
    assert len(sched.waiting) == 2 and "c" in sched.requests


def test_fork_validation_changes_nothing_on_error():
    sched, worker = make_scheduler(max_model_len=64)
    sched.add_request(make_request("p", 10, max_tokens=8))
    with pytest.raises(ValueError, match="not a running request"):
        sched.fork_request("p", [])
    worker.step()
    parent = sched.get_request("p")
    bad_prompt = make_request("x", 11)
    bad_prefix = parent.fork("y")
    bad_prefix.all_token_ids[3] = 999
    no_new_token = parent.fork("z", output_token_ids=[])
    too_long = parent.fork("w", sampling_params=parent.sampling_params.clone(max_tokens=60))
    already_done = parent.fork("v", sampling_params=parent.sampling_params.clone(max_tokens=1))
    cases = [
        ([parent.fork("p")], "already in use"),
        ([parent.fork("c"), parent.fork("c")], "already in use"),
        ([bad_prompt], "parent's prompt"),
        ([bad_prefix], "computed tokens"),
        ([no_new_token], "computed tokens"),
        ([too_long], "max_model_len"),
        ([already_done], "already has max_tokens"),
    ]
    for children, message in cases:
        with pytest.raises(ValueError, match=message):
            sched.fork_request("p", children)
        sched.check_invariants()
        assert sched.get_num_unfinished_requests() == 1


def test_config_policy_and_stats_snapshot():
    sched, worker = make_scheduler(num_blocks=8, block_size=4)
    sched.add_request(make_request("a", 6))
    sched.add_request(make_request("b", 6))
    stats = sched.stats
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 2, 0.0)
    worker.step()
    stats = sched.stats
    assert (stats.num_running, stats.num_waiting) == (2, 0)
    assert stats.kv_cache_usage == pytest.approx(0.5)
    assert stats.prefix_cache_queries == 12


def test_max_tokens_none_stops_where_the_pool_ends_when_that_comes_first():
    """A pool smaller than the context must not refuse every request without max_tokens."""
    sched, worker = make_scheduler(num_blocks=4, block_size=16, max_model_len=100)
    req = make_request("a", 30, max_tokens=None)
    sched.add_request(req)
    assert req.max_tokens == 4 * 16 + 1 - 30  # the last token needs no slot
    run_to_completion(worker)
    assert req.num_output_tokens == 35 and req.status is RequestStatus.FINISHED_LENGTH_CAPPED
    sched.check_invariants()


def test_a_prompt_larger_than_the_whole_pool_is_refused():
    sched, _ = make_scheduler(num_blocks=4, block_size=16, max_model_len=100)
    with pytest.raises(ValueError, match="65 tokens but the whole KV cache holds 64"):
        sched.add_request(make_request("a", 65, max_tokens=None))
    with pytest.raises(ValueError, match="65 tokens but the whole KV cache holds 64"):
        sched.add_request(make_request("b", 65, max_tokens=1))
    sched.add_request(make_request("c", 64, max_tokens=None))
    assert sched.get_request("c").max_tokens == 1


def test_an_embedding_ends_with_its_prompt_and_mean_pooling_skips_the_cache():
    """A pooling request is prefill only: finished (blocks freed) by its last chunk,
    nothing appended. `last` may take cached blocks; `mean` reads every position."""
    sched, worker = make_scheduler(max_num_batched_tokens=32)
    sched.add_request(make_request("gen", 40, max_tokens=4))
    run_to_completion(worker)  # tokens 1..40 cached in two full blocks
    last, mean = make_request("last", 40), make_request("mean", 40)
    last.pooling, mean.pooling = "last", "mean"
    sched.add_request(last)
    sched.add_request(mean)
    assert sorted(run_to_completion(worker)) == ["last", "mean"]
    assert last.num_output_tokens == mean.num_output_tokens == 0
    assert last.status is mean.status is RequestStatus.FINISHED_STOPPED
    assert (last.num_cached_tokens, mean.num_cached_tokens) == (32, 0)
    assert sched.kv_cache_usage == 0.0
