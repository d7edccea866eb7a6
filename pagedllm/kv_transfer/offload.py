"""The offload connector: blocks evicted from the KV pool go to host memory and disk;
a later prefix hit on them loads them back instead of recomputing the tokens.

The host tier takes blocks as they leave the pool (it extends the pool, holding no
block twice); the disk tier takes every block as it is computed, so it outlives the
server, even one that was killed. Blocks are copied out of the pool before the next
step runs (it may overwrite them); a writer thread writes the disk's files, and loads
run on the loader thread, host tier first, while other requests' steps go on.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from pagedllm.attention.kv_cache import KVCache
from pagedllm.config import KVOffloadConfig
from pagedllm.core.kv_connector import KVLoad
from pagedllm.kv_transfer.connector import ThreadedConnector
from pagedllm.kv_transfer.tiers import DiskTier, HostTier

GIB = 1 << 30


class OffloadConnector(ThreadedConnector):
    """Host-memory and disk tiers behind the KV pool."""

    metrics_prefix = "kv_offload"

    def __init__(
        self, config: KVOffloadConfig, caches: Sequence[KVCache], fingerprint: bytes
    ) -> None:
        super().__init__(caches, fingerprint)
        self.host = HostTier(int(config.host_gib * GIB)) if config.host_gib else None
        self.disk = (
            DiskTier(config.disk_path, int(config.disk_gib * GIB), fingerprint)
            if config.disk_path is not None
            else None
        )
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="pagedllm-kv-write")

    # ---------------------------------------------------------- scheduler side

    def num_loadable_blocks(self, block_hashes: Sequence[bytes], transfer_params: object) -> int:
        stats = self.stats
        num = 0
        for key in block_hashes:
            if self.host is not None and key in self.host:
                stats.hits["host"] += 1
            elif self.disk is not None and key in self.disk:
                stats.hits["disk"] += 1
            else:
                break
            num += 1
        stats.blocks_looked_up += len(block_hashes)
        return num

    def wants_block(self, block_hash: bytes, evicted: bool) -> bool:
        if evicted and self.host is not None and block_hash not in self.host:
            return True
        return not evicted and self.disk is not None and block_hash not in self.disk

    # ------------------------------------------------------------- worker side

    def save(self, saves: list[tuple[bytes, int, bool]]) -> None:
        rows = self.blocks.gather([block_id for _, block_id, _ in saves])
        for (key, _, evicted), row in zip(saves, rows, strict=True):
            if evicted and self.host is not None:
                self.host.put(key, row.clone())  # alone: a view would keep the whole batch
            if self.disk is not None and key not in self.disk:
                self._writer.submit(self.disk.put, key, row.numpy().tobytes())
        self.stats.blocks_saved += len(saves)
        self.stats.bytes_saved += len(saves) * self.block_bytes

    def read(self, load: KVLoad) -> list[torch.Tensor]:
        """Each block from the host tier, else the disk (then kept in the host tier),
        stopping at the first one missing or corrupt."""
        rows: list[torch.Tensor] = []
        for key in load.block_hashes:
            row = self.host.get(key) if self.host is not None else None
            if row is not None:
                self.stats.blocks_loaded["host"] += 1
            elif self.disk is not None and (payload := self.disk.get(key)) is not None:
                if len(payload) != self.block_bytes:
                    break
                row = torch.frombuffer(payload, dtype=torch.uint8)
                if self.host is not None:
                    self.host.put(key, row)
                self.stats.blocks_loaded["disk"] += 1
            else:
                break
            rows.append(row)
        return rows

    def metrics(self) -> dict[str, float]:
        return self.stats.as_metrics(self.metrics_prefix, ("host", "disk"))

    def close(self) -> None:
        """Finish the pending loads and disk writes (the disk then holds every block)."""
        super().close()
        self._writer.shutdown(wait=True)
