"""Model FLOPs utilization: the workload's model FLOPs per second over what this machine's
matrix multiply reaches, measured in the same run on the same device and dtype.

Model FLOPs are counted from the architecture, not from what the engine happened to
compute: every prompt token and every fed-back output token passes through each
linear layer (2 FLOPs per weight), attends to its whole context (QKᵀ and AV,
4 · layers · q_size FLOPs per earlier position), and each sampled token goes through
the LM head once. Prefix-cache hits are not subtracted, nor recomputation after a
preemption added, so both backends are credited with the same work.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any


def linear_params(config: Any) -> tuple[int, int]:
    """(weights of the decoder layers' linear layers, weights of the LM head)."""
    h, q, kv, inter = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * inter  # q, k, v, o; gate, up, down
    return config.num_layers * per_layer, h * config.vocab_size


def _positions_sum(first: int, end: int) -> int:
    """Σ (p + 1) for p in [first, end): keys each position attends to, causally."""
    return (end * (end + 1) - first * (first + 1)) // 2


def request_flops(config: Any, prompt_len: int, output_lens: Sequence[int]) -> float:
    """Model FLOPs of one request: its prompt once, then each completion (n of them)."""
    body, head = linear_params(config)
    attn = 4 * config.num_layers * config.q_size
    flops = prompt_len * 2 * body + attn * _positions_sum(0, prompt_len)
    for out in output_lens:
        if out <= 0:
            continue
        fed = out - 1  # the last sampled token is never fed back
        flops += fed * 2 * body + out * 2 * head
        flops += attn * _positions_sum(prompt_len, prompt_len + fed)
    return float(flops)


def measure_matmul_flops(
    m: int, k: int, n: int, dtype: Any, device: Any, seconds: float = 0.5
) -> float:
    """FLOP/s of `torch.mm` on an (m × k) by (k × n) product, timed for about `seconds`."""
    import torch

    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)

    def sync() -> None:
        if a.device.type == "cuda":
            torch.cuda.synchronize(a.device)

    for _ in range(3):
        torch.mm(a, b)
    sync()
    iters, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        iters += 1
        if iters % 8 == 0 or a.device.type != "cuda":
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return 2.0 * m * k * n * iters / elapsed


def mfu_report(
    config: Any,
    workload: Sequence[tuple[int, Sequence[int]]],
    elapsed: float,
    ceiling_flops: float,
    shape: tuple[int, int, int],
) -> dict[str, Any]:
    """MFU of a run: `workload` is (prompt_len, completion lengths) per request."""
    total = sum(request_flops(config, p, outs) for p, outs in workload)
    achieved = total / elapsed if elapsed > 0 else 0.0
    return {
        "model_flops": total,
        "achieved_gflops": achieved / 1e9,
        "matmul_gflops": ceiling_flops / 1e9,
        "matmul_shape": list(shape),
        "mfu": achieved / ceiling_flops if ceiling_flops > 0 else 0.0,
    }
