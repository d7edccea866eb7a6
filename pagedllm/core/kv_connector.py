"""The scheduler's side of a KV connector: KV blocks that live outside the device pool.

A connector keeps blocks by the prefix cache's chained block hashes (a host-memory or
disk tier, another engine). Before admitting a request the scheduler asks it how many
of the prompt's blocks past the local prefix hit it can supply; the request then holds
freshly allocated blocks in ``WAITING_FOR_REMOTE_KV`` while the worker loads them
(``SchedulerOutput.kv_loads``), and runs with those tokens computed once the load is
reported (``Scheduler.finish_kv_loads``). A load that fails, whole or in part, leaves
the missing tokens to be recomputed. Every block entering the prefix cache (its step
has run) and every cached block handed out for new content is offered to the
connector (``SchedulerOutput.kv_saves``): the worker copies the ones it wants out
before the next step runs, so before anything overwrites them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pagedllm.core.block_pool import BlockHash


@dataclass(slots=True)
class KVLoad:
    """Blocks to fill for one request: ``block_ids[i]`` gets the KV of ``block_hashes[i]``."""

    request_id: str
    block_hashes: list[BlockHash]
    block_ids: list[int]
    transfer_params: Mapping[str, Any] | None = None  # the request's kv_transfer_params


class KVConnectorScheduler(Protocol):
    """What the scheduler asks a connector; the worker side moves the bytes."""

    def num_loadable_blocks(
        self, block_hashes: Sequence[BlockHash], transfer_params: Mapping[str, Any] | None
    ) -> int:
        """How many of these consecutive blocks, from the first, it can supply now
        (``transfer_params``: the request's, saying where a remote copy is)."""
        ...

    def wants_block(self, block_hash: BlockHash, evicted: bool) -> bool:
        """Whether to save a block just computed (``evicted`` False) or leaving the pool."""
        ...
