"""Every weight product of the default model, per kernel level and batch size.

For each level the CPU runs (portable C, AVX2, AVX512-VNNI) and each batch size, one
pass over all 211 quantized matrices of SmolLM2-135M in model order (so the weights
come from memory, as in a decode step), best of `--repeats`; integer mode, and the
exact float32 mode at one row. Rows above 16 go through the dequantized tiles.

    python benchmarks/bench_quant_kernels.py [--rows 1 16 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from pagedllm import cpu_kernels
from pagedllm.model.layers.linear import Linear
from pagedllm.model.layers.quantized import QuantizedWeight
from pagedllm.model.loader import default_model_path, load_model


def one_pass(weights: list[QuantizedWeight], rows: int, exact: bool, repeats: int) -> float:
    inputs = {w.cols: torch.randn(rows, w.cols) for w in weights}
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for w in weights:
            w.matmul(inputs[w.cols], exact=exact)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(default_model_path(), torch.float32)
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    parts = [p for m in layers for p in m.quantized_parts if isinstance(p, QuantizedWeight)]
    total_bytes = sum(p.nbytes for p in parts)
    macs = sum(p.shape[0] * p.shape[1] for p in parts)
    print(f"{len(parts)} matrices, {total_bytes / 2**20:.0f} MiB, {macs / 1e6:.0f} M weights")
    print(f"{'level':12s} {'rows':>5s} {'mode':6s} {'ms':>8s} {'GB/s':>7s} {'GMAC/s':>8s}")
    for level in cpu_kernels.supported_levels():
        weights = [QuantizedWeight(p.qtype, p.qs, p.scales, p.mins, p.cols, level) for p in parts]
        for rows in args.rows:
            for exact in (False, True) if rows == 1 else (False,):
                seconds = one_pass(weights, rows, exact, args.repeats)
                print(
                    f"{level:12s} {rows:5d} {'exact' if exact else 'int8':6s} "
                    f"{seconds * 1e3:8.2f} {total_bytes / seconds / 1e9:7.2f} "
                    f"{rows * macs / seconds / 1e9:8.1f}"
                )


if __name__ == "__main__":
    main()
