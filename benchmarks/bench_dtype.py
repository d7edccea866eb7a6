"""Which dtype should `auto` pick on this CPU? Speed at batch 1 and 32, and greedy fidelity.

Runs the same workload in float32 and bfloat16 in one process and prints ratios:
decode tokens/s at batch 1, total tokens/s at batch 32, and how many of 32 greedy
tokens bfloat16 keeps identical to float32 over a set of prompts.

    .venv/bin/python benchmarks/bench_dtype.py
"""

from __future__ import annotations

import time

from pagedllm import LLM, SamplingParams

TEXT = (
    "The history of computing is a story of abstractions piled on abstractions. Early machines "
    "were programmed by rewiring panels; then came stored programs, assemblers, compilers and "
    "operating systems that share one processor among many tasks. "
) * 8
PROMPTS = [
    "Paris is the capital of",
    "def fibonacci(n):",
    "Name three planets and describe them.",
    TEXT[:1500],
    "1, 2, 3, 4,",
    "The quick brown fox",
]


def run(dtype: str) -> dict[str, object]:
    llm = LLM(dtype=dtype, kv_cache_memory=0.5, enable_prefix_caching=False)
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]
    single = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    prompt = {"prompt_token_ids": llm.get_tokenizer().encode(TEXT)[:128]}
    llm.generate(prompt, SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    [out] = llm.generate(prompt, single, use_tqdm=False)
    m = out.metrics
    decode_tps = 127 / (m.finished_time - m.first_token_time)
    batch = [
        {"prompt_token_ids": llm.get_tokenizer().encode(TEXT[i : i + 700])[:128]} for i in range(32)
    ]
    start = time.perf_counter()
    llm.generate(batch, single, use_tqdm=False)
    batch_tps = 32 * (128 + 128) / (time.perf_counter() - start)
    return {"tokens": tokens, "ttft": m.time_to_first_token, "decode": decode_tps, "b32": batch_tps}


def main() -> None:
    results = {dtype: run(dtype) for dtype in ("float32", "bfloat16")}
    f32, b16 = results["float32"], results["bfloat16"]
    same = sum(
        next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), len(x))
        for x, y in zip(f32["tokens"], b16["tokens"], strict=True)
    )
    for name, r in results.items():
        print(
            f"{name:9s} batch-1 TTFT {r['ttft'] * 1000:6.1f} ms, decode {r['decode']:6.1f} tok/s;"
            f" batch-32 {r['b32']:6.1f} total tok/s"
        )
    print(
        f"bf16/fp32: decode x{b16['decode'] / f32['decode']:.2f}, batch-32 x"
        f"{b16['b32'] / f32['b32']:.2f}; greedy tokens identical before the first divergence:"
        f" {same}/{32 * len(PROMPTS)}"
    )


if __name__ == "__main__":
    main()
