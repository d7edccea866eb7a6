"""The bounded load test: 64 concurrent clients against `pagedllm serve` (debug invariants on).

The long form (200 clients) is `benchmarks/load_test.py` with its defaults.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from benchmarks.load_test import ServeProcess, run_load

pytestmark = pytest.mark.slow


def test_bounded_load_leaves_the_server_idle_unchanged_and_correct():
    serve = ("--dtype", "float32", "--num-kv-blocks", "48", "--max-model-len", "512")
    with ServeProcess(*serve) as server:
        report = asyncio.run(
            run_load(server, clients=64, requests=128, duration=120, max_tokens=12, timeout=120)
        )
        status = server.stop()
    print(report.summary())
    assert not report.problems, report.summary()
    kinds = Counter(o.kind for o in report.outcomes)
    assert kinds["ok"] and kinds["cut"] and kinds["left"] and kinds["refused"], kinds
    assert len(report.leavers) == 2  # both probes left before the first byte
    assert len(report.outcomes) == 128
    assert report.preemptions > 0  # the small pool forced some
    assert status == 0
