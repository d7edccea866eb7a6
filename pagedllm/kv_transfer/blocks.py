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
    """Copies whole blocks between the KV pools and [n, block_bytes] uint8 host rows.

    A row is, part after part, the block's keys then its values, each as stored. Each
    copy moves every byte once (a block's half is contiguous in its pool): on a small
    machine these copies are bound by memory bandwidth, and a gather through
    intermediate tensors took 3-4x as long.
    """

    def __init__(self, caches: Sequence[KVCache]) -> None:
        self.parts = _block_parts(caches)
        # each part as [2, num_blocks, bytes of one block's half], raw bytes
        self._halves = [p.view(p.shape[0], p.shape[1], -1).view(torch.uint8) for p in self.parts]
        self._half_bytes = [h.shape[2] for h in self._halves]
        self.block_bytes = sum(2 * size for size in self._half_bytes)
        self.device = self.parts[0].device

    def _chunks(self):
        """(a part's half [num_blocks, bytes], its column range in a row), in row order."""
        offset = 0
        for halves, size in zip(self._halves, self._half_bytes, strict=True):
            for half in halves:
                yield half, offset, offset + size
                offset += size

    def gather(self, block_ids: Sequence[int]) -> torch.Tensor:
        """The blocks as one [n, block_bytes] uint8 host tensor (a copy)."""
        ids = torch.tensor(block_ids, device=self.device)
        out = torch.empty(len(block_ids), self.block_bytes, dtype=torch.uint8, device=self.device)
        for half, start, end in self._chunks():
            torch.index_select(half, 0, ids, out=out[:, start:end])
        return out.cpu()

    def scatter(self, block_ids: Sequence[int], rows: torch.Tensor) -> None:
        """Write [n, block_bytes] uint8 rows into the blocks, in every part."""
        ids = torch.tensor(block_ids, device=self.device)
        rows = rows.to(self.device)
        for half, start, end in self._chunks():
            half.index_copy_(0, ids, rows[:, start:end])


def _sample_digest(path: Path, num_samples: int = 16, sample_bytes: int = 1 << 16) -> str:
    """A digest of a file's size and of evenly spaced samples of its bytes (a few MB read
    of a multi-GB file): weights changed in place, same size and name, still differ."""
    size = path.stat().st_size
    h = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        for i in range(num_samples):
            f.seek(max(0, size - sample_bytes) * i // max(1, num_samples - 1))
            h.update(f.read(sample_bytes))
    return h.hexdigest()


def fingerprint(model_path: str | Path, caches: Sequence[KVCache], *identity: object) -> bytes:
    """What makes two blocks with the same hash interchangeable: the model's files (names
    and sampled contents), the cache's per-block layout and dtype (not the pool's size,
    which differs between machines), and `identity` (dtypes, kernels)."""
    path = Path(model_path)
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    model = [(f.name, _sample_digest(f)) for f in files if f.is_file()]
    layout = [(str(p.dtype), p.shape[0], tuple(p.shape[2:])) for p in _block_parts(caches)]
    text = repr((FORMAT_VERSION, model, layout, identity))
    return hashlib.sha256(text.encode()).digest()
