"""Debug invariant mode: each corruption of the bookkeeping is caught, with a clear error."""

import pytest

from pagedllm.core.invariants import (
    DEBUG_INVARIANTS_ENV,
    InvariantError,
    debug_invariants_enabled,
    require,
)
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.request import RequestStatus
from tests.core.test_scheduler import make_scheduler
from tests.core.utils import make_request


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_flag_turns_the_checks_on(value):
    assert debug_invariants_enabled({DEBUG_INVARIANTS_ENV: value})


@pytest.mark.parametrize("value", ["", "0", "false", "No", "off"])
def test_flag_unset_or_falsy_leaves_them_off(value):
    assert not debug_invariants_enabled({DEBUG_INVARIANTS_ENV: value})
    assert not debug_invariants_enabled({})


def test_flag_is_read_from_the_process_environment(monkeypatch):
    monkeypatch.setenv(DEBUG_INVARIANTS_ENV, "1")
    assert debug_invariants_enabled()
    monkeypatch.delenv(DEBUG_INVARIANTS_ENV)
    assert not debug_invariants_enabled()


def test_require_raises_an_invariant_error_that_is_an_assertion_error():
    require(True, "never shown")
    with pytest.raises(InvariantError, match="the message") as info:
        require(False, "the message")
    assert isinstance(info.value, AssertionError)


def running_manager() -> tuple[KVCacheManager, object]:
    """A manager with one request holding two full blocks and one partial one."""
    kv = KVCacheManager(num_blocks=8, block_size=4)
    req = make_request("a", 10)
    assert kv.allocate_slots(req, 10) == [0, 1, 2]
    req.num_computed_tokens = 10
    kv.cache_blocks(req, 10)
    kv.check_invariants({"a"}, {"a": req})
    return kv, req


def test_an_extra_reference_is_caught():
    kv, _ = running_manager()
    kv.block_pool.blocks[1].ref_cnt += 1
    with pytest.raises(InvariantError, match=r"ref_cnt 2 but is held by 1 block tables"):
        kv.check_invariants({"a"})


def test_a_missing_reference_is_caught():
    kv, _ = running_manager()
    kv.block_pool.blocks[0].ref_cnt -= 1  # now 0 but not queued
    with pytest.raises(InvariantError, match="missing from the queue"):
        kv.check_invariants({"a"})


def test_a_negative_ref_count_is_caught():
    kv, _ = running_manager()
    kv.block_pool.blocks[5].ref_cnt = -1
    with pytest.raises(InvariantError, match="negative ref_cnt"):
        kv.check_invariants({"a"})


def test_a_referenced_block_left_in_the_free_queue_is_caught():
    kv, _ = running_manager()
    free = next(iter(kv.block_pool.free_block_queue))
    free.ref_cnt = 1
    with pytest.raises(InvariantError, match="is queued"):
        kv.check_invariants({"a"})


def test_a_referenced_block_still_linked_is_caught():
    kv, _ = running_manager()
    kv.block_pool.blocks[0].next_free = kv.block_pool.blocks[1]
    with pytest.raises(InvariantError, match="still linked"):
        kv.check_invariants({"a"})


def test_a_drifted_free_count_is_caught():
    kv, _ = running_manager()
    kv.block_pool.free_block_queue.num_free_blocks += 1
    with pytest.raises(InvariantError, match="free count drifted"):
        kv.check_invariants({"a"})


def test_a_block_queued_twice_is_caught():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    queue = kv.block_pool.free_block_queue
    first = next(iter(queue))
    # Splice the first block in again after the last: the list now has a repeat.
    last = kv.block_pool.blocks[1]
    tail = last.next_free
    loop_copy = type(first)(first.block_id)
    last.next_free, loop_copy.prev_free, loop_copy.next_free = loop_copy, last, tail
    queue.num_free_blocks += 1
    with pytest.raises(InvariantError, match="queued twice"):
        kv.check_invariants(set())


def test_free_plus_referenced_must_equal_total():
    kv, _ = running_manager()
    kv.block_pool.num_blocks += 1  # a block nobody can account for
    kv.block_pool.blocks.append(kv.block_pool.blocks[-1])
    with pytest.raises(InvariantError, match=r"free .* \+ referenced .* != total"):
        kv.block_pool.check_invariants()


def test_a_stale_hash_map_entry_is_caught():
    kv, _ = running_manager()
    pool = kv.block_pool
    (block_hash, block) = next(iter(pool.cached_block_hash_to_block.items()))
    pool.cached_block_hash_to_block[b"other"] = block
    with pytest.raises(InvariantError, match="stale hash"):
        pool.check_invariants()
    del pool.cached_block_hash_to_block[b"other"]
    block.block_hash = b"unmapped"
    with pytest.raises(InvariantError, match="does not point back"):
        pool.check_invariants()
    block.block_hash = block_hash


def test_cached_blocks_with_caching_off_are_caught():
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_caching=False)
    block = kv.block_pool.blocks[0]
    block.block_hash = b"h"
    kv.block_pool.cached_block_hash_to_block[b"h"] = block
    with pytest.raises(InvariantError, match="caching is off"):
        kv.check_invariants(set())


def test_more_than_one_partly_filled_block_is_caught():
    kv, _ = running_manager()
    kv._seqs["a"].num_tokens = 6  # three blocks for six tokens: two are partial
    with pytest.raises(InvariantError, match="more than one partly filled block"):
        kv.check_invariants({"a"})


def test_block_ids_out_of_step_are_caught():
    kv, _ = running_manager()
    kv._seqs["a"].tables[0].block_ids[0] = 7
    with pytest.raises(InvariantError, match="out of step"):
        kv.check_invariants({"a"})


def test_wrong_cached_hashes_are_caught():
    kv, req = running_manager()
    seq = kv._seqs["a"]
    seq.num_cached_blocks = 4
    with pytest.raises(InvariantError, match="more cached blocks than blocks"):
        kv.check_invariants({"a"})
    seq.num_cached_blocks = 2
    seq.block_hashes[0], seq.block_hashes[1] = seq.block_hashes[1], seq.block_hashes[0]
    with pytest.raises(InvariantError, match="another prefix's hash"):
        kv.check_invariants({"a"})
    seq.block_hashes[0], seq.block_hashes[1] = seq.block_hashes[1], seq.block_hashes[0]
    req.all_token_ids[0] += 1
    with pytest.raises(InvariantError, match="hash chain is stale"):
        kv.check_invariants({"a"}, {"a": req})


def test_a_pending_copy_into_a_free_block_is_caught():
    kv, _ = running_manager()
    kv.fork("a", "b")
    child = make_request("b", 10)
    child.num_computed_tokens = 10
    # The child writes its 11th token into the shared partial block: copy on write.
    child.append_output_token_ids(5)
    assert kv.allocate_slots(child, 1) == []
    [(src, _)] = kv._pending_copies
    kv.check_invariants({"a", "b"})  # a pending copy into a held block is fine
    kv._pending_copies.append((src, 7))
    with pytest.raises(InvariantError, match="writes into a free block"):
        kv.check_invariants({"a", "b"})


def test_a_leaked_block_with_nothing_alive_is_caught():
    kv, _ = running_manager()
    kv._seqs.clear()  # the table is gone but its blocks still count as referenced
    with pytest.raises(InvariantError, match=r"blocks leaked: .* 3 are referenced"):
        kv.check_invariants(set())


def test_a_dead_holder_is_caught():
    kv, _ = running_manager()
    with pytest.raises(InvariantError, match="dead request 'a'"):
        kv.check_invariants(set())


def busy_scheduler():
    sched, worker = make_scheduler(num_blocks=16, block_size=4)
    for i in range(3):
        sched.add_request(make_request(f"r{i}", 6, max_tokens=8))
    worker.step()
    sched.add_request(make_request("late", 6, max_tokens=8))
    sched.check_invariants()
    return sched


def test_scheduler_catches_a_corrupted_ref_count():
    sched = busy_scheduler()
    block_id = sched.kv_cache_manager.get_block_ids("r0")[0]
    sched.kv_cache_manager.block_pool.blocks[block_id].ref_cnt += 1
    with pytest.raises(InvariantError, match="held by 1 block tables"):
        sched.check_invariants()


def computed_beyond_slots(sched) -> None:
    request = sched.running[0]  # 7 tokens in 2 blocks of 4
    for _ in range(3):
        request.append_output_token_ids(1)
    request.num_computed_tokens = 9


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda s: s.requests.pop("late"), "lost a request"),
        (lambda s: setattr(s.running[0], "status", RequestStatus.WAITING), "is not RUNNING"),
        (lambda s: s.requests.__setitem__("r0", make_request("r0", 1)), "not a known request"),
        (lambda s: setattr(s.running[0], "num_computed_tokens", 99), "more tokens than it has"),
        (computed_beyond_slots, "without slots"),
        (
            lambda s: setattr(s.waiting.peek(), "status", RequestStatus.RUNNING),
            "has status RUNNING",
        ),
        (
            lambda s: s.requests.__setitem__("late", make_request("late", 1)),
            "waiting 'late' is not",
        ),
        (lambda s: setattr(s.waiting.peek(), "num_computed_tokens", 1), "has computed tokens"),
    ],
)
def test_scheduler_catches_inconsistent_queues(corrupt, message):
    sched = busy_scheduler()
    corrupt(sched)
    with pytest.raises(InvariantError, match=message):
        sched.check_invariants()


def test_scheduler_catches_a_waiting_request_holding_blocks():
    sched = busy_scheduler()
    late = sched.waiting.peek()
    sched.kv_cache_manager.allocate_slots(late, 4)
    with pytest.raises(InvariantError, match="waiting 'late' holds blocks"):
        sched.check_invariants()
