"""Decode attention on the CPU straight from the paged KV cache (the C kernel in `csrc/`).

The torch path copies every decode sequence's blocks into one padded tensor before SDPA;
this one reads each key and value once, in place. Used for float32 caches on the CPU
when the kernel builds; `torch_backend` falls back to the gather otherwise.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from pagedllm import cpu_kernels

SOURCE = Path(__file__).resolve().parent / "csrc" / "paged_decode.c"


_INT, _PTR = ctypes.c_int, ctypes.c_void_p
# paged_decode_attention(query, key_cache, value_cache, block_tables, seq_lens, num_seqs,
#   max_blocks, block_size, num_kv_heads, group, head_dim, scale, out, num_threads)
ARGTYPES = (_PTR, _PTR, _PTR, _PTR, _PTR, _INT, _INT, _INT, _INT, _INT, _INT, ctypes.c_float)
ARGTYPES += (_PTR, _INT)


def paged_decode_kernel() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """The C kernel, or None where it cannot be built."""
    return cpu_kernels.kernel(SOURCE, "paged_decode_attention", ARGTYPES)


def supports(query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    block_size = kv_cache.shape[2]
    return (
        query.device.type == "cpu"
        and block_size & (block_size - 1) == 0  # the kernel finds blocks by shift and mask
        and query.dtype == kv_cache.dtype == torch.float32
        and paged_decode_kernel() is not None
    )


def paged_decode(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    kernel: ctypes._CFuncPtr | None = None,  # type: ignore[name-defined]
) -> torch.Tensor:
    """One query token per sequence, query [B, Hq, D] → [B, Hq, D], over `kv_cache`
    [2, num_blocks, block_size, Hkv, D], each sequence's blocks in its row of block_tables."""
    kernel = kernel or paged_decode_kernel()
    assert kernel is not None, "check supports() first"
    query = query.contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    lens = seq_lens.to(torch.int64).contiguous()
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_seqs, num_heads, _ = query.shape
    out = torch.empty_like(query)
    status = kernel(
        query.data_ptr(), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), tables.data_ptr(),
        lens.data_ptr(), num_seqs, tables.shape[1], block_size, num_kv_heads,
        num_heads // num_kv_heads, head_dim, scale, out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("paged decode attention could not allocate its score buffers")
    return out
