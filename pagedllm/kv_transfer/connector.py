"""What every connector's worker side shares: saves copied out of the pool at once,
loads run on a loader thread and reported by ``poll``, and the counters."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import torch

from pagedllm.attention.kv_cache import KVCache
from pagedllm.core.kv_connector import KVLoad
from pagedllm.kv_transfer.blocks import KVBlocks

logger = logging.getLogger(__name__)

LOADER_THREADS = 4  # transfers at once: one slow peer must not hold up the others
IDLE_WAIT_S = 0.05  # how long an idle engine waits for a load before it looks for work


@dataclass
class TransferStats:
    """Counters since start, exported as `pagedllm:<prefix>_*` (tiers: host, disk, remote)."""

    blocks_saved: int = 0
    bytes_saved: int = 0
    blocks_looked_up: int = 0  # blocks past a local prefix hit asked for
    hits: Counter[str] = field(default_factory=Counter)  # of those, found, per tier
    blocks_loaded: Counter[str] = field(default_factory=Counter)  # per tier
    bytes_loaded: int = 0
    load_failures: int = 0  # loads that stopped short (block gone, corrupt, unreachable)
    loads: int = 0
    load_seconds: float = 0.0

    def as_metrics(self, prefix: str, tiers: Sequence[str]) -> dict[str, float]:
        metrics = {
            f"{prefix}_{name}": float(getattr(self, name))
            for name in (
                "blocks_saved",
                "bytes_saved",
                "blocks_looked_up",
                "bytes_loaded",
                "load_failures",
                "loads",
                "load_seconds",
            )
        }
        for tier in tiers:
            metrics[f"{prefix}_{tier}_hits"] = float(self.hits[tier])
            metrics[f"{prefix}_blocks_loaded_{tier}"] = float(self.blocks_loaded[tier])
        return metrics


class ThreadedConnector:
    """The engine calls ``start`` with each step's saves and loads before the step runs
    and ``poll`` after it. Subclasses answer the scheduler (``num_loadable_blocks``,
    ``wants_block``), say what to do with a block copied out (``keep``) and where loaded
    blocks come from (``read``); their counters are exported as ``metrics_prefix``_*
    with one hit and load count per tier in ``tiers``."""

    metrics_prefix = ""
    tiers: tuple[str, ...] = ()

    def __init__(self, caches: Sequence[KVCache], fingerprint: bytes) -> None:
        """`fingerprint`: what a block from elsewhere must match (blocks.fingerprint)."""
        self.fingerprint = fingerprint
        self.blocks = KVBlocks(caches)
        self.block_bytes = self.blocks.block_bytes
        self.stats = TransferStats()
        self._loader = ThreadPoolExecutor(LOADER_THREADS, thread_name_prefix="pagedllm-kv-load")
        self._loads: dict[str, Future[int]] = {}

    def start(self, saves: list[tuple[bytes, int, bool]], loads: list[KVLoad]) -> None:
        """Copy out the blocks to save, then begin this step's loads (in that order: a
        load may fill a block whose old content is being saved). A save that fails only
        loses its copies; the loads start whatever happens."""
        try:
            if saves:
                rows = self.blocks.gather([block_id for _, block_id, _ in saves])
                for (key, _, evicted), row in zip(saves, rows, strict=True):
                    self.keep(key, row, evicted)
                self.stats.blocks_saved += len(saves)
                self.stats.bytes_saved += len(saves) * self.block_bytes
        except Exception:
            logger.exception("KV connector: saving %d blocks failed", len(saves))
        for load in loads:
            self._loads[load.request_id] = self._loader.submit(self._load, load)

    def poll(self, wait_for_one: bool = False) -> dict[str, int]:
        """Loads that ended since the last call: request id -> leading blocks loaded.
        `wait_for_one`: wait a moment for one to end (the engine has nothing else to run;
        it comes back to take new requests and aborts)."""
        if not self._loads:
            return {}
        if wait_for_one and not any(f.done() for f in self._loads.values()):
            wait(self._loads.values(), timeout=IDLE_WAIT_S, return_when=FIRST_COMPLETED)
        done = {rid: f for rid, f in self._loads.items() if f.done()}
        for rid in done:
            del self._loads[rid]
        return {rid: self._result(f) for rid, f in done.items()}

    def _result(self, future: Future[int]) -> int:
        try:
            return future.result()
        except Exception:  # a failed transfer is a miss: the tokens are recomputed
            self.stats.load_failures += 1
            return 0

    def num_loadable_blocks(
        self, block_hashes: Sequence[bytes], transfer_params: Mapping[str, Any] | None
    ) -> int:
        """How many of these consecutive blocks, from the first, the connector can supply."""
        raise NotImplementedError

    def wants_block(self, block_hash: bytes, evicted: bool) -> bool:
        """Whether to save a block just computed (``evicted`` False) or leaving the pool."""
        raise NotImplementedError

    def keep(self, block_hash: bytes, row: torch.Tensor, evicted: bool) -> None:
        """Store one block it wanted, copied out as a [block_bytes] uint8 row (a view of
        the step's batch: clone it to keep it alone)."""
        raise NotImplementedError

    def read(self, load: KVLoad) -> torch.Tensor:
        """The load's leading blocks that can be had, as [n, block_bytes] uint8 rows."""
        raise NotImplementedError

    def no_rows(self) -> torch.Tensor:
        """What ``read`` returns when no block can be had."""
        return torch.empty(0, self.block_bytes, dtype=torch.uint8)

    def metrics(self) -> dict[str, float]:
        """The counters under their exported names."""
        return self.stats.as_metrics(self.metrics_prefix, self.tiers)

    def _load(self, load: KVLoad) -> int:
        """Read the load's blocks, write those found into the pool; how many it wrote."""
        start = time.perf_counter()
        rows = self.read(load)
        stats = self.stats
        if len(rows) < len(load.block_hashes):
            stats.load_failures += 1
        if len(rows):
            self.blocks.scatter(load.block_ids[: len(rows)], rows)
            stats.bytes_loaded += len(rows) * self.block_bytes
        stats.loads += 1
        stats.load_seconds += time.perf_counter() - start
        return len(rows)

    def close(self) -> None:
        """Finish pending loads (subclasses: and writes)."""
        self._loader.shutdown(wait=True)
