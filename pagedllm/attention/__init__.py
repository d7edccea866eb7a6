"""Paged attention: metadata describing a flat batch, and the backends that compute it."""

from collections.abc import Callable

import torch

from pagedllm.attention.kv_cache import KVCache, make_kv_cache
from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.attention.torch_backend import paged_attention

AttentionBackend = Callable[..., torch.Tensor]  # paged_attention's signature
_TRITON_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def select_attention(device: torch.device, kv_cache_dtype: torch.dtype) -> AttentionBackend:
    """The backend a model's layers call, chosen once when it is built: the Triton kernels
    on CUDA (float KV caches, where triton imports), else the torch path (which uses the
    C decode kernel on the CPU)."""
    if device.type == "cuda" and kv_cache_dtype in _TRITON_CACHE_DTYPES:
        try:
            from pagedllm.attention import triton_backend
        except ImportError:  # no triton: torch's path still runs
            return paged_attention
        return triton_backend.paged_attention
    return paged_attention


__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "KVCache",
    "make_kv_cache",
    "paged_attention",
    "select_attention",
]
