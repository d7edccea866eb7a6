"""Sizing and allocating the KV cache: one preallocated pool per layer."""

from __future__ import annotations

import torch

from pagedllm.model.config import ModelArchConfig

GIB = 1 << 30
DEFAULT_CPU_KV_GIB = 1.0
DEFAULT_GPU_MEMORY_FRACTION = 0.9


def bytes_per_block(config: ModelArchConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, keys and values."""
    element = torch.empty((), dtype=dtype).element_size()
    return config.kv_bytes_per_token(element) * block_size


def num_blocks_for_memory(
    config: ModelArchConfig,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    kv_cache_memory_gib: float | None,
) -> int:
    """How many blocks fit: the given GiB, or on CUDA a share of free memory, else 1 GiB."""
    if kv_cache_memory_gib is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * DEFAULT_GPU_MEMORY_FRACTION)
        else:
            budget = int(DEFAULT_CPU_KV_GIB * GIB)
    else:
        budget = int(kv_cache_memory_gib * GIB)
    return budget // bytes_per_block(config, block_size, dtype)


def allocate_kv_cache(
    config: ModelArchConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[torch.Tensor]:
    """One [2, num_blocks, block_size, kv_heads, head_dim] tensor per layer (see attention/)."""
    shape = (2, num_blocks, block_size, config.num_kv_heads, config.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]


def copy_blocks(kv_caches: list[torch.Tensor], copies: list[tuple[int, int]]) -> None:
    """Copy-on-write: duplicate source blocks into destinations in every layer."""
    if not copies:
        return
    device = kv_caches[0].device
    src = torch.tensor([s for s, _ in copies], device=device)
    dst = torch.tensor([d for _, d in copies], device=device)
    for cache in kv_caches:
        cache[:, dst] = cache[:, src]
