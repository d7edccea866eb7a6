"""Paged attention: metadata describing a flat batch, and the backends that compute it."""

from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.attention.torch_backend import paged_attention, write_kv

__all__ = ["AttentionMetadata", "paged_attention", "write_kv"]
