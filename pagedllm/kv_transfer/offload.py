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
    tiers = ("host", "disk")

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

    def keep(self, block_hash: bytes, row: torch.Tensor, evicted: bool) -> None:
        if evicted and self.host is not None:
            self.host.put(block_hash, row.clone())  # alone: a view would keep the batch
        if self.disk is not None and block_hash not in self.disk:
            self._writer.submit(self.disk.put, block_hash, row.numpy().tobytes())

    def read(self, load: KVLoad) -> torch.Tensor:
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
        return torch.stack(rows) if rows else self.no_rows()

    def close(self) -> None:
        """Finish the pending loads and disk writes (the disk then holds every block)."""
        super().close()
        self._writer.shutdown(wait=True)
