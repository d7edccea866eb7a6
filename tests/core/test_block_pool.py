"""The physical block pool: free queue order, reference counts, content-hash map."""

import pytest

from pagedllm.core.block_pool import BlockPool, FreeBlockQueue, KVCacheBlock


def test_new_pool_has_every_block_free_in_id_order():
    pool = BlockPool(4)
    assert pool.get_num_free_blocks() == 4
    assert pool.get_usage() == 0.0
    assert [b.block_id for b in pool.free_block_queue] == [0, 1, 2, 3]
    pool.check_invariants()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4"])
def test_pool_rejects_bad_size(bad):
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(bad)


def test_get_new_blocks_refuses_to_overcommit():
    pool = BlockPool(3)
    blocks = pool.get_new_blocks(2)
    assert [b.ref_cnt for b in blocks] == [1, 1]
    with pytest.raises(ValueError, match="only 1 are free"):
        pool.get_new_blocks(2)
    assert pool.get_num_free_blocks() == 1  # the refused call took nothing
    assert pool.get_usage() == pytest.approx(2 / 3)
    pool.check_invariants()


def test_freed_blocks_are_evicted_in_the_order_given():
    pool = BlockPool(3)
    a, b, c = pool.get_new_blocks(3)
    pool.free_blocks([c, a, b])
    assert [x.block_id for x in pool.free_block_queue] == [c.block_id, a.block_id, b.block_id]
    assert pool.get_new_blocks(1)[0] is c


def test_shared_block_is_freed_only_by_its_last_holder():
    pool = BlockPool(2)
    (a,) = pool.get_new_blocks(1)
    pool.touch([a])
    assert a.ref_cnt == 2
    pool.free_blocks([a])
    assert a.ref_cnt == 1 and pool.get_num_free_blocks() == 1
    pool.free_blocks([a])
    assert pool.get_num_free_blocks() == 2
    with pytest.raises(ValueError, match="freed more often"):
        pool.free_blocks([a])
    pool.check_invariants()


def test_cached_free_block_keeps_its_hash_until_reused():
    pool = BlockPool(2)
    a, b = pool.get_new_blocks(2)
    assert pool.cache_full_block(a, b"h-a")
    pool.free_blocks([b, a])  # b goes first in line for eviction
    assert pool.get_cached_block(b"h-a") is a
    assert pool.get_num_cached_free_blocks() == 1
    # A prefix hit takes a out of the middle of the free queue.
    pool.touch([a])
    assert a.ref_cnt == 1 and pool.get_num_free_blocks() == 1
    pool.free_blocks([a])
    # Now a is behind b; asking for two blocks evicts a's hash.
    got = pool.get_new_blocks(2)
    assert got == [b, a]
    assert a.block_hash is None and pool.get_cached_block(b"h-a") is None
    pool.check_invariants()


def test_cache_full_block_keeps_one_block_per_content():
    pool = BlockPool(3)
    a, b, _ = pool.get_new_blocks(3)
    assert pool.cache_full_block(a, b"same")
    assert not pool.cache_full_block(b, b"same")
    assert not pool.cache_full_block(a, b"other")  # already cached under "same"
    assert b.block_hash is None
    assert pool.get_cached_block(b"same") is a


def test_caching_disabled_never_caches():
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.get_new_blocks(1)
    assert not pool.cache_full_block(a, b"h")
    assert pool.get_cached_block(b"h") is None
    pool.check_invariants()


def test_free_queue_refuses_impossible_operations():
    queue = FreeBlockQueue([])
    assert len(queue) == 0
    with pytest.raises(ValueError, match="no free blocks"):
        queue.popleft()
    with pytest.raises(ValueError, match="not in the free queue"):
        queue.remove(KVCacheBlock(7))


def test_block_repr_shows_cache_state():
    block = KVCacheBlock(3)
    assert repr(block) == "KVCacheBlock(id=3, ref_cnt=0)"
    block.block_hash = bytes.fromhex("abcdef0123")
    assert "hash=abcdef01" in repr(block)


def test_check_invariants_catches_a_lost_reference():
    pool = BlockPool(2)
    (a,) = pool.get_new_blocks(1)
    a.ref_cnt = 0  # freed behind the pool's back: not queued
    with pytest.raises(AssertionError, match="missing from the queue"):
        pool.check_invariants()
