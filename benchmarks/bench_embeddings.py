"""Embedding throughput: N short inputs (sentences cut from English text on the machine)
through LLM.embed, all at once, each pooling type; inputs/s and tokens/s.

    python benchmarks/bench_embeddings.py --num-inputs 1000
"""

from __future__ import annotations

import argparse
import time

from pagedllm import LLM, PoolingParams
from pagedllm.benchmarks.datasets import english_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--num-inputs", type=int, default=1000)
    args = parser.parse_args()
    text = english_corpus()
    inputs = [text[i * 61 : i * 61 + 40 + (i * 37) % 120] for i in range(args.num_inputs)]
    llm = LLM(model=args.model)
    llm.embed(inputs[:8], use_tqdm=False)  # warm-up
    print("| pooling | inputs | prompt tokens | seconds | inputs/s | tokens/s |")
    print("|---|---|---|---|---|---|")
    for pooling in ("last", "mean"):
        start = time.perf_counter()
        outs = llm.embed(inputs, PoolingParams(pooling=pooling), use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.prompt_token_ids) for o in outs)
        print(
            f"| {pooling} | {len(outs)} | {tokens} | {elapsed:.2f} | {len(outs) / elapsed:.0f} "
            f"| {tokens / elapsed:.0f} |"
        )


if __name__ == "__main__":
    main()
