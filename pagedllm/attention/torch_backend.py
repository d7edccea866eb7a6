"""Paged attention in plain PyTorch: runs on any device torch supports.

The KV cache of a layer is a `KVCache` (kv_cache.py): it writes a flat batch's keys and
values at their slots in its storage format and reads blocks back as float. When it
stores another dtype than the model computes in (bf16, int8, fp8), the step's own new
keys and values are read back from it too, so every query sees what later steps and
prefix-cache hits will see.

Reading, by kind of sequence:
- decodes (one new token each) are computed together: their block tables index the
  cache in one gather into [B, max_blocks * block_size, H, D], padded positions masked,
  and one SDPA call serves the whole group, each KV head's query heads as its queries;
- prefills (and prefill chunks) run one SDPA per sequence: the prompt work dominates,
  and a sequence with no cached context uses its fresh keys/values directly with the
  fused causal kernel, skipping the gather.
Measured on the 2-core CPU (SmolLM2-135M, fp32): the batched decode gather costs well under
the layer's matmuls at 64 sequences of a few hundred tokens; see BENCHMARKS.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllm.attention import cpu_decode
from pagedllm.attention.kv_cache import KVCache
from pagedllm.attention.metadata import AttentionMetadata


def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: KVCache,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention for a flat batch. query [T, Hq, D], key/value [T, Hkv, D] → [T, Hq, D].

    The new keys and values are written to the cache first, then every query attends
    to its own sequence's keys up to and including its own position (in a sliding-window
    layer, `kv_cache.sliding_window` positions at most).
    """
    kv_cache.write(key, value, meta.slot_mapping)
    if kv_cache.dtype != key.dtype:  # attend to what the cache holds
        key = kv_cache.read_slots(0, meta.slot_mapping, query.dtype)
        value = kv_cache.read_slots(1, meta.slot_mapping, query.dtype)
    if meta.decode_only:
        return _decode(query, kv_cache, meta, scale)
    out = torch.empty_like(query)
    if meta.decode_seq_idx.numel():
        out[meta.decode_token_idx] = _decode(query, kv_cache, meta, scale)
    starts = meta.query_start_loc_list
    window = kv_cache.sliding_window
    for i in meta.prefill_seq_idx:
        start, end = starts[i], starts[i + 1]
        seq_len = meta.seq_lens_list[i]
        q = query[start:end].transpose(0, 1).unsqueeze(0)  # [1, Hq, Lq, D]
        context = seq_len - (end - start)
        mask, causal = None, False
        if context == 0:
            k, v = key[start:end], value[start:end]
            causal = window is None or seq_len <= window
        else:
            num_blocks = -(-seq_len // meta.block_size)
            table = meta.block_tables[i, :num_blocks]
            k = kv_cache.read(0, table, q.dtype)[:seq_len]
            v = kv_cache.read(1, table, q.dtype)[:seq_len]
        if not causal:
            # query j sits at position context + j and sees keys 0..context + j (the
            # last `window` of them in a sliding-window layer)
            q_pos = torch.arange(context, seq_len, device=query.device)[:, None]
            k_pos = torch.arange(seq_len, device=query.device)[None, :]
            mask = k_pos <= q_pos
            if window is not None:
                mask &= k_pos > q_pos - window
        o = F.scaled_dot_product_attention(
            q,
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
            enable_gqa=True,
        )
        out[start:end] = o.squeeze(0).transpose(0, 1)
    return out


def _decode(
    query: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """All single-token queries at once: in place on the CPU (C kernel), else over their
    padded, gathered block tables."""
    seq_lens = meta.decode_seq_lens
    decode_query = query if meta.decode_only else query[meta.decode_token_idx]
    if cpu_decode.supports(query, kv_cache):
        return cpu_decode.paged_decode(
            decode_query, kv_cache, meta.decode_block_tables, seq_lens, scale
        )
    max_len = meta.decode_max_seq_len
    num_blocks = -(-max_len // meta.block_size)
    tables = meta.decode_block_tables[:, :num_blocks]
    k = kv_cache.read(0, tables, query.dtype)  # [Bd, L, Hkv, D]
    v = kv_cache.read(1, tables, query.dtype)
    length = k.shape[1]
    k_pos = torch.arange(length, device=query.device)[None, :]
    mask = k_pos < seq_lens[:, None]
    if kv_cache.sliding_window is not None:
        mask &= k_pos >= seq_lens[:, None] - kv_cache.sliding_window
    # The query heads sharing a KV head (h * G … h * G + G - 1) act as G queries of one
    # head: no grouped-query expansion of the gathered keys (7% faster measured).
    num_seqs, _, num_kv_heads, head_dim = k.shape
    q = decode_query.reshape(num_seqs, num_kv_heads, -1, head_dim)
    o = F.scaled_dot_product_attention(
        q,
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        scale=scale,
    )
    return o.reshape(num_seqs, -1, head_dim)
