"""Decode attention per KV-cache format: one layer of the default model's shape (3 KV heads,
9 query heads, head_dim 64), B sequences of L tokens each, best of N calls of the CPU
kernel; what a decode step pays per layer to read its cache.

    python benchmarks/bench_kv_cache.py --seqs 1 64 --context 2048 1024
"""

from __future__ import annotations

import argparse
import time

import torch

from pagedllm.attention import cpu_decode
from pagedllm.attention.kv_cache import KV_CACHE_DTYPES, make_kv_cache

FORMATS = ["float32", "bfloat16", "int8", "fp8_e4m3", "fp8_e5m2"]


def time_decode(name: str, seqs: int, context: int, repeats: int, block: int = 16) -> float:
    """Best milliseconds of one paged decode over `seqs` sequences of `context` tokens."""
    dtype = KV_CACHE_DTYPES[name]
    blocks_per_seq = -(-context // block)
    num_blocks = seqs * blocks_per_seq
    cache = make_kv_cache(num_blocks, block, 3, 64, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    slots = torch.arange(num_blocks * block)
    cache.write(torch.randn(len(slots), 3, 64, generator=g), torch.randn(len(slots), 3, 64), slots)
    tables = torch.randperm(num_blocks, generator=g).view(seqs, blocks_per_seq)
    lens = torch.full((seqs,), context)
    query = torch.randn(seqs, 9, 64)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        cpu_decode.paged_decode(query, cache, tables, lens, 0.125)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--context", type=int, nargs="+", default=[2048, 1024])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"threads {torch.get_num_threads()}")
    print("| sequences × context | " + " | ".join(FORMATS) + " |")
    print("|---" * (len(FORMATS) + 1) + "|")
    for seqs, context in zip(args.seqs, args.context, strict=True):
        times = [time_decode(name, seqs, context, args.repeats) for name in FORMATS]
        cells = [f"{t:.3f} ms ({times[0] / t:.2f}×)" for t in times]
        print(f"| {seqs} × {context} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
