"""Paged attention in Triton for CUDA: same call and meaning as `torch_backend.paged_attention`.

Two kernels read keys and values in place from the paged cache, through the block tables
(nothing is gathered into a padded copy), with an online softmax over tiles of keys:
- paged decode: one program per (decode sequence, KV head); the KV head's query heads are
  the rows of its tile, so each key is read once for the whole group (GQA);
- varlen prefill: one program per (sequence, tile of its new tokens, query head), over the
  flat batch; the new keys and values are written to the cache first, so a chunk's cached
  prefix and its own tokens are read the same way.
Host-side sizes (grids, tile counts) come from the metadata's host lists; every length a
program needs is read on the device, so no layer waits for a device→host copy, and a
decode launch depends on nothing but the batch size (CUDA graphs can replay it).

Float storage formats only (float32, bf16, f16 caches); int8 and fp8 caches stay on the
torch backend (`supports`). Under `TRITON_INTERPRET=1` the kernels run on the CPU, which
is how the tests check them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.attention.kv_cache import KVCache
from pagedllm.attention.metadata import AttentionMetadata

FLOAT_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOG2E = 1.4426950408889634
# Masked scores: finite, so a tile with no visible key gives no NaN; such a tile's weights
# are wiped (scaled by exp2(-1e30 - m) = 0) by the first tile that has one.
MASKED = tl.constexpr(-1.0e30)
# The interpreter (TRITON_INTERPRET=1, read when the kernels are decorated) runs tl.dot
# as a NumPy product, which takes bf16 as raw bits: its bf16 products are made in float32.
INTERPRETED = bool(triton.knobs.runtime.interpret)


def supports(kv_cache: KVCache) -> bool:
    """Whether these kernels read this cache: float storage (int8/fp8 stay on torch)."""
    return kv_cache.dtype in FLOAT_CACHE_DTYPES


@triton.jit
def _tile_scores(
    q, table, pos, valid, k_ptr, v_ptr, offs_d, d_mask, kv_head,
    stride_kb, stride_kt, stride_kh, BLOCK_SIZE: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """A tile of keys and values at positions `pos` (where `valid`), read in place through
    the sequence's block table `table`, and the scores q·kᵀ (unscaled, unmasked)."""
    block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0)
    kv_offsets = block * stride_kb + (pos % BLOCK_SIZE) * stride_kt + kv_head * stride_kh
    kv_offsets = kv_offsets[:, None] + offs_d[None, :]
    kv_mask = valid[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
    if DOT_F32:
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k.to(q.dtype)))
    return s, v


@triton.jit
def _online_softmax_step(q, s, v, m_i, l_i, acc, DOT_F32: tl.constexpr):
    """Fold a tile's scaled, masked scores (log2 units) and its values into the running
    row maxima, sums and output."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_F32:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(q.dtype), v.to(q.dtype))
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _paged_decode_kernel(
    out_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    rows_ptr,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_bt,
    qk_scale,
    window,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SLIDING: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Decode sequence program_id(0)'s query row `rows[seq]`, for the GROUP query heads of
    KV head program_id(1), over the sequence's last seq_len (or `window`) positions."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    row = tl.load(rows_ptr + seq)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    q_offsets = row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_offsets, mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], MASKED, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    lo = 0
    if SLIDING:
        lo = tl.maximum(seq_len - window, 0)
    table = block_tables_ptr + seq * stride_bt
    for start in range((lo // BLOCK_N) * BLOCK_N, seq_len, BLOCK_N):
        pos = start + offs_n
        valid = (pos < seq_len) & (pos >= lo)
        s, v = _tile_scores(
            q, table, pos, valid, k_ptr, v_ptr, offs_d, d_mask, kv_head,
            stride_kb, stride_kt, stride_kh, BLOCK_SIZE, DOT_F32,
        )  # fmt: skip
        s = tl.where(valid[None, :], s * qk_scale, MASKED)
        m_i, l_i, acc = _online_softmax_step(q, s, v, m_i, l_i, acc, DOT_F32)

    # a row of no positions (a padded row of a captured batch) gives zeros, not NaN
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_offsets = row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    out_mask = g_mask[:, None] & d_mask[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _paged_prefill_kernel(
    out_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_bt,
    qk_scale,
    window,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SLIDING: tl.constexpr,
    SKIP_DECODES: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """New tokens BLOCK_M * program_id(1) … of sequence program_id(0), query head
    program_id(2): each attends causally to its sequence's positions (cached prefix and new
    tokens alike, through the block table), the last `window` of them when SLIDING."""
    seq = tl.program_id(0)
    m_block = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = (tl.load(query_start_loc_ptr + seq + 1) - q_start).to(tl.int32)
    skip = m_block * BLOCK_M >= q_len
    if SKIP_DECODES:  # single-token sequences are the decode kernel's
        skip = skip | (q_len == 1)
    if skip:
        return
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    context = seq_len - q_len
    kv_head = head // GROUP

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    q_pos = context + offs_m
    rows = q_start + offs_m
    q_offsets = rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_offsets, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], MASKED, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # keys [lo, hi): the tile's first query sees from lo, its last up to hi - 1
    hi = context + tl.minimum((m_block + 1) * BLOCK_M, q_len)
    lo = 0
    if SLIDING:
        lo = tl.maximum(context + m_block * BLOCK_M - window + 1, 0)
    table = block_tables_ptr + seq * stride_bt
    for start in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        pos = start + offs_n
        valid = (pos < hi) & (pos >= lo)
        s, v = _tile_scores(
            q, table, pos, valid, k_ptr, v_ptr, offs_d, d_mask, kv_head,
            stride_kb, stride_kt, stride_kh, BLOCK_SIZE, DOT_F32,
        )  # fmt: skip
        visible = valid[None, :] & (pos[None, :] <= q_pos[:, None])
        if SLIDING:
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s * qk_scale, MASKED)
        m_i, l_i, acc = _online_softmax_step(q, s, v, m_i, l_i, acc, DOT_F32)

    out = acc / l_i[:, None]
    out_offsets = rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    out_mask = m_mask[:, None] & d_mask[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=out_mask)


def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: KVCache,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """`torch_backend.paged_attention`'s call and result, computed by the two kernels."""
    if not supports(kv_cache):
        raise NotImplementedError(
            f"the Triton attention backend reads float KV caches {FLOAT_CACHE_DTYPES}, "
            f"not {kv_cache.dtype}: use the torch backend for int8/fp8 caches"
        )
    kv_cache.write(key, value, meta.slot_mapping)
    out = torch.empty_like(query)
    if meta.decode_seq_idx.numel():
        paged_decode(
            query,
            kv_cache,
            meta.decode_block_tables,
            meta.decode_seq_lens,
            meta.decode_token_idx,
            scale,
            out,
        )
    if meta.prefill_seq_idx:
        varlen_prefill(
            query,
            kv_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            max(meta.query_lens_list),  # host list: no device sync
            scale,
            out,
            skip_decodes=True,
        )
    return out


def paged_decode(
    query: torch.Tensor,
    kv_cache: KVCache,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    rows: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    block_n: int = 64,
) -> None:
    """Decode attention for the query rows `rows` [B] of `query` [T, Hq, D] into the same
    rows of `out`: sequence i attends to its seq_lens[i] cached positions through
    block_tables[i]. Launches B x Hkv programs; reads no length on the host."""
    query = _rows_contiguous(query)
    num_kv_heads, head_dim = kv_cache.num_kv_heads, kv_cache.head_dim
    group = query.shape[1] // num_kv_heads
    keys, values = kv_cache.data[0], kv_cache.data[1]
    window = kv_cache.sliding_window
    _paged_decode_kernel[(rows.shape[0], num_kv_heads)](
        out,
        query,
        keys,
        values,
        block_tables,
        seq_lens,
        rows,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        block_tables.stride(0),
        scale * LOG2E,
        window or 0,
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),  # tl.dot takes 16 rows at least
        HEAD_DIM=head_dim,
        BLOCK_D=_block_d(head_dim),
        BLOCK_SIZE=kv_cache.block_size,
        BLOCK_N=block_n,
        SLIDING=window is not None,
        DOT_F32=_dot_in_f32(query.dtype),
        num_warps=4,
    )


def varlen_prefill(
    query: torch.Tensor,
    kv_cache: KVCache,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor,
    skip_decodes: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
) -> None:
    """Causal attention of every sequence's new tokens (query_start_loc[i]:[i+1] of the
    flat `query`) over its seq_lens[i] positions in the cache, into the same rows of `out`.
    `max_query_len` (a host int) sizes the grid; with `skip_decodes`, single-token
    sequences are left to `paged_decode`."""
    query = _rows_contiguous(query)
    num_kv_heads, head_dim = kv_cache.num_kv_heads, kv_cache.head_dim
    num_heads = query.shape[1]
    block_d = _block_d(head_dim)
    # tiles small enough for the registers at head_dim 256 (to tune on the GPU)
    block_m = block_m or (64 if block_d <= 128 else 32)
    block_n = block_n or (64 if block_d <= 64 else 32)
    keys, values = kv_cache.data[0], kv_cache.data[1]
    window = kv_cache.sliding_window
    grid = (seq_lens.shape[0], triton.cdiv(max_query_len, block_m), num_heads)
    _paged_prefill_kernel[grid](
        out,
        query,
        keys,
        values,
        block_tables,
        seq_lens,
        query_start_loc,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        block_tables.stride(0),
        scale * LOG2E,
        window or 0,
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_SIZE=kv_cache.block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        SLIDING=window is not None,
        SKIP_DECODES=skip_decodes,
        DOT_F32=_dot_in_f32(query.dtype),
        num_warps=4 if block_d <= 128 else 8,
    )


def _block_d(head_dim: int) -> int:
    """A head's row as a power-of-two tile of at least 16 (tl.dot's smallest side)."""
    return max(16, triton.next_power_of_2(head_dim))


def _dot_in_f32(dtype: torch.dtype) -> bool:
    """Products in exact float32 (no TF32) for float32 queries, so float32 output matches
    the torch backend; 16-bit queries use the tensor cores' bf16/f16 products."""
    return dtype == torch.float32 or (INTERPRETED and dtype == torch.bfloat16)


def _rows_contiguous(query: torch.Tensor) -> torch.Tensor:
    """The kernels step over tokens and heads by stride but read a head's row as one run."""
    return query if query.stride(-1) == 1 else query.contiguous()
