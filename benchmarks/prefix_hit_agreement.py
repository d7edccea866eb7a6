"""How often one instance's greedy answer changes when the prompt's prefix comes from
the prefix cache: the reference workload (64 prompts of 64-256 tokens, 128 greedy
tokens) answered twice by one engine, the second time with every full prompt block
cached, so only the last partial block is computed. A disaggregated decode instance
computes exactly that part, so this is the agreement to expect of the pair.

    .venv/bin/python benchmarks/prefix_hit_agreement.py [--exact-matmul]
"""

from __future__ import annotations

import sys

from pagedllm import LLM, SamplingParams

sys.path.insert(0, "benchmarks")
from bench_disaggregated import reference_prompts


def main() -> None:
    exact = "--exact-matmul" in sys.argv
    llm = LLM(exact_matmul=exact)
    prompts = [{"prompt_token_ids": p} for p in reference_prompts(llm.get_tokenizer())]
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    first = llm.generate(prompts, params, use_tqdm=False)
    again = llm.generate(prompts, params, use_tqdm=False)
    same = sum(
        a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(first, again, strict=True)
    )
    cached = sum(b.num_cached_tokens for b in again)
    print(
        f"{'exact' if exact else 'default'} path: {same}/64 answers identical with the "
        f"prefix cached ({cached} prompt tokens from the cache)"
    )


if __name__ == "__main__":
    main()
