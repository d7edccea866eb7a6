"""The engine's per-step counters, fed from a scheduler without a model."""

import pytest

from pagedllm.config import CacheConfig, SchedulerConfig
from pagedllm.core.scheduler import Scheduler
from pagedllm.engine.step_stats import StepStats
from tests.core.utils import make_request


def test_observe_schedule_tracks_peak_running_and_kv_slots():
    scheduler = Scheduler(SchedulerConfig(max_model_len=64), CacheConfig(block_size=4), 32)
    stats = StepStats()
    assert stats.kv_utilization == 1.0  # nothing allocated yet
    for i, n in enumerate((6, 8)):
        scheduler.add_request(make_request(str(i), n, max_tokens=4))
    out = scheduler.schedule()
    stats.observe_schedule(scheduler)
    assert stats.peak_running == 2
    # 6 tokens in 2 blocks, 8 in 2 blocks: 14 of 16 slots
    assert (stats.kv_slots_used, stats.kv_slots_allocated) == (14, 16)
    scheduler.update_from_output(out, {"0": [7], "1": [9]})
    scheduler.schedule()
    stats.observe_schedule(scheduler)
    # each decodes one token: 7 in 2 blocks, 9 in 3 blocks
    assert (stats.kv_slots_used, stats.kv_slots_allocated) == (14 + 16, 16 + 20)
    assert stats.peak_kv_blocks == 5
    assert stats.kv_utilization == pytest.approx(30 / 36)


def test_add_step_splits_the_step_time():
    stats = StepStats()
    stats.add_step(10.0, 10.25, 11.0, 11.5)
    stats.add_step(20.0, 20.0, 20.5, 21.0)
    assert stats.num_steps == 2
    assert stats.step_time == pytest.approx(2.5)
    assert stats.schedule_time == pytest.approx(0.25)
    assert stats.execute_time == pytest.approx(1.25)
