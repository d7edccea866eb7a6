"""Greedy outputs of the reference workload over each KV-cache format, against the float32
cache: the share of generated tokens before each prompt's first divergence (issue 14's
accuracy target: >= 90%), and the run's output tok/s and peak running requests.

    python benchmarks/kv_cache_agreement.py /tmp/reference.json int8 fp8
"""

from __future__ import annotations

import json
import sys
import time

from pagedllm import LLM, SamplingParams


def generate(requests: list[dict], kv_cache_dtype: str) -> tuple[list[list[int]], float]:
    llm = LLM(kv_cache_dtype=kv_cache_dtype, seed=0)
    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in requests]
    params = [
        SamplingParams(temperature=0, max_tokens=r["output_len"], ignore_eos=True) for r in requests
    ]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return [o.outputs[0].token_ids for o in outputs], sum(
        r["output_len"] for r in requests
    ) / elapsed


def agreement(outputs: list[list[int]], expected: list[list[int]]) -> float:
    agreed = 0
    for got, want in zip(outputs, expected, strict=True):
        agreed += next(
            (i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), len(want)
        )
    return agreed / sum(len(w) for w in expected)


def main(path: str, *formats: str) -> None:
    with open(path) as f:
        requests = json.load(f)
    expected, speed = generate(requests, "float32")
    print(f"| float32 | 100% | {speed:.1f} |")
    for name in formats:
        outputs, speed = generate(requests, name)
        print(f"| {name} | {agreement(outputs, expected):.1%} | {speed:.1f} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
