"""Prometheus metrics and the periodic stats line, fed by the engine thread.

Both are `StatLogger`s of `pagedllm.engine.async_llm.AsyncLLM`: after every step
they get the outputs that changed and the engine's counters (`LLMEngine.get_metrics`).
Names mirror vLLM's with the prefix `pagedllm:`; each server registers them in its
own `CollectorRegistry`, so several servers can live in one process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pagedllm.outputs import RequestOutput
from pagedllm.spec_decode.stats import ACCEPTED_PER_POSITION

logger = logging.getLogger("pagedllm.stats")

PREFIX = "pagedllm:"

# vLLM's buckets, so dashboards built for it read these the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0)
TTFT_BUCKETS += (2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75)
TOKEN_LATENCY_BUCKETS += (1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0)
E2E_BUCKETS += (60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

# get_metrics() key → (exported name without prefix and _total, kind, help)
_ENGINE_METRICS = {
    "num_requests_running": ("num_requests_running", "gauge", "Requests in the running batch."),
    "num_requests_waiting": ("num_requests_waiting", "gauge", "Requests waiting to be scheduled."),
    "kv_cache_usage_perc": (
        "kv_cache_usage_perc",
        "gauge",
        "KV-cache usage as a fraction of its blocks (1 = full).",
    ),
    "num_preemptions_total": ("num_preemptions", "counter", "Requests preempted, cumulative."),
    "prompt_tokens_total": ("prompt_tokens", "counter", "Prompt tokens computed, cumulative."),
    "generation_tokens_total": ("generation_tokens", "counter", "Tokens generated, cumulative."),
    "prefix_cache_queries": (
        "prefix_cache_queries",
        "counter",
        "Prompt tokens looked up in the prefix cache, cumulative.",
    ),
    "prefix_cache_hits": (
        "prefix_cache_hits",
        "counter",
        "Prompt tokens found in the prefix cache, cumulative.",
    ),
    "spec_decode_num_drafts": (
        "spec_decode_num_drafts",
        "counter",
        "Speculative steps verified (one per request with drafts), cumulative.",
    ),
    "spec_decode_num_draft_tokens": (
        "spec_decode_num_draft_tokens",
        "counter",
        "Draft tokens verified, cumulative.",
    ),
    "spec_decode_num_accepted_tokens": (
        "spec_decode_num_accepted_tokens",
        "counter",
        "Draft tokens accepted, cumulative.",
    ),
}

# the KV connector's counters (LLMEngine.get_metrics has them only with a connector):
# kv_offload_* for --kv-offload (tiers host, disk), kv_transfer_* for disaggregation
_CONNECTOR_COUNTERS = {
    "blocks_saved": "KV blocks copied out of the pool to keep.",
    "bytes_saved": "Bytes of KV copied out of the pool to keep.",
    "blocks_looked_up": "KV blocks past a local prefix hit looked up.",
    "bytes_loaded": "Bytes of KV loaded into the pool.",
    "load_failures": "Loads that stopped short (block gone, corrupt, unreachable): recomputed.",
    "loads": "Requests whose prompt KV was loaded.",
    "load_seconds": "Seconds spent loading KV (sum over loads).",
}
_CONNECTOR_METRICS = {
    f"{prefix}_{name}": text
    for prefix in ("kv_offload", "kv_transfer")
    for name, text in _CONNECTOR_COUNTERS.items()
}
for _prefix, _tier in (("kv_offload", "host"), ("kv_offload", "disk"), ("kv_transfer", "remote")):
    _CONNECTOR_METRICS[f"{_prefix}_{_tier}_hits"] = f"Looked-up KV blocks found ({_tier})."
    _CONNECTOR_METRICS[f"{_prefix}_blocks_loaded_{_tier}"] = f"KV blocks loaded ({_tier})."
_ENGINE_METRICS |= {key: (key, "counter", text) for key, text in _CONNECTOR_METRICS.items()}


class _EngineCollector(Collector):
    """Exports the latest engine counters and gauges at scrape time."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats: dict[str, float] = {}

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        for key, (name, kind, help_text) in _ENGINE_METRICS.items():
            if key in _CONNECTOR_METRICS and key not in stats:
                continue
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            metric = family(PREFIX + name, help_text, labels=["model_name"])
            metric.add_metric([self.model_name], float(stats.get(key, 0)))
            yield metric
        per_position = CounterMetricFamily(
            PREFIX + "spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted at each draft position (0 = first), cumulative.",
            labels=["model_name", "position"],
        )
        for key, value in stats.items():
            if key.startswith(ACCEPTED_PER_POSITION):
                position = key.removeprefix(ACCEPTED_PER_POSITION)
                per_position.add_metric([self.model_name, position], float(value))
        yield per_position


class PrometheusMetrics:
    """The `pagedllm:` metrics of one server: engine counters plus latency histograms."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        self.registry = registry
        self._engine = _EngineCollector(model_name)
        registry.register(self._engine)
        labels = {"model_name": model_name}

        def histogram(name: str, help_text: str, buckets: Sequence[float]) -> Histogram:
            h = Histogram(
                PREFIX + name, help_text, ["model_name"], registry=registry, buckets=buckets
            )
            return h.labels(**labels)

        self.ttft = histogram(
            "time_to_first_token_seconds", "Time to first token (seconds).", TTFT_BUCKETS
        )
        self.itl = histogram(
            "inter_token_latency_seconds",
            "Time between a request's consecutive token outputs (seconds).",
            TOKEN_LATENCY_BUCKETS,
        )
        self.tpot = histogram(
            "time_per_output_token_seconds",
            "Mean time per output token after the first, per finished request (seconds).",
            TOKEN_LATENCY_BUCKETS,
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "End-to-end request latency (seconds).", E2E_BUCKETS
        )
        self._success = Counter(
            PREFIX + "request_success",
            "Finished requests, by finish reason.",
            ["model_name", "finished_reason"],
            registry=registry,
        )
        self._model_name = model_name
        self._last_token: dict[str, tuple[float, int]] = {}  # request id → (time, tokens)

    def record(self, outputs: Sequence[RequestOutput], stats: dict[str, float], now: float) -> None:
        self._engine.stats = stats
        for out in outputs:
            m = out.metrics
            rid = out.request_id
            previous = self._last_token.get(rid)
            if m.first_token_time is not None and m.last_token_time is not None:
                if previous is None:
                    self.ttft.observe(m.first_token_time - m.arrival_time)
                elif m.num_generation_tokens > previous[1]:
                    self.itl.observe(m.last_token_time - previous[0])
                self._last_token[rid] = (m.last_token_time, m.num_generation_tokens)
            if out.finished:
                self._last_token.pop(rid, None)
                if m.finished_time is not None:
                    self.e2e.observe(m.finished_time - m.arrival_time)
                if m.mean_time_per_output_token is not None:
                    self.tpot.observe(m.mean_time_per_output_token)
                for c in out.outputs:
                    reason = c.finish_reason or "abort"
                    self._success.labels(self._model_name, reason).inc()


class StatsLine:
    """Logs throughput, queue sizes, KV usage and prefix-cache hit rate every `interval` s.

    Silent while nothing happens: a line is written only if tokens were computed or
    requests were alive since the last one.
    """

    def __init__(self, interval: float, log: logging.Logger = logger) -> None:
        self.interval = interval
        self.log = log
        self._last_time: float | None = None
        self._last: dict[str, float] = {}

    def record(self, outputs: Sequence[RequestOutput], stats: dict[str, float], now: float) -> None:
        if self._last_time is None:
            self._last_time, self._last = now, dict(stats)
            return
        elapsed = now - self._last_time
        if elapsed < self.interval:
            return
        line = self.format(stats, self._last, elapsed)
        if line is not None:
            self.log.info(line)
        self._last_time, self._last = now, dict(stats)

    @staticmethod
    def format(stats: dict[str, float], last: dict[str, float], elapsed: float) -> str | None:
        """The line for the interval between `last` and `stats`; None when it was idle."""

        def grew(key: str) -> float:
            return stats.get(key, 0) - last.get(key, 0)

        prompt, generated = grew("prompt_tokens_total"), grew("generation_tokens_total")
        running, waiting = (
            stats.get("num_requests_running", 0),
            stats.get("num_requests_waiting", 0),
        )
        if not (prompt or generated or running or waiting):
            return None
        queries = grew("prefix_cache_queries")
        hit_rate = grew("prefix_cache_hits") / queries if queries else 0.0
        line = (
            f"Avg prompt throughput: {prompt / elapsed:.1f} tokens/s, "
            f"Avg generation throughput: {generated / elapsed:.1f} tokens/s, "
            f"Running: {running:.0f} reqs, Waiting: {waiting:.0f} reqs, "
            f"KV cache usage: {100 * stats.get('kv_cache_usage_perc', 0):.1f}%, "
            f"Prefix cache hit rate: {100 * hit_rate:.1f}%"
        )
        drafted = grew("spec_decode_num_draft_tokens")
        if drafted:
            accepted = grew("spec_decode_num_accepted_tokens")
            line += f", Draft acceptance rate: {100 * accepted / drafted:.1f}%"
        host, disk = grew("kv_offload_blocks_loaded_host"), grew("kv_offload_blocks_loaded_disk")
        saved = grew("kv_offload_blocks_saved")
        if host or disk or saved:
            line += (
                f", KV offload: {host + disk:.0f} blocks loaded ({host:.0f} host, "
                f"{disk:.0f} disk), {saved:.0f} saved"
            )
        remote, served = grew("kv_transfer_blocks_loaded_remote"), grew("kv_transfer_blocks_saved")
        if remote or served:
            line += f", KV transfer: {remote:.0f} blocks pulled, {served:.0f} kept to serve"
        return line
