"""TTFT with a shared prompt prefix: the first request computes it, later ones reuse its blocks.

Sends, one after another, requests that share a PREFIX-token prefix of real English
text and differ in a short suffix; prints each TTFT and the first's over the mean of
the rest, with prefix caching on and then off (the control).

    .venv/bin/python benchmarks/bench_prefix_ttft.py [PREFIX_LEN]
"""

from __future__ import annotations

import statistics
import sys

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks.datasets import english_corpus


def ttfts(enable_prefix_caching: bool, prefix_len: int, num: int = 6) -> tuple[list[float], int]:
    llm = LLM(dtype="float32", kv_cache_memory=0.5, enable_prefix_caching=enable_prefix_caching)
    tokenizer = llm.get_tokenizer()
    text = english_corpus()
    prefix = tokenizer.encode(text[: prefix_len * 8], add_special_tokens=False)[:prefix_len]
    params = SamplingParams(temperature=0, max_tokens=1)
    llm.generate({"prompt_token_ids": [1, 2, 3]}, params, use_tqdm=False)  # warm-up
    out, cached = [], 0
    for i in range(num):
        suffix = tokenizer.encode(f" Question {i}: what follows?", add_special_tokens=False)
        [o] = llm.generate({"prompt_token_ids": prefix + suffix}, params, use_tqdm=False)
        out.append(o.metrics.time_to_first_token)
        cached = max(cached, o.num_cached_tokens)
    return out, cached


def main() -> None:
    prefix_len = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    for caching in (True, False):
        times, cached = ttfts(caching, prefix_len)
        rest = statistics.mean(times[1:])
        print(
            f"prefix caching {'on ' if caching else 'off'}: TTFT first {times[0] * 1000:7.1f} ms,"
            f" later mean {rest * 1000:7.1f} ms (x{times[0] / rest:.1f});"
            f" most cached tokens {cached}"
        )


if __name__ == "__main__":
    main()
