"""Cumulative per-step counters: where the engine's steps spend their time, batch sizes
and how full the allocated KV blocks are. Cheap enough to stay on; benchmarks read them."""

from __future__ import annotations

from dataclasses import dataclass

from pagedllm.core.scheduler import Scheduler


@dataclass
class StepStats:
    """Totals over every `LLMEngine.step` since the engine started (or the last reset).

    The model forward's own time is kept by the runner (`ModelRunner.forward_timer`),
    which can time it on the GPU without synchronising.
    """

    num_steps: int = 0
    step_time: float = 0.0  # seconds inside LLMEngine.step
    schedule_time: float = 0.0  # of which Scheduler.schedule (and this bookkeeping)
    execute_time: float = 0.0  # of which ModelRunner.execute: inputs, forward, sampling
    peak_running: int = 0  # most requests running after any schedule()
    peak_kv_blocks: int = 0  # most physical KV blocks in use after any schedule()
    # KV slots holding tokens and slots in allocated blocks, summed over steps,
    # sampled right after scheduling (when the step's slots are allocated)
    kv_slots_used: int = 0
    kv_slots_allocated: int = 0

    def observe_schedule(self, scheduler: Scheduler) -> None:
        running = len(scheduler.running)
        if running > self.peak_running:
            self.peak_running = running
        used, allocated = scheduler.kv_cache_manager.slot_usage()
        blocks = allocated // scheduler.kv_cache_manager.block_size
        if blocks > self.peak_kv_blocks:
            self.peak_kv_blocks = blocks
        self.kv_slots_used += used
        self.kv_slots_allocated += allocated

    def add_step(self, start: float, scheduled: float, executed: float, end: float) -> None:
        """Record one step from its `time.perf_counter()` marks."""
        self.num_steps += 1
        self.step_time += end - start
        self.schedule_time += scheduled - start
        self.execute_time += executed - scheduled

    @property
    def kv_utilization(self) -> float:
        """Slots holding tokens over slots allocated, weighted by slots, over every step."""
        if not self.kv_slots_allocated:
            return 1.0
        return self.kv_slots_used / self.kv_slots_allocated
