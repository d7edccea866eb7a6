"""Sizing and allocating the KV cache: one preallocated pool per layer slot, in its
storage format (attention/kv_cache.py), shared by the layer groups (core/kv_cache_groups.py)."""

from __future__ import annotations

import copy

import torch

from pagedllm.attention.kv_cache import KVCache, kv_cache_class, make_kv_cache
from pagedllm.core.kv_cache_groups import KVCacheGroup, group_layers, group_size
from pagedllm.model.config import ModelArchConfig

GIB = 1 << 30
DEFAULT_CPU_KV_GIB = 1.0
DEFAULT_GPU_MEMORY_FRACTION = 0.9


def kv_cache_groups(config: ModelArchConfig) -> list[KVCacheGroup]:
    """The model's layers grouped by attention span, full attention first."""
    return group_layers([config.layer_window(layer) for layer in range(config.num_layers)])


def bytes_per_token(config: ModelArchConfig, dtype: torch.dtype) -> int:
    """Bytes one token slot of a block takes across its layer slots (every layer, for a
    model with one group), keys and values, scales included."""
    per_layer = kv_cache_class(dtype).bytes_per_token(config.num_kv_heads, config.head_dim, dtype)
    return group_size(kv_cache_groups(config)) * per_layer


def bytes_per_block(config: ModelArchConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across its layer slots, keys and values, scales included."""
    return bytes_per_token(config, dtype) * block_size


def num_blocks_for_memory(
    block_bytes: int, device: torch.device, kv_cache_memory_gib: float | None
) -> int:
    """How many blocks of `block_bytes` (every pool's share of one block) fit: the given
    GiB, or on CUDA a share of free memory, else 1 GiB."""
    if kv_cache_memory_gib is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * DEFAULT_GPU_MEMORY_FRACTION)
        else:
            budget = int(DEFAULT_CPU_KV_GIB * GIB)
    else:
        budget = int(kv_cache_memory_gib * GIB)
    return budget // block_bytes


def allocate_kv_cache(
    config: ModelArchConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[KVCache]:
    """Each layer's cache, in layer order: a view of its slot's pool of `num_blocks` blocks
    storing `dtype`, knowing its layer's sliding window and group (whose block table
    it is read through)."""
    groups = kv_cache_groups(config)
    slots = [
        make_kv_cache(
            num_blocks, block_size, config.num_kv_heads, config.head_dim, dtype=dtype, device=device
        )
        for _ in range(group_size(groups))
    ]
    caches: list[KVCache | None] = [None] * config.num_layers
    for index, group in enumerate(groups):
        for slot, layer in enumerate(group.layers):
            cache = copy.copy(slots[slot]) if len(groups) > 1 else slots[slot]
            cache.sliding_window = group.sliding_window
            cache.group = index
            caches[layer] = cache
    assert all(c is not None for c in caches)
    return caches  # type: ignore[return-value]


def copy_blocks(kv_caches: list[KVCache], copies: list[tuple[int, int]]) -> None:
    """Copy-on-write: duplicate source blocks into destinations in every layer slot."""
    if not copies:
        return
    device = kv_caches[0].device
    src = torch.tensor([s for s, _ in copies], device=device)
    dst = torch.tensor([d for _, d in copies], device=device)
    pools = {id(cache.data): cache for cache in kv_caches}  # a slot's views share its pool
    for cache in pools.values():
        cache.copy_blocks(src, dst)
