"""A KV block as bytes: every layer's keys and values (and int8 scales) for its slots,
in the cache's own dtype, gathered out of the pool and scattered back into any block."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from pagedllm.attention.kv_cache import Int8KVCache, KVCache, _raw

FORMAT_VERSION = 1


def _block_parts(caches: Sequence[KVCache]) -> list[torch.Tensor]:
    """Every tensor that holds a block, each [2, num_blocks, ...], as raw storage: the
    pools (a layer group's caches share one) and their scales."""
    parts: list[torch.Tensor] = []
    seen: set[int] = set()
    for cache in caches:
        if id(cache.data) in seen:
            continue
        seen.add(id(cache.data))
        parts.append(_raw(cache.data))
        if isinstance(cache, Int8KVCache):
            parts.append(cache.scales)
    return parts


class KVBlocks:
    """Copies whole blocks between the KV pools and [n, block_bytes] uint8 host rows."""

    def __init__(self, caches: Sequence[KVCache]) -> None:
        self.parts = _block_parts(caches)
        self.part_bytes = [p[:, 0].numel() * p.element_size() for p in self.parts]
        self.block_bytes = sum(self.part_bytes)
        self.device = self.parts[0].device

    def gather(self, block_ids: Sequence[int]) -> torch.Tensor:
        """The blocks as one [n, block_bytes] uint8 host tensor (a copy)."""
        ids = torch.tensor(block_ids, device=self.device)
        n = ids.numel()
        pieces = [
            p.index_select(1, ids).transpose(0, 1).contiguous().view(torch.uint8).view(n, -1)
            for p in self.parts
        ]
        return torch.cat(pieces, dim=1).cpu()

    def scatter(self, block_ids: Sequence[int], rows: torch.Tensor) -> None:
        """Write [n, block_bytes] uint8 rows into the blocks, in every part."""
        ids = torch.tensor(block_ids, device=self.device)
        rows = rows.to(self.device)
        offset = 0
        for part, size in zip(self.parts, self.part_bytes, strict=True):
            chunk = rows[:, offset : offset + size].contiguous().view(part.dtype)
            shape = (ids.numel(), part.shape[0], *part.shape[2:])
            part[:, ids] = chunk.view(shape).transpose(0, 1)
            offset += size


def fingerprint(model_path: str | Path, caches: Sequence[KVCache], *identity: object) -> bytes:
    """What makes two blocks with the same hash interchangeable: the model's files (name
    and size), the cache's layout and dtype, and `identity` (dtypes, kernels)."""
    path = Path(model_path)
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    model = [(f.name, f.stat().st_size) for f in files if f.is_file()]
    layout = [(str(p.dtype), tuple(p.shape[2:]), p.shape[1]) for p in _block_parts(caches)]
    text = repr((FORMAT_VERSION, model, layout, identity))
    return hashlib.sha256(text.encode()).digest()
