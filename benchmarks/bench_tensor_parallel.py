"""Issue 18's tensor-parallel targets: the reference workload (64 prompts of 64–256 tokens,
128 greedy tokens each) on the exact float32 path, on one rank with the machine's threads
and on two ranks of one thread each; the answers compared token for token, the throughput
and each rank's weight and KV bytes.

    .venv/bin/python benchmarks/make_reference_workload.py /tmp/reference.json
    .venv/bin/python benchmarks/bench_tensor_parallel.py /tmp/reference.json
"""

from __future__ import annotations

import json
import sys
import time

from pagedllm import LLM, SamplingParams
from pagedllm.worker.worker import usable_cores


def run(requests: list[dict], **engine_args: object) -> tuple[list[list[int]], float, dict]:
    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in requests]
    params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    with LLM(exact_matmul=True, kv_cache_memory=0.5, **engine_args) as llm:
        llm.generate(prompts[:2], SamplingParams(max_tokens=4))  # warm-up
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        worker = llm.engine.executor.driver
        shares = {
            "weights_mib_rank0": worker.weight_bytes() / 2**20,
            "kv_bytes_per_block_rank0": worker.block_bytes,
            "kv_blocks": worker.num_blocks,
        }
    return [o.outputs[0].token_ids for o in outputs], seconds, shares


def main(path: str) -> None:
    with open(path) as f:
        requests = json.load(f)
    tokens = sum(len(r["prompt_token_ids"]) + 128 for r in requests)
    cores = usable_cores()
    one, t1, s1 = run(requests, threads=cores)
    two, t2, s2 = run(requests, tensor_parallel_size=2, threads=max(1, cores // 2))
    same = sum(a == b for a, b in zip(one, two, strict=True))
    print(f"TP=1 ({cores} threads): {t1:.1f} s, {tokens / t1:.1f} total tok/s, {s1}")
    print(
        f"TP=2 ({max(1, cores // 2)} thread(s) a rank): {t2:.1f} s, {tokens / t2:.1f} total tok/s, {s2}"
    )
    print(f"identical greedy answers: {same}/{len(requests)}")
    first = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        for a, b in zip(one, two, strict=True)
    ]
    print("first differing token of the others:", [i for i in first if i is not None])


if __name__ == "__main__":
    main(sys.argv[1])
