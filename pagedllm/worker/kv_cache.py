"""Sizing and allocating the KV cache: one preallocated pool per layer, in its storage
format (attention/kv_cache.py)."""

from __future__ import annotations

import torch

from pagedllm.attention.kv_cache import KVCache, kv_cache_class, make_kv_cache
from pagedllm.model.config import ModelArchConfig

GIB = 1 << 30
DEFAULT_CPU_KV_GIB = 1.0
DEFAULT_GPU_MEMORY_FRACTION = 0.9


def bytes_per_token(config: ModelArchConfig, dtype: torch.dtype) -> int:
    """Bytes one token takes across all layers, keys and values, scales included."""
    per_layer = kv_cache_class(dtype).bytes_per_token(config.num_kv_heads, config.head_dim, dtype)
    return config.num_layers * per_layer


def bytes_per_block(config: ModelArchConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, keys and values, scales included."""
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
    """One cache of `num_blocks` blocks storing `dtype` per layer, each knowing its layer's
    sliding window."""
    caches = []
    for layer in range(config.num_layers):
        cache = make_kv_cache(
            num_blocks, block_size, config.num_kv_heads, config.head_dim, dtype=dtype, device=device
        )
        cache.sliding_window = config.layer_window(layer)
        caches.append(cache)
    return caches


def copy_blocks(kv_caches: list[KVCache], copies: list[tuple[int, int]]) -> None:
    """Copy-on-write: duplicate source blocks into destinations in every layer."""
    if not copies:
        return
    device = kv_caches[0].device
    src = torch.tensor([s for s, _ in copies], device=device)
    dst = torch.tensor([d for _, d in copies], device=device)
    for cache in kv_caches:
        cache.copy_blocks(src, dst)
