"""Paged attention: metadata describing a flat batch, and the backends that compute it."""

from pagedllm.attention.kv_cache import KVCache, make_kv_cache
from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.attention.torch_backend import paged_attention

__all__ = ["AttentionMetadata", "KVCache", "make_kv_cache", "paged_attention"]
