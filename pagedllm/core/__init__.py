"""Memory and scheduling bookkeeping of PagedAttention: pure Python, no torch.

``block_pool`` owns the physical blocks, ``kv_cache_manager`` the per-request
block tables over them, ``scheduler`` decides each step's batch.
"""

from pagedllm.core.block_pool import BlockPool, KVCacheBlock
from pagedllm.core.invariants import InvariantError
from pagedllm.core.kv_cache_manager import KVCacheManager, KVCacheStats
from pagedllm.core.sched_output import ScheduledRequest, SchedulerOutput, SchedulerStats
from pagedllm.core.scheduler import QueueFullError, Scheduler

__all__ = [
    "BlockPool",
    "InvariantError",
    "KVCacheBlock",
    "KVCacheManager",
    "KVCacheStats",
    "QueueFullError",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerOutput",
    "SchedulerStats",
]
