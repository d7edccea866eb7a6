"""Prometheus metrics from engine outputs, one registry per server; the periodic stats line."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from pagedllm.metrics import PrometheusMetrics, StatsLine
from pagedllm.outputs import CompletionOutput, RequestMetrics, RequestOutput


def _output(metrics: RequestMetrics, num_tokens: int, finish_reason: str | None) -> RequestOutput:
    metrics.num_generation_tokens = num_tokens
    c = CompletionOutput(0, "x" * num_tokens, [1] * num_tokens, None, None, finish_reason)
    return RequestOutput("r", None, [1], [c], finish_reason is not None, metrics)


def _sample(registry: CollectorRegistry, name: str) -> float:
    value = registry.get_sample_value(name, {"model_name": "m"})
    assert value is not None, name
    return value


def test_latencies_are_observed_from_request_timings():
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry, "m")
    m = RequestMetrics(arrival_time=10.0, first_token_time=10.5, last_token_time=10.5)
    metrics.record([_output(m, 1, None)], {}, 10.5)
    m.last_token_time = 10.7
    metrics.record([_output(m, 2, None)], {}, 10.7)
    m.last_token_time, m.finished_time = 11.1, 11.2
    metrics.record([_output(m, 3, "stop")], {"num_requests_running": 0}, 11.2)

    assert _sample(registry, "pagedllm:time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert _sample(registry, "pagedllm:inter_token_latency_seconds_count") == 2
    assert _sample(registry, "pagedllm:inter_token_latency_seconds_sum") == pytest.approx(0.6)
    assert _sample(registry, "pagedllm:time_per_output_token_seconds_sum") == pytest.approx(0.3)
    assert _sample(registry, "pagedllm:e2e_request_latency_seconds_sum") == pytest.approx(1.2)
    success = registry.get_sample_value(
        "pagedllm:request_success_total", {"model_name": "m", "finished_reason": "stop"}
    )
    assert success == 1


def test_engine_counters_are_exported_with_prefix_and_total():
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry, "m")
    stats = {
        "num_requests_running": 2,
        "num_requests_waiting": 1,
        "kv_cache_usage_perc": 0.25,
        "num_preemptions_total": 3,
        "prompt_tokens_total": 100,
        "generation_tokens_total": 40,
        "prefix_cache_queries": 64,
        "prefix_cache_hits": 16,
    }
    metrics.record([], stats, 0.0)
    assert _sample(registry, "pagedllm:num_requests_running") == 2
    assert _sample(registry, "pagedllm:num_requests_waiting") == 1
    assert _sample(registry, "pagedllm:kv_cache_usage_perc") == 0.25
    assert _sample(registry, "pagedllm:num_preemptions_total") == 3
    assert _sample(registry, "pagedllm:prompt_tokens_total") == 100
    assert _sample(registry, "pagedllm:generation_tokens_total") == 40
    assert _sample(registry, "pagedllm:prefix_cache_queries_total") == 64
    assert _sample(registry, "pagedllm:prefix_cache_hits_total") == 16
    assert b"# TYPE pagedllm:prompt_tokens_total counter" in generate_latest(registry)


def test_two_servers_in_one_process_do_not_collide():
    a, b = CollectorRegistry(), CollectorRegistry()
    PrometheusMetrics(a, "m").record([], {"num_requests_running": 1}, 0.0)
    PrometheusMetrics(b, "m").record([], {"num_requests_running": 5}, 0.0)
    assert _sample(a, "pagedllm:num_requests_running") == 1
    assert _sample(b, "pagedllm:num_requests_running") == 5


def test_stats_line_reports_throughput_queues_kv_and_hit_rate():
    last = {"prompt_tokens_total": 0, "generation_tokens_total": 0}
    now = {
        "prompt_tokens_total": 200,
        "generation_tokens_total": 50,
        "num_requests_running": 3,
        "num_requests_waiting": 2,
        "kv_cache_usage_perc": 0.125,
        "prefix_cache_queries": 100,
        "prefix_cache_hits": 25,
    }
    line = StatsLine.format(now, last, elapsed=10.0)
    assert line == (
        "Avg prompt throughput: 20.0 tokens/s, Avg generation throughput: 5.0 tokens/s, "
        "Running: 3 reqs, Waiting: 2 reqs, KV cache usage: 12.5%, Prefix cache hit rate: 25.0%"
    )
    assert StatsLine.format(last, last, elapsed=10.0) is None  # idle: silent


def test_stats_line_logs_every_interval_while_busy(caplog):
    stats_line = StatsLine(interval=5.0, log=logging.getLogger("test.stats"))
    busy = {"num_requests_running": 1, "generation_tokens_total": 0}
    with caplog.at_level(logging.INFO, logger="test.stats"):
        for t in range(0, 21):
            busy = {**busy, "generation_tokens_total": t * 10}
            stats_line.record([], busy, float(t))
        idle = {"generation_tokens_total": 200}
        for t in range(21, 40):
            stats_line.record([], idle, float(t))
    assert len(caplog.records) == 4  # t = 5, 10, 15, 20; silent once idle
    assert "Avg generation throughput: 10.0 tokens/s" in caplog.records[0].getMessage()


def test_offload_counters_are_exported_only_with_an_offload_tier():
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry, "m")
    metrics.record([], {"num_requests_running": 0}, 0.0)
    assert b"kv_offload" not in generate_latest(registry)
    metrics.record([], {"kv_offload_blocks_loaded_disk": 12, "kv_offload_load_seconds": 0.5}, 0.0)
    assert _sample(registry, "pagedllm:kv_offload_blocks_loaded_disk_total") == 12
    assert _sample(registry, "pagedllm:kv_offload_load_seconds_total") == 0.5


def test_stats_line_reports_offloaded_blocks_moved():
    last = {"kv_offload_blocks_loaded_host": 1}
    now = {
        "num_requests_running": 1,
        "kv_offload_blocks_loaded_host": 4,
        "kv_offload_blocks_loaded_disk": 2,
        "kv_offload_blocks_saved": 7,
    }
    line = StatsLine.format(now, last, elapsed=1.0)
    assert line is not None
    assert line.endswith("KV offload: 5 blocks loaded (3 host, 2 disk), 7 saved")
