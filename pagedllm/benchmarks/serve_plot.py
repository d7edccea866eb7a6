"""`bench serve --plot`: a run over time, as a PNG: output tokens/s in 1-s bins, and each
request's TTFT and TPOT at the time it was sent."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pagedllm.benchmarks.serve_client import RunResult


def output_rate_bins(run: RunResult, bin_s: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(bin start times, output tokens/s in each bin), times from the run's first send.

    A request's tokens are spread evenly over its content chunks, so a server that packs
    several tokens in a chunk still adds up to the usage it reported."""
    ok = [r for r in run.results if r.success and r.chunk_times]
    t0 = min((r.start for r in run.results), default=0.0)
    times = np.array([t - t0 for r in ok for t in r.chunk_times])
    weights = np.array([r.output_tokens / len(r.chunk_times) for r in ok for _ in r.chunk_times])
    n_bins = max(1, int(np.ceil((times.max() if times.size else 0.0) / bin_s + 1e-9)))
    edges = np.arange(n_bins + 1) * bin_s
    counts, _ = np.histogram(times, bins=edges, weights=weights if times.size else None)
    return edges[:-1], counts / bin_s


def plot_run(run: RunResult, path: str | Path, title: str = "pagedllm bench serve") -> None:
    """Write the two panels to `path` (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    starts, rates = output_rate_bins(run)
    ok = [r for r in run.results if r.success]
    t0 = min((r.start for r in run.results), default=0.0)
    sent = [r.start - t0 for r in ok]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.bar(starts, rates, width=1.0, align="edge", color="tab:blue", alpha=0.8)
    top.set_ylabel("output tokens/s")
    top.set_title(title)
    bottom.scatter(sent, [1e3 * r.ttft for r in ok], s=12, label="TTFT", color="tab:orange")
    tpot = [(s, 1e3 * r.tpot) for s, r in zip(sent, ok, strict=True) if r.tpot is not None]
    if tpot:
        bottom.scatter(*zip(*tpot, strict=True), s=12, label="TPOT", color="tab:green")
    bottom.set_xlabel("time since the first request (s)")
    bottom.set_ylabel("latency (ms)")
    bottom.legend(loc="upper left")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
