"""CacheConfig and SchedulerConfig validate every field at construction."""

import pytest

from pagedllm.config import CacheConfig, SchedulerConfig


def test_defaults_are_valid():
    assert CacheConfig().block_size == 16
    config = SchedulerConfig()
    assert (config.max_num_seqs, config.max_num_batched_tokens, config.policy) == (
        256,
        2048,
        "fcfs",
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block_size": 0}, "block_size must be >= 1, got 0"),
        ({"block_size": 12}, "block_size must be a power of two, got 12"),
        ({"block_size": 2048}, "block_size must be <= 1024"),
        ({"block_size": 16.0}, "block_size must be an integer"),
        ({"num_blocks": 0}, "num_blocks must be >= 1"),
        ({"enable_prefix_caching": 1}, "enable_prefix_caching must be a boolean"),
        ({"kv_cache_memory": 0}, "kv_cache_memory must be a positive"),
        ({"kv_cache_memory": float("nan")}, "kv_cache_memory must be a positive"),
        ({"kv_cache_memory": "4"}, "kv_cache_memory must be a number"),
    ],
)
def test_cache_config_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CacheConfig(**kwargs)


def test_cache_config_accepts():
    config = CacheConfig(block_size=1, num_blocks=10, kv_cache_memory=0.5)
    assert config.num_blocks == 10


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_num_seqs": 0}, "max_num_seqs must be >= 1, got 0"),
        ({"max_num_batched_tokens": -1}, "max_num_batched_tokens must be >= 1"),
        ({"max_model_len": 1}, "max_model_len must be >= 2"),
        ({"max_num_seqs": True}, "max_num_seqs must be an integer"),
        ({"enable_chunked_prefill": "yes"}, "enable_chunked_prefill must be a boolean"),
        ({"policy": "lifo"}, "policy must be one of"),
        ({"max_waiting": 0}, "max_waiting must be >= 1"),
        (
            {"enable_chunked_prefill": False, "max_num_batched_tokens": 512},
            "max_num_batched_tokens must be >= max_model_len when chunked prefill is off",
        ),
    ],
)
def test_scheduler_config_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SchedulerConfig(**kwargs)


def test_scheduler_config_accepts():
    config = SchedulerConfig(policy="priority", max_waiting=5, enable_chunked_prefill=False)
    assert config.max_waiting == 5
