"""Speculative decoding (n-gram by default, or any --speculative-config) against plain
decoding, same engine settings, greedy, 128 new tokens: single stream (each prompt alone,
one after another) and 32 at once, on prompts whose answers copy them (edits and
extracts of real text on this machine, the Python docs) and on prompts whose answers
do not.

    python benchmarks/bench_spec_decode.py --prompts 8
    python benchmarks/bench_spec_decode.py --speculative-config \
        '{"method": "draft_model", "model": "DRAFT.gguf", "num_speculative_tokens": 4}'
"""

from __future__ import annotations

import argparse
import json
import random
import time

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks.datasets import english_corpus

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2}


def copy_prompts(n: int, rng: random.Random) -> list[str]:
    """Answers that copy the prompt: a passage repeated with one word changed, a
    sentence extracted, or the passage as a chat would quote it back."""
    text = english_corpus()
    prompts = []
    for i in range(n):
        start = rng.randrange(len(text) - 1200)
        passage = text[start : start + 700]
        words = passage.split()
        word = rng.choice(words[5:-5])
        kind = i % 3
        if kind == 0:
            task = f'Repeat the passage below, but replace the word "{word}" with "WORD".'
        elif kind == 1:
            task = "Copy the passage below exactly, line for line."
        else:
            task = "Quote the passage below in full, then summarise it in one sentence."
        prompts.append(f"{task}\n\n{passage}\n\nAnswer:\n\n")
    return prompts


def fresh_prompts(n: int) -> list[str]:
    topics = ["a lighthouse keeper", "the history of bread", "how tides work", "a robot chef"]
    topics += ["winter in a mountain village", "why the sky is blue", "learning the violin"]
    return [f"Write a few paragraphs about {topics[i % len(topics)]}." for i in range(n)]


def output_tok_s(llm: LLM, prompts: list[str], together: bool) -> tuple[float, float]:
    """Output tok/s of the whole run (prefill included), and after each first token
    (1 / mean TPOT: what speculation changes; the prefill is the same either way)."""
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    llm.generate(prompts[:1], params.clone(max_tokens=8), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    if together:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    else:
        outputs = [llm.generate(p, params, use_tqdm=False)[0] for p in prompts]
    elapsed = time.perf_counter() - start
    tpot = sum(o.metrics.mean_time_per_output_token for o in outputs) / len(outputs)
    return len(prompts) * 128 / elapsed, 1 / tpot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8, help="single-stream prompts per kind")
    parser.add_argument("--concurrent", type=int, default=32)
    parser.add_argument("--speculative-config", default=json.dumps(NGRAM))
    args = parser.parse_args()
    method = json.loads(args.speculative_config)["method"]
    rng = random.Random(0)
    workloads = {"copies its prompt": copy_prompts, "does not repeat": None}
    plain, spec = LLM(seed=0), LLM(seed=0, speculative_config=args.speculative_config)
    print(
        f"| workload | requests | plain tok/s | {method} tok/s | ratio "
        "| after the first token | acceptance |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, make in workloads.items():
        for count, together in ((args.prompts, False), (args.concurrent, True)):
            prompts = make(count, rng) if make else fresh_prompts(count)
            base, base_decode = output_tok_s(plain, prompts, together)
            before = spec.get_metrics()
            fast, fast_decode = output_tok_s(spec, prompts, together)
            after = spec.get_metrics()
            drafted = after["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"]
            accepted = (
                after["spec_decode_num_accepted_tokens"] - before["spec_decode_num_accepted_tokens"]
            )
            rate = accepted / drafted if drafted else 0.0
            mode = f"{count} at once" if together else f"{count}, one at a time"
            print(
                f"| {name} | {mode} | {base:.1f} | {fast:.1f} | {fast / base:.2f}× "
                f"| {fast_decode / base_decode:.2f}× | {rate:.0%} |"
            )


if __name__ == "__main__":
    main()
