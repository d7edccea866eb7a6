"""Write issue 6's reference workload as a `--dataset file` JSON: 64 prompts of 64–256
tokens of real English text (the Python docs on this machine), 128 output tokens each.

    .venv/bin/python benchmarks/make_reference_workload.py /tmp/reference.json
"""

from __future__ import annotations

import json
import random
import sys

from pagedllm.benchmarks.datasets import english_corpus
from pagedllm.model.loader import default_model_path
from pagedllm.tokenizer import load_tokenizer


def main(path: str, num_prompts: int = 64, seed: int = 0) -> None:
    tokenizer = load_tokenizer(default_model_path())
    ids = tokenizer.encode(english_corpus()[:400_000], add_special_tokens=False)
    rng = random.Random(seed)
    requests = []
    for _ in range(num_prompts):
        length = rng.randint(64, 256)
        start = rng.randrange(len(ids) - length)
        requests.append({"prompt_token_ids": ids[start : start + length], "output_len": 128})
    with open(path, "w") as f:
        json.dump(requests, f)


if __name__ == "__main__":
    main(sys.argv[1])
