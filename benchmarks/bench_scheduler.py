"""Benchmark of the pure-Python core: scheduler cost per step and KV utilization.

Runs without a model: a stand-in "worker" samples token 1 for every request that
samples. Two parts:

1. Cost: 256 requests decoding together; time ``schedule()`` and
   ``update_from_output()`` per step.
2. Utilization: a seeded synthetic chat workload (prompt and output lengths drawn
   log-normally, shaped like ShareGPT) run to completion, once with paged
   allocation and once reserving ``max_model_len`` slots per request, in the same
   KV memory. Utilization = token slots holding real tokens / slots allocated.

Usage: python benchmarks/bench_scheduler.py [--steps 2000] [--requests 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

# Benchmark the checkout this script lives in, whatever is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pagedllm.config import CacheConfig, SchedulerConfig
from pagedllm.core.scheduler import Scheduler
from pagedllm.request import Request
from pagedllm.sampling_params import SamplingParams

BLOCK_SIZE = 16
MAX_MODEL_LEN = 2048


def make_request(request_id: str, prompt_len: int, max_tokens: int, rng: random.Random) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=[rng.randrange(32000) for _ in range(prompt_len)],
        sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        eos_token_id=2,
    )


def sample_all(output) -> dict[str, list[int]]:
    """What the worker would return: one token per request that samples."""
    return {s.request_id: [1] for s in output.scheduled_requests if not s.is_prefill_chunk}


def bench_cost(num_steps: int, seed: int) -> dict[str, float]:
    """Per-step cost of schedule + update with 256 running decode requests."""
    rng = random.Random(seed)
    num_seqs = 256
    scheduler = Scheduler(
        SchedulerConfig(max_num_seqs=num_seqs, max_num_batched_tokens=8192, max_model_len=4096),
        CacheConfig(block_size=BLOCK_SIZE),
        num_blocks=num_seqs * (4096 // BLOCK_SIZE),
    )
    for k in range(num_seqs):
        # Staggered lengths, so block boundaries (allocation, hashing) spread over steps.
        prompt_len = rng.randint(64, 1024)
        scheduler.add_request(make_request(f"r{k}", prompt_len, 4096 - prompt_len, rng))
    # Warm up until every request has finished its prefill and decodes.
    while any(r.num_output_tokens == 0 for r in scheduler.requests.values()):
        out = scheduler.schedule()
        scheduler.update_from_output(out, sample_all(out))
    assert scheduler.num_running == num_seqs
    sampled = {rid: [1] for rid in scheduler.requests}  # built once: the worker's cost
    sched_ns, update_ns = [], []
    clock = time.perf_counter_ns
    for _ in range(num_steps):
        t0 = clock()
        out = scheduler.schedule()
        t1 = clock()
        scheduler.update_from_output(out, sampled)
        t2 = clock()
        assert len(out.scheduled_requests) == num_seqs
        sched_ns.append(t1 - t0)
        update_ns.append(t2 - t1)
    total = sorted(s + u for s, u in zip(sched_ns, update_ns, strict=True))
    return {
        "schedule_us": statistics.mean(sched_ns) / 1e3,
        "update_us": statistics.mean(update_ns) / 1e3,
        "total_mean_us": statistics.mean(total) / 1e3,
        "total_p50_us": total[len(total) // 2] / 1e3,
        "total_p99_us": total[int(len(total) * 0.99)] / 1e3,
    }


def sharegpt_like(num_requests: int, seed: int) -> list[tuple[int, int]]:
    """(prompt_len, output_len) pairs, log-normal like ShareGPT chat.

    Medians of ~100 prompt and ~200 output tokens with sigma 1.0 give means of
    about 165 and 330 tokens, close to the ShareGPT figures in the vLLM paper.
    """
    rng = random.Random(seed)
    pairs = []
    for _ in range(num_requests):
        prompt = min(max(4, int(rng.lognormvariate(4.6, 1.0))), 1024)
        output = min(max(1, int(rng.lognormvariate(5.3, 1.0))), MAX_MODEL_LEN - prompt)
        pairs.append((prompt, output))
    return pairs


def simulate(pairs: list[tuple[int, int]], kv_slots: int, contiguous: bool, seed: int) -> dict:
    """Run the workload to the end; measure utilization and concurrency."""
    rng = random.Random(seed)
    if contiguous:
        # Reserving max_model_len per request: only this many fit, at any length.
        max_seqs = kv_slots // MAX_MODEL_LEN
        num_blocks = max_seqs * MAX_MODEL_LEN // BLOCK_SIZE
    else:
        max_seqs = 256
        num_blocks = kv_slots // BLOCK_SIZE
    scheduler = Scheduler(
        SchedulerConfig(
            max_num_seqs=max_seqs, max_num_batched_tokens=4096, max_model_len=MAX_MODEL_LEN
        ),
        CacheConfig(block_size=BLOCK_SIZE),
        num_blocks=num_blocks,
    )
    for k, (prompt, output) in enumerate(pairs):
        scheduler.add_request(make_request(f"r{k}", prompt, output, rng))
    kv = scheduler.kv_cache_manager
    used_total = allocated_total = running_total = steps = 0
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        # Slots holding real tokens: each running request's computed tokens (the
        # random prompts share no prefix, so no block is counted twice).
        used = sum(r.num_computed_tokens for r in scheduler.running)
        if contiguous:
            allocated = len(scheduler.running) * MAX_MODEL_LEN
        else:
            allocated = (kv.num_blocks - kv.get_num_free_blocks()) * BLOCK_SIZE
        used_total += used
        allocated_total += allocated
        running_total += len(scheduler.running)
        steps += 1
        scheduler.update_from_output(out, sample_all(out))
    return {
        "utilization": used_total / allocated_total,
        "mean_running": running_total / steps,
        "steps": steps,
        "preemptions": scheduler.num_preemptions_total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="timed steps of part 1")
    parser.add_argument("--requests", type=int, default=1000, help="requests of part 2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cost = bench_cost(args.steps, args.seed)
    print(f"Part 1: 256 running requests, {args.steps} decode steps")
    print(f"  schedule()            {cost['schedule_us']:8.1f} us/step (mean)")
    print(f"  update_from_output()  {cost['update_us']:8.1f} us/step (mean)")
    print(
        f"  schedule + update     {cost['total_mean_us']:8.1f} us/step mean, "
        f"{cost['total_p50_us']:.1f} p50, {cost['total_p99_us']:.1f} p99"
    )

    pairs = sharegpt_like(args.requests, args.seed)
    kv_slots = 64 * MAX_MODEL_LEN  # KV memory for 64 full-length sequences
    prompts = [p for p, _ in pairs]
    outputs = [o for _, o in pairs]
    print(
        f"\nPart 2: {args.requests} requests, prompt mean {statistics.mean(prompts):.0f} "
        f"(median {statistics.median(prompts):.0f}), output mean {statistics.mean(outputs):.0f} "
        f"(median {statistics.median(outputs):.0f}) tokens; KV memory {kv_slots} token slots, "
        f"max_model_len {MAX_MODEL_LEN}, block_size {BLOCK_SIZE}"
    )
    print(
        f"  {'allocation':<32} {'utilization':>11} {'mean running':>13} {'steps':>7} {'preempt':>8}"
    )
    for name, contiguous in (("paged (blocks of 16)", False), ("contiguous max_model_len", True)):
        t0 = time.perf_counter()
        r = simulate(pairs, kv_slots, contiguous, args.seed)
        elapsed = time.perf_counter() - t0
        print(
            f"  {name:<32} {r['utilization']:>10.1%} {r['mean_running']:>13.1f} "
            f"{r['steps']:>7} {r['preemptions']:>8}   ({elapsed:.1f} s)"
        )


if __name__ == "__main__":
    main()
