"""Decode throughput at a fixed context, per KV-cache format: B sequences with prompts of
L random tokens are prefilled first, then only decode steps are timed (best of 3 runs of
N steps), so prefill work never lands in the number.

    python benchmarks/bench_decode_context.py --seqs 64 --context 1024 float32 int8 fp8
"""

from __future__ import annotations

import argparse
import time

import torch

from pagedllm import LLM, SamplingParams


def decode_tok_s(kv_cache_dtype: str, seqs: int, context: int, steps: int) -> float:
    memory = 1.2 * seqs * (context + 4 * steps) * 46_080 / 2**30  # float32's size, ample
    llm = LLM(kv_cache_dtype=kv_cache_dtype, kv_cache_memory=memory, max_num_seqs=seqs, seed=0)
    engine = llm.engine
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=4 * steps, ignore_eos=True)
    for i in range(seqs):
        prompt = torch.randint(100, 40_000, (context,), generator=g).tolist()
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    running = engine.scheduler.running
    while len(running) < seqs or any(r.num_computed_tokens < r.num_prompt_tokens for r in running):
        engine.step()  # prefill everything (the last prefill step also samples)
    engine.step()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        best = min(best, time.perf_counter() - start)
    return seqs * steps / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("formats", nargs="+")
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    results = {f: decode_tok_s(f, args.seqs, args.context, args.steps) for f in args.formats}
    base = results[args.formats[0]]
    for name, tok_s in results.items():
        print(f"| {args.seqs} × {args.context} | {name} | {tok_s:.1f} | {tok_s / base:.2f}× |")


if __name__ == "__main__":
    main()
