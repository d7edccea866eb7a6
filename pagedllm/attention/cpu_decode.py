"""Decode attention on the CPU straight from the paged KV cache (the C kernel in `csrc/`).

The torch path copies every decode sequence's blocks into one padded tensor before SDPA;
this one reads each key and value once, in place, in the cache's storage format (float32,
bf16, f16, int8, fp8), widening a head's row at a time. Used on the CPU for float32
queries when the kernel builds; `torch_backend` falls back to the gather otherwise.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from pagedllm import cpu_kernels
from pagedllm.attention.kv_cache import Fp8KVCache, Int8KVCache, KVCache
from pagedllm.attention.metadata import AttentionMetadata

SOURCE = Path(__file__).resolve().parent / "csrc" / "paged_decode.c"


_INT, _PTR, _FLOAT = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
MAX_HEAD_DIM = 256  # paged_decode.c's row buffer


class PagedKV(ctypes.Structure):
    """paged_decode.c's `paged_kv`: one layer's cache as the kernels see it."""

    _fields_ = [
        ("key", _PTR),
        ("value", _PTR),
        ("key_scales", _PTR),
        ("value_scales", _PTR),
        ("key_scale", _FLOAT),
        ("value_scale", _FLOAT),
        ("format", _INT),
        ("block_size", _INT),
        ("num_kv_heads", _INT),
        ("head_dim", _INT),
        ("window", _INT),
    ]


def c_view(cache: KVCache) -> int:
    """The address of the cache's `paged_kv`, built once and kept on the cache."""
    if cache.c_view is None:
        key_scales = value_scales = None
        key_scale = value_scale = 1.0
        if isinstance(cache, Int8KVCache):
            key_scales, value_scales = cache.scales[0].data_ptr(), cache.scales[1].data_ptr()
        if isinstance(cache, Fp8KVCache):
            key_scale, value_scale = cache.key_scale, cache.value_scale
        cache.c_view = PagedKV(
            cache.data[0].data_ptr(), cache.data[1].data_ptr(), key_scales, value_scales,
            key_scale, value_scale, cache.format, cache.block_size, cache.num_kv_heads,
            cache.head_dim, cache.sliding_window or 0,
        )  # fmt: skip
    return ctypes.addressof(cache.c_view)  # type: ignore[arg-type]


# paged_decode_attention(query, kv, block_tables, seq_lens, num_seqs, max_blocks, group,
#   scale, out, num_threads)
ARGTYPES = (_PTR, _PTR, _PTR, _PTR, _INT, _INT, _INT, _FLOAT, _PTR, _INT)


def paged_decode_kernel() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """The C kernel, or None where it cannot be built."""
    return cpu_kernels.kernel(SOURCE, "paged_decode_attention", ARGTYPES)


def supports(query: torch.Tensor, kv_cache: KVCache) -> bool:
    """Whether the C kernels take this query and cache (CPU, float32 queries, power-of-two
    blocks, rows of at most MAX_HEAD_DIM)."""
    block_size = kv_cache.block_size
    return (
        query.device.type == "cpu"
        and kv_cache.device.type == "cpu"
        and block_size & (block_size - 1) == 0  # the kernel finds blocks by shift and mask
        and query.dtype == torch.float32
        and kv_cache.head_dim <= MAX_HEAD_DIM
        and paged_decode_kernel() is not None
    )


def paged_decode(
    query: torch.Tensor,
    kv_cache: KVCache,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    kernel: ctypes._CFuncPtr | None = None,  # type: ignore[name-defined]
) -> torch.Tensor:
    """One query token per sequence, query [B, Hq, D] → [B, Hq, D], over `kv_cache`, each
    sequence's blocks in its row of block_tables."""
    kernel = kernel or paged_decode_kernel()
    assert kernel is not None, "check supports() first"
    query = query.contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    lens = seq_lens.to(torch.int64).contiguous()
    num_seqs, num_heads, _ = query.shape
    out = torch.empty_like(query)
    status = kernel(
        query.data_ptr(), c_view(kv_cache), tables.data_ptr(), lens.data_ptr(), num_seqs,
        tables.shape[1], num_heads // kv_cache.num_kv_heads, scale, out.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("paged decode attention could not allocate its score buffers")
    return out


# paged_decode_rope(qkv, ld, cos, sin, slots, kv, block_tables, seq_lens, num_seqs, max_blocks,
#   group, scale, out, num_threads)
ROPE_ARGTYPES = (_PTR, ctypes.c_long, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _INT, _INT, _INT)
ROPE_ARGTYPES += (_FLOAT, _PTR, _INT)


def paged_decode_rope_kernel() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """The fused rotary + KV write + decode attention kernel, or None where it cannot be built."""
    return cpu_kernels.kernel(SOURCE, "paged_decode_rope", ROPE_ARGTYPES)


def paged_decode_rope(
    qkv: torch.Tensor,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    kv_cache: KVCache,
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
    cos, sin = cos_sin
    tables, lens = meta.decode_block_tables, meta.decode_seq_lens
    out = torch.empty(qkv.shape[0], num_heads * kv_cache.head_dim, dtype=torch.float32)
    status = kernel(
        qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(),
        meta.slot_mapping.data_ptr(), c_view(kv_cache), tables.data_ptr(), lens.data_ptr(),
        qkv.shape[0], tables.shape[1], num_heads // kv_cache.num_kv_heads, scale,
        out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("paged decode attention could not allocate its buffers")
    return out


# rotate_qk(qkv, ld, cos, sin, T, num_heads, num_kv_heads, head_dim, query, key, num_threads)
ROTATE_ARGTYPES = (_PTR, ctypes.c_long, _PTR, _PTR, _INT, _INT, _INT, _INT, _PTR, _PTR, _INT)


def rotate_qk_kernel() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """The rotary kernel for any step's q and k, or None where it cannot be built."""
    return cpu_kernels.kernel(SOURCE, "rotate_qk", ROTATE_ARGTYPES)


def rotate_qk(
    qkv: torch.Tensor,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D] and k [T, Hkv, D] rotated out of the fused projection qkv
    [T, (Hq + 2 Hkv) * D] (float32) by cos/sin ([T, 1, D], `RotaryEmbedding.cos_sin`):
    the values torch's `apply_rotary` gives, in one call instead of five passes."""
    kernel = rotate_qk_kernel()
    assert kernel is not None and qkv.stride(1) == 1
    cos, sin = (t.to(torch.float32).contiguous() for t in cos_sin)
    tokens = qkv.shape[0]
    query = torch.empty(tokens, num_heads, head_dim, dtype=torch.float32)
    key = torch.empty(tokens, num_kv_heads, head_dim, dtype=torch.float32)
    status = kernel(
        qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), tokens, num_heads,
        num_kv_heads, head_dim, query.data_ptr(), key.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise ValueError(f"rotary embeddings need an even head_dim, not {head_dim}")
    return query, key
