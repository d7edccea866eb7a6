"""What the benchmarks measure and how they print it: percentiles, the engine's counters
over one run, and aligned text tables."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean, min, max and the p50/p90/p99 (linear interpolation) of `values`."""
    if not values:
        return {"mean": 0.0, "min": 0.0, "max": 0.0, **{f"p{p}": 0.0 for p in PERCENTILES}}
    arr = np.asarray(values, dtype=np.float64)
    out = {"mean": float(arr.mean()), "min": float(arr.min()), "max": float(arr.max())}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(arr, p))
    return out


@dataclass
class EngineCounters:
    """The engine's cumulative counters at one moment; `since` gives a run's share."""

    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens_computed: int
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0

    @classmethod
    def read(cls, engine: Any) -> EngineCounters:
        m = engine.get_metrics()
        return cls(
            int(m["prefix_cache_queries"]),
            int(m["prefix_cache_hits"]),
            int(m["num_preemptions_total"]),
            int(m["prompt_tokens_total"]),
            int(m.get("spec_decode_num_draft_tokens", 0)),
            int(m.get("spec_decode_num_accepted_tokens", 0)),
        )

    def since(self, before: EngineCounters) -> EngineCounters:
        return EngineCounters(
            *(getattr(self, f) - getattr(before, f) for f in self.__dataclass_fields__)
        )


def reset_step_stats(engine: Any) -> EngineCounters:
    """Start counting a run: zero the per-step stats; returns the counters to diff against."""
    from pagedllm.engine.step_stats import StepStats

    engine.step_stats = StepStats()
    engine.runner.forward_timer.reset()
    return EngineCounters.read(engine)


def engine_report(engine: Any, before: EngineCounters) -> dict[str, float | int]:
    """The engine's side of a run started by `reset_step_stats`: cache, KV, batching and
    where each step's time went."""
    counters = EngineCounters.read(engine).since(before)
    stats = engine.step_stats
    model = engine.runner.forward_timer.total()
    step = stats.step_time
    update = step - stats.schedule_time - stats.execute_time
    return {
        "prefix_cache_queries": counters.prefix_cache_queries,
        "prefix_cache_hits": counters.prefix_cache_hits,
        "prefix_cache_hit_rate": (
            counters.prefix_cache_hits / counters.prefix_cache_queries
            if counters.prefix_cache_queries
            else 0.0
        ),
        "prompt_tokens_computed": counters.prompt_tokens_computed,
        "kv_utilization_mean": stats.kv_utilization,
        "peak_running": stats.peak_running,
        "peak_kv_blocks": stats.peak_kv_blocks,
        "kv_cache_tokens": engine.num_blocks * engine.args.block_size,
        "num_preemptions": counters.num_preemptions,
        "spec_draft_tokens": counters.spec_draft_tokens,
        "spec_acceptance_rate": (
            counters.spec_accepted_tokens / counters.spec_draft_tokens
            if counters.spec_draft_tokens
            else 0.0
        ),
        "num_steps": stats.num_steps,
        "step_time_s": step,
        "model_time_s": model,
        "schedule_time_s": stats.schedule_time,
        "prepare_and_sample_time_s": max(0.0, stats.execute_time - model),
        "update_and_detokenize_time_s": update,
        "outside_model_share": (step - model) / step if step > 0 else 0.0,
    }


def format_table(title: str, rows: Sequence[tuple[str, str]], width: int = 50) -> str:
    """A titled two-column block, as vLLM's benchmarks print their results."""
    lines = [f" {title} ".center(width, "=")]
    label_width = max((len(label) for label, _ in rows), default=0) + 2
    lines += [
        f"{label + ':':<{label_width}}{value:>{width - label_width}}" for label, value in rows
    ]
    lines.append("=" * width)
    return "\n".join(lines)


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def report_main(
    command: str,
    run: Callable[[argparse.Namespace], dict[str, Any]],
    format_results: Callable[[dict[str, Any]], str],
    args: argparse.Namespace,
    succeeded: Callable[[dict[str, Any]], bool] = lambda results: True,
) -> int:
    """A bench command's main: run, print the report, write --json-out.

    Exit status 2 for bad arguments (a ValueError from `run`), 1 when `succeeded` says
    the run failed, else 0.
    """
    try:
        results = run(args)
    except ValueError as e:
        print(f"pagedllm bench {command}: error: {e}", file=sys.stderr)
        return 2
    print(format_results(results))
    if args.json_out:
        write_json(args.json_out, results)
    return 0 if succeeded(results) else 1
