"""Where a batch-1 decode step's time goes: inside the C kernels, or outside them.

Runs the default model on one 128-token random prompt for `--tokens` greedy steps
(after a warm-up request), timing every call into the C kernels (the decoder layers,
all in one call; the LM head's weight product; row lookups) with
`perf_counter_ns` around the ctypes call, and the whole steps from the engine loop.
What is left is Python, torch dispatch, sampling, scheduling and detokenization; shown
as a share of the summed steps and as the median step's (robust to a noisy neighbour).

    python benchmarks/profile_decode_step.py [--tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from pagedllm import LLM, SamplingParams
from pagedllm.model.layers import decode_layer, quantized


def timed(fn, totals: dict[str, int], name: str):
    def wrapper(*args, **kwargs):
        start = time.perf_counter_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0) + time.perf_counter_ns() - start

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    llm = LLM(threads=args.threads)
    rng = random.Random(0)
    prompt = {"prompt_token_ids": [rng.randrange(1000, 40000) for _ in range(128)]}
    greedy = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    llm.generate(prompt, greedy, use_tqdm=False)  # warm-up: builds, first-touch, caches

    totals: dict[str, int] = {}
    kernels = quantized.kernels()
    assert kernels is not None, "the kernels did not build"
    patched = quantized.Kernels(
        timed(kernels.matmul, totals, "weight products outside the layers (LM head)"),
        timed(kernels.dequantize, totals, "dequantize (embedding rows)"),
        kernels.prepare,
        kernels.repack,
        kernels.level,
    )
    original_kernels, original_stack = quantized.kernels, decode_layer._stack_kernel
    stack_kernel = timed(original_stack(), totals, "decoder layers (norms, products, attention)")
    quantized.kernels = lambda level=None: patched  # type: ignore[assignment]
    decode_layer._stack_kernel = lambda: stack_kernel  # type: ignore[assignment]

    engine = llm.engine
    step, steps, outside_ns = engine.step, [], []

    def timed_step():
        inside_before = sum(totals.values())
        start = time.perf_counter_ns()
        out = step()
        steps.append(time.perf_counter_ns() - start)
        outside_ns.append(steps[-1] - (sum(totals.values()) - inside_before))
        if len(steps) == 1:  # the prefill: count decode steps only
            totals.clear()
        return out

    engine.step = timed_step  # type: ignore[method-assign]
    try:
        llm.generate(prompt, greedy, use_tqdm=False)
    finally:
        quantized.kernels, decode_layer._stack_kernel = original_kernels, original_stack
    decode = steps[1:]  # the first step is the prefill
    total = sum(decode)
    print(f"decode steps: {len(decode)}, mean {total / len(decode) / 1e6:.2f} ms")
    for name, ns in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {name:48s} {ns / len(decode) / 1e6:7.2f} ms/step")
    outside = 1 - sum(totals.values()) / total
    print(f"  {'outside the C kernels':48s} {outside * total / len(decode) / 1e6:7.2f} ms/step")
    print(f"time outside the C kernels: {100 * outside:.1f}% of a decode step")
    # On a shared machine a neighbour's burst lands in a few steps: the medians of each
    # step's time and of its time outside the kernels say the same without those steps.
    median_step, median_outside = statistics.median(decode), statistics.median(outside_ns[1:])
    print(
        f"median step {median_step / 1e6:.2f} ms, of it outside the C kernels "
        f"{median_outside / 1e6:.2f} ms ({100 * median_outside / median_step:.1f}%)"
    )


if __name__ == "__main__":
    main()
