"""What `bench serve` reports from its requests' timings: throughput, latency percentiles,
goodput against service-level objectives, and the text table.

Latencies are stored in seconds (like `bench latency`'s JSON) and printed in ms. Only
successful requests count toward tokens and latencies; failed ones are counted apart.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pagedllm.benchmarks.metrics import PERCENTILES, format_table, summarize
from pagedllm.benchmarks.serve_client import RequestResult, RunResult

SLO_KEYS = ("ttft", "tpot", "e2e")


def parse_slo(text: str) -> dict[str, float]:
    """`ttft=MS,tpot=MS[,e2e=MS]` → {"ttft": seconds, ...}; any non-empty subset of keys."""
    slo: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        key = key.strip().lower()
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"--slo: expected KEY=MS with KEY one of {SLO_KEYS}, got {part!r}")
        if key in slo:
            raise ValueError(f"--slo: {key} given twice")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--slo: {key} must be a number of ms, got {value!r}") from None
        if not ms > 0:
            raise ValueError(f"--slo: {key} must be > 0 ms, got {value!r}")
        slo[key] = ms / 1e3
    return slo


def meets_slo(r: RequestResult, slo: dict[str, float]) -> bool:
    """A successful request within every objective; a one-token answer has no TPOT to miss."""
    measured = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2e": r.e2e}
    return r.success and all(measured[k] <= limit for k, limit in slo.items())


def serve_report(run: RunResult, slo: dict[str, float] | None = None) -> dict[str, Any]:
    """The run's numbers: counts, rates, TTFT/TPOT/ITL/E2E summaries and goodput."""
    ok = [r for r in run.results if r.success]
    failed = [r for r in run.results if not r.success]
    duration = max(run.duration_s, 1e-9)
    input_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    report: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(failed),
        "errors": dict(Counter(r.error for r in failed).most_common()),
        "duration_s": run.duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "max_concurrency_reached": run.max_concurrency,
        "ttft_s": summarize([r.ttft for r in ok]),
        "tpot_s": summarize([t for r in ok if (t := r.tpot) is not None]),
        "itl_s": summarize([gap for r in ok for gap in r.itls]),
        "e2e_s": summarize([r.e2e for r in ok]),
    }
    if slo:
        good = sum(meets_slo(r, slo) for r in ok)
        report["slo_s"] = dict(slo)
        report["good_requests"] = good
        report["goodput"] = good / duration
    return report


def request_rows(run: RunResult) -> list[dict[str, Any]]:
    """One record per request, times relative to the run's first send (for the JSON)."""
    t0 = min((r.start for r in run.results), default=0.0)
    return [
        {
            "start_s": r.start - t0,
            "success": r.success,
            "error": r.error or None,
            "prompt_len": r.prompt_len,
            "output_tokens": r.output_tokens,
            "ttft_s": r.ttft if r.success else None,
            "tpot_s": r.tpot if r.success else None,
            "e2e_s": r.e2e,
        }
        for r in run.results
    ]


def format_results(results: dict[str, Any]) -> str:
    """The report as vLLM's `bench serve` prints it, in the other benchmarks' table style."""
    rows = [
        ("Endpoint", results["endpoint"]),
        ("Request rate (req/s)", str(results["request_rate"])),
        ("Successful requests", str(results["completed"])),
        ("Failed requests", str(results["failed"])),
        ("Max concurrency reached", str(results["max_concurrency_reached"])),
        ("Benchmark duration (s)", f"{results['duration_s']:.2f}"),
        ("Total input tokens", str(results["total_input_tokens"])),
        ("Total output tokens", str(results["total_output_tokens"])),
        ("Request throughput (req/s)", f"{results['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{results['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{results['total_token_throughput']:.2f}"),
    ]
    if "goodput" in results:
        rows.append(("Request goodput (req/s)", f"{results['goodput']:.2f}"))
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_s", "E2E")):
        s = results[key]
        rows.append((f"{label} mean (ms)", f"{1e3 * s['mean']:.2f}"))
        rows += [(f"{label} p{p} (ms)", f"{1e3 * s[f'p{p}']:.2f}") for p in PERCENTILES]
    text = format_table("pagedllm bench serve", rows, width=56)
    for error, count in list(results["errors"].items())[:5]:
        text += f"\n{count} failed: {error}"
    return text
