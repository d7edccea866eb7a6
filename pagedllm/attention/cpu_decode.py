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
from pagedllm.attention.metadata import AttentionMetadata

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
    """Whether the C kernels take this query and cache (CPU, float32, power-of-two blocks)."""
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


# paged_decode_rope(qkv, ld, cos, sin, slots, key_cache, value_cache, block_tables, seq_lens,
#   num_seqs, max_blocks, block_size, num_kv_heads, group, head_dim, scale, out, num_threads)
ROPE_ARGTYPES = (_PTR, ctypes.c_long, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _INT, _INT, _INT)
ROPE_ARGTYPES += (_INT, _INT, _INT, ctypes.c_float, _PTR, _INT)


def paged_decode_rope_kernel() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """The fused rotary + KV write + decode attention kernel, or None where it cannot be built."""
    return cpu_kernels.kernel(SOURCE, "paged_decode_rope", ROPE_ARGTYPES)


def paged_decode_rope(
    qkv: torch.Tensor,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    num_heads: int,
    scale: float,
) -> torch.Tensor:
    """A decode-only step's attention from the fused projection qkv [B, (Hq + 2 Hkv) * D]:
    rotates q and k by cos/sin ([B, 1, D], `RotaryEmbedding.cos_sin`), writes k and v to
    meta.slot_mapping, attends; returns [B, Hq * D]. The caller checks `supports` and that
    every sequence brings one token."""
    kernel = paged_decode_rope_kernel()
    assert kernel is not None and qkv.stride(1) == 1
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    cos, sin = cos_sin
    tables, lens = meta.decode_block_tables, meta.decode_seq_lens
    out = torch.empty(qkv.shape[0], num_heads * head_dim, dtype=torch.float32)
    status = kernel(
        qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(),
        meta.slot_mapping.data_ptr(), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(),
        tables.data_ptr(), lens.data_ptr(), qkv.shape[0], tables.shape[1], block_size,
        num_kv_heads, num_heads // num_kv_heads, head_dim, scale, out.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("paged decode attention could not allocate its buffers")
    return out
