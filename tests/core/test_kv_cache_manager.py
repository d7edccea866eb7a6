"""Per-sequence block tables: on-demand allocation, prefix caching, fork, CoW, free."""

import pytest

from pagedllm.core.kv_cache_manager import (
    KVCacheManager,
    hash_block_tokens,
    hash_request_tokens,
)
from tests.core.utils import make_request


def compute(manager: KVCacheManager, request, num_new: int, hit=None) -> list[int] | None:
    """Allocate and mark ``num_new`` tokens computed, the way the scheduler does."""
    blocks, num_hit = hit if hit is not None else ([], 0)
    ids = manager.allocate_slots(request, num_new, blocks, num_hit)
    if ids is not None:
        request.num_computed_tokens += num_hit + num_new
        manager.cache_blocks(request, request.num_computed_tokens)
    return ids


def test_allocates_a_block_only_when_the_last_is_full():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    req = make_request("a", 6)
    assert compute(kv, req, 6) == [0, 1]  # 6 tokens: one full block, one partial
    req.append_output_token_ids(9)
    assert compute(kv, req, 1) == []  # slot 7 of 8: no new block
    assert kv.allocate_slots(req, 0) == []  # nothing new: nothing changes
    req.append_output_token_ids(9)
    assert compute(kv, req, 1) == []
    req.append_output_token_ids(9)
    assert compute(kv, req, 1) == [2]  # 9th token opens block 3
    stats = kv.stats()
    assert stats.num_blocks_used == 3
    assert stats.num_token_slots_used == 9
    assert stats.num_token_slots_wasted == 3  # less than one block
    assert stats.kv_utilization == pytest.approx(9 / 12)
    assert kv.slot_usage() == (9, 12)
    kv.check_invariants({"a"}, {"a": req})


def test_allocation_is_all_or_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    big = make_request("big", 13)  # needs 4 blocks
    assert kv.allocate_slots(big, 13) is None
    assert kv.get_num_free_blocks() == 3
    assert kv.get_block_ids("big") == []
    kv.check_invariants({"big"})
    kv.free("big")
    kv.check_invariants(set())


def test_repeated_prompt_hits_every_full_block_but_recomputes_the_last_token():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    first = make_request("first", 12)
    compute(kv, first, 12)
    kv.free("first")
    again = make_request("again", 12)
    blocks, num_hit = kv.get_computed_blocks(again)
    # Three full blocks cached, but the last token must run: only two reused.
    assert num_hit == 8 and len(blocks) == 2
    ids = compute(kv, again, 12 - num_hit, (blocks, num_hit))
    assert ids[:2] == [b.block_id for b in blocks]
    assert kv.prefix_cache_queries == 24 and kv.prefix_cache_hits == 8
    longer = make_request("longer", [*range(1, 13), 77])
    blocks, num_hit = kv.get_computed_blocks(longer)
    assert num_hit == 12  # all three full blocks
    kv.check_invariants({"again", "longer"})


def test_prefix_hit_stops_at_the_first_divergent_block():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    compute(kv, make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]), 13)
    other = make_request("b", [1, 2, 3, 4, 5, 6, 0, 8, 9, 10, 11, 12, 13])
    assert kv.get_computed_blocks(other)[1] == 4
    kv.free("b")


def test_cache_salt_separates_otherwise_equal_prompts():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    compute(kv, make_request("a", 9), 9)
    salted = make_request("b", 9)
    salted.cache_salt = "tenant-2"
    assert kv.get_computed_blocks(salted)[1] == 0
    unsalted = make_request("c", 9)
    assert kv.get_computed_blocks(unsalted)[1] == 8


def test_prompt_logprobs_or_disabled_caching_skip_the_lookup():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    compute(kv, make_request("a", 9), 9)
    assert kv.get_computed_blocks(make_request("b", 9, prompt_logprobs=1)) == ([], 0)
    off = KVCacheManager(num_blocks=16, block_size=4, enable_caching=False)
    req = make_request("a", 9)
    compute(off, req, 9)
    assert off.block_pool.cached_block_hash_to_block == {}
    assert off.get_computed_blocks(make_request("b", 9)) == ([], 0)
    off.cache_blocks(req, 9)  # no-op
    assert off.stats().prefix_cache_queries == 0


def test_hit_on_free_cached_blocks_counts_them_against_free_space():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    compute(kv, make_request("a", 12), 12)
    kv.free("a")
    req = make_request("b", 12)
    blocks, num_hit = kv.get_computed_blocks(req)
    assert num_hit == 8
    # 2 cached blocks leave the free queue and 1 new block is needed: exactly 3.
    assert compute(kv, req, 4, (blocks, num_hit)) is not None
    assert kv.get_num_free_blocks() == 0
    kv.check_invariants({"b"})


def test_hit_that_does_not_fit_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    compute(kv, make_request("a", 12), 12)
    kv.free("a")
    compute(kv, make_request("hog", [50] * 8), 8)  # the unused block, then a's tail
    req = make_request("b", 13)
    blocks, num_hit = kv.get_computed_blocks(req)
    assert num_hit == 8
    # 2 evictable hits + 2 new blocks > 2 free blocks.
    assert kv.allocate_slots(req, 5, blocks, num_hit) is None
    assert all(b.ref_cnt == 0 for b in blocks)
    assert kv.get_num_free_blocks() == 2
    kv.check_invariants({"hog", "b"})


def test_tail_blocks_are_evicted_before_the_prompt_head():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    compute(kv, make_request("a", 12), 12)
    kv.free("a")
    compute(kv, make_request("x", [50, 51, 52]), 3)  # takes one block: a's tail
    assert kv.get_computed_blocks(make_request("b", 13))[1] == 8


def test_prefix_hits_are_only_counted_at_admission():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    req = make_request("a", 5)
    compute(kv, req, 5)
    req.append_output_token_ids(1)
    compute(kv, req, 1)
    assert kv.stats().prefix_cache_queries == 5
    assert kv.stats().prefix_cache_hit_rate == 0.0


def test_fork_shares_blocks_and_copies_on_first_write():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    parent = make_request("p", 6)
    compute(kv, parent, 6)
    parent.append_output_token_ids(100)
    child = parent.fork("c", output_token_ids=[200])
    kv.fork("p", "c")
    shared = kv.get_block_ids("p")
    assert kv.get_block_ids("c") == shared
    assert [kv.block_pool.blocks[i].ref_cnt for i in shared] == [2, 2]
    kv.check_invariants({"p", "c"}, {"p": parent, "c": child})
    assert kv.slot_usage() == (6, 8)  # the shared partial block counts once
    # The parent writes into the shared partial block: it gets a copy.
    assert compute(kv, parent, 1) == []
    copies = kv.take_pending_copies()
    assert copies == [(shared[1], kv.get_block_ids("p")[1])]
    assert kv.get_block_ids("p")[0] == shared[0]
    # The child now holds the original alone and writes in place.
    assert compute(kv, child, 1) == []
    assert kv.take_pending_copies() == []
    assert kv.get_block_ids("c") == shared
    kv.check_invariants({"p", "c"}, {"p": parent, "c": child})
    kv.free("p")
    kv.free("c")
    kv.check_invariants(set())


def test_fork_on_a_block_boundary_needs_no_copy():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    parent = make_request("p", 8)
    compute(kv, parent, 8)
    parent.append_output_token_ids(5)
    kv.fork("p", "c")
    assert compute(kv, parent, 1) == [2]
    assert kv.take_pending_copies() == []


def test_copy_on_write_needs_a_free_block():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    parent = make_request("p", 6)
    compute(kv, parent, 6)
    parent.append_output_token_ids(1)
    kv.fork("p", "c")
    assert kv.allocate_slots(parent, 1) is None  # the copy needs a block
    assert kv.take_pending_copies() == []
    kv.check_invariants({"p", "c"})


def test_freeing_a_copy_destination_drops_the_pending_copy():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    parent = make_request("p", 6)
    compute(kv, parent, 6)
    parent.append_output_token_ids(1)
    kv.fork("p", "c")
    kv.fork("p", "d")
    compute(kv, parent, 1)
    kv.free("p")
    assert kv.take_pending_copies() == []
    # Freeing a sequence without pending copies keeps the others' copies.
    child = parent.fork("c")
    child.num_computed_tokens = 6
    compute(kv, child, 1)
    kv.free("d")
    assert len(kv.take_pending_copies()) == 1


def test_fork_errors():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    with pytest.raises(ValueError, match="holds no blocks"):
        kv.fork("nobody", "c")
    compute(kv, make_request("p", 3), 3)
    kv.fork("p", "c")
    with pytest.raises(ValueError, match="already exists"):
        kv.fork("p", "c")


def test_prefix_hit_only_on_first_allocation():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    compute(kv, make_request("a", 9), 9)
    req = make_request("b", 9)
    compute(kv, req, 1)
    blocks, _ = kv.get_computed_blocks(make_request("c", 9))
    with pytest.raises(ValueError, match="already has blocks"):
        kv.allocate_slots(req, 1, blocks, 8)


def test_cache_blocks_for_unknown_request_is_a_no_op():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    kv.cache_blocks(make_request("ghost", 8), 8)
    kv.free("ghost")
    assert not kv.holds_blocks("ghost")
    assert kv.num_blocks == 8 and kv.get_usage() == 0.0


def test_bad_block_size():
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(num_blocks=8, block_size=0)


def test_hash_chain_covers_every_earlier_token_and_the_extra_keys():
    a = hash_request_tokens([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = hash_request_tokens([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2 and a[1] != b[1]  # same second block, different parent
    assert a[1] == hash_block_tokens(hash_block_tokens(None, [1, 2, 3, 4]), [5, 6, 7, 8])
    assert hash_block_tokens(None, [1, 2, 3, 4], ("salt",)) != a[0]
    assert hash_request_tokens([1, 2, 3], 4) == []


def test_check_invariants_catches_a_dead_holder():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    compute(kv, make_request("a", 3), 3)
    with pytest.raises(AssertionError, match="dead request"):
        kv.check_invariants(set())


def test_check_invariants_catches_a_stale_hash_chain():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    req = make_request("a", 9)
    compute(kv, req, 9)
    req.all_token_ids[0] = 99  # tokens changed behind the manager's back
    with pytest.raises(AssertionError, match="stale"):
        kv.check_invariants({"a"}, {"a": req})


def test_prefix_hit_alone_allocates_no_new_block():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    compute(kv, make_request("a", 9), 9)
    req = make_request("b", 9)
    hit = kv.get_computed_blocks(req)
    assert compute(kv, req, 0, hit) == kv.get_block_ids("a")[:2]
    assert kv.take_pending_copies() == []
    kv.check_invariants({"a", "b"})
