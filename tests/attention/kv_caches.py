"""KV caches for tests: every storage format, filled with random values or cloned."""

from __future__ import annotations

import copy

import torch

from pagedllm.attention.kv_cache import KVCache, make_kv_cache

# Every storage format, by its --kv-cache-dtype name.
FORMATS = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


def random_cache(
    dtype: torch.dtype,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    generator: torch.Generator,
) -> KVCache:
    """A cache whose every slot holds random keys and values, written through its format."""
    cache = make_kv_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
    slots = torch.arange(num_blocks * block_size)
    shape = (len(slots), num_kv_heads, head_dim)
    key = torch.randn(shape, generator=generator)
    value = torch.randn(shape, generator=generator)
    cache.write(key, value, slots)
    return cache


def clone_cache(cache: KVCache) -> KVCache:
    """An independent copy (tensors cloned, no C view shared)."""
    clone = copy.copy(cache)
    clone.__dict__ = {
        k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in cache.__dict__.items()
    }
    clone.c_view = None
    return clone


def caches_equal(a: KVCache, b: KVCache) -> bool:
    """Same stored bits and scales."""
    tensors = [k for k, v in a.__dict__.items() if isinstance(v, torch.Tensor)]
    return all(
        torch.equal(a.__dict__[k].view(torch.uint8), b.__dict__[k].view(torch.uint8))
        for k in tensors
    )
