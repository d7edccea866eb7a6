"""Layer groups with sliding windows: a local group frees the blocks its window has left,
a full group keeps every block, and prefix hits are taken only where every group can
resume (a sliding group needs just the blocks its next query sees)."""

import pytest

from pagedllm.config import CacheConfig, SchedulerConfig
from pagedllm.core.kv_cache_groups import group_layers, group_size
from pagedllm.core.kv_cache_manager import NULL_BLOCK_ID, KVCacheManager
from pagedllm.core.scheduler import Scheduler
from tests.core.test_kv_cache_manager import compute
from tests.core.utils import make_request

# Gemma 3 270M: 18 layers, every 6th global, the others a 512-token window.
GEMMA_WINDOWS = [None if (i + 1) % 6 == 0 else 512 for i in range(18)]


def test_gemma_layers_form_one_global_and_five_local_groups_of_three():
    groups = group_layers(GEMMA_WINDOWS)
    assert [g.sliding_window for g in groups] == [None] + [512] * 5
    assert groups[0].layers == (5, 11, 17)
    assert groups[1].layers == (0, 1, 2)
    assert group_size(groups) == 3
    assert sorted(i for g in groups for i in g.layers) == list(range(18))


def test_uniform_models_keep_one_group_of_every_layer():
    assert group_layers([None] * 30) == group_layers([None] * 30)[:1]
    [mistral] = group_layers([4096] * 32)
    assert mistral.sliding_window == 4096 and len(mistral.layers) == 32


def test_uneven_counts_pad_the_last_group():
    # Gemma 3 1B: 26 layers, 4 global: groups of 4, the last local one of 2
    groups = group_layers([None if (i + 1) % 6 == 0 else 512 for i in range(26)])
    assert [len(g.layers) for g in groups] == [4, 4, 4, 4, 4, 4, 2]


def test_an_8192_token_sequence_holds_a_sixth_of_full_attention_plus_five_sixths_of_a_window():
    """The issue's target for Gemma 3: at most 1/6 of the full-attention blocks plus 5/6
    of one window's, plus one block per group."""
    windows = [g.sliding_window for g in group_layers(GEMMA_WINDOWS)]
    kv = KVCacheManager(4000, 16, True, windows, max_step_tokens=2048)
    request = make_request("long", 8000, max_tokens=192)
    while request.num_computed_tokens < request.num_tokens:  # 2048-token chunks
        chunk = min(2048, request.num_tokens - request.num_computed_tokens)
        assert compute(kv, request, chunk) is not None
        kv.check_invariants({"long"}, {"long": request})
    while request.num_tokens < 8192:  # decode to 8192 tokens
        request.append_output_token_ids(7)
        assert compute(kv, request, 1) is not None
    kv.check_invariants({"long"}, {"long": request})
    held = kv.num_held_blocks("long")
    # one block holds 3 layers' slots: all 18 layers over 8192 tokens are 6 * 512 blocks
    full_attention = 6 * 8192 // 16
    window = 6 * 512 // 16
    assert held <= full_attention / 6 + 5 / 6 * window + 6
    assert held == 512 + 5 * 32  # the global group's every block, 32 per local group
    assert kv.get_num_free_blocks() == 4000 - held


def run_prompt(kv: KVCacheManager, request, chunk: int = 64) -> None:
    hit = kv.get_computed_blocks(request)
    assert compute(kv, request, min(chunk, request.num_tokens - hit[1]), hit) is not None
    while request.num_computed_tokens < request.num_tokens:
        n = min(chunk, request.num_tokens - request.num_computed_tokens)
        assert compute(kv, request, n) is not None


def test_blocks_a_window_left_go_to_the_prefix_cache_and_are_hit_again():
    kv = KVCacheManager(64, 4, True, [None, 8])
    first = make_request("a", list(range(40)))
    run_prompt(kv, first, chunk=8)
    tables = kv.get_group_block_tables("a")
    # the last chunk's first query (position 32) saw 25..: the local group holds 6..9
    assert tables[1][:6] == [NULL_BLOCK_ID] * 6
    assert kv.num_held_blocks("a") == 10 + 4
    first.append_output_token_ids(5)
    assert len(compute(kv, first, 1)) == 1  # position 40 opens block 10, sees 33..: 6, 7 go
    assert tables[1][:8] == [NULL_BLOCK_ID] * 8
    assert kv.num_held_blocks("a") == 11 + 3
    kv.check_invariants({"a"}, {"a": first})
    kv.free("a")
    second = make_request("b", [*range(40), 99])
    blocks, num_hit = kv.get_computed_blocks(second)
    assert num_hit == 40  # every full block: the global group's, and the local window
    assert compute(kv, second, 1, (blocks, num_hit)) is not None
    kv.check_invariants({"b"}, {"b": second})
    local = kv.get_group_block_tables("b")[1]
    assert local[:8] == [NULL_BLOCK_ID] * 8 and len(local) == 11


def forget(pool, key: bytes) -> None:
    """Evict one free cached block, as handing it out for new content would."""
    block = pool.cached_block_hash_to_block[key]
    pool.touch([block])
    pool._evict(block)
    pool.free_blocks([block])


def test_a_sliding_hit_needs_only_the_window_before_it():
    kv = KVCacheManager(64, 4, True, [None, 8])
    first = make_request("a", list(range(40)))
    run_prompt(kv, first, chunk=40)  # one chunk: every local block was written and cached
    kv.free("a")
    pool = kv.block_pool
    local_keys = [k for k in pool.cached_block_hash_to_block if len(k) > 32]
    assert len(local_keys) == 10
    # Evict the local group's first block: a hit at 40 tokens needs blocks 8 and 9 only.
    forget(pool, local_keys[0])
    _, num_hit = kv.get_computed_blocks(make_request("b", [*range(40), 1]))
    assert num_hit == 40
    # Without block 8 of the local group, the hit falls back to a length whose window
    # is whole: 32 tokens (blocks 6 and 7)
    forget(pool, local_keys[8])
    _, num_hit = kv.get_computed_blocks(make_request("c", [*range(40), 1]))
    assert num_hit == 32


def test_the_pool_holds_longer_sequences_when_groups_slide():
    config = SchedulerConfig(max_num_batched_tokens=64, max_model_len=10_000)
    cache = CacheConfig(block_size=16)
    full = Scheduler(config, cache, 600, [None] * 6)
    hybrid = Scheduler(config, cache, 600, [None] + [512] * 5)
    assert full.default_max_len == 600 * 16 // 6 + 1
    # 5 local groups hold at most (512 + 64 - 2) // 16 + 2 = 37 blocks each
    assert hybrid.default_max_len == (600 - 5 * 37) * 16 + 1
    long = make_request("r", 5000, max_tokens=1000)
    hybrid.add_request(long)  # fits: the local groups stay at a window each
    with pytest.raises(ValueError, match="KV-cache blocks"):
        full.add_request(make_request("r", 5000, max_tokens=1000))


@pytest.mark.parametrize(
    ("windows", "message"),
    [((), "one entry per layer group"), ((None, 0), "positive integer"), (("8",), "positive")],
)
def test_bad_windows_are_refused(windows, message):
    with pytest.raises(ValueError, match=message):
        KVCacheManager(8, 4, True, windows)


def test_a_model_needs_a_layer():
    with pytest.raises(ValueError, match="at least one layer"):
        group_layers([])
