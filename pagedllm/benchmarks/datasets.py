"""Benchmark workloads: prompts as token ids with the number of tokens to generate for each.

Every dataset is seeded and made of token ids, so the pagedllm engine and the
`transformers` baseline are given exactly the same work:

- ``random``: random token ids of ``input_len`` tokens (± ``range_ratio``), after an
  optional prefix of ``prefix_len`` tokens that every prompt shares;
- ``sharegpt-like``: prompt and output lengths drawn log-normal like ShareGPT chat
  (medians ~100 and ~200 tokens), prompts cut from real English prose found on this
  machine (the Python documentation that ships with the interpreter);
- ``file``: a JSON list of prompts (text or token ids), each with its own output length.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DATASETS = ("random", "sharegpt-like", "file")

# ShareGPT-shaped lengths, as in benchmarks/bench_scheduler.py: log-normal with medians
# of ~100 prompt and ~200 output tokens and sigma 1.0 (means ~165 and ~330).
SHAREGPT_PROMPT_MU, SHAREGPT_OUTPUT_MU, SHAREGPT_SIGMA = 4.6, 5.3, 1.0
SHAREGPT_MAX_PROMPT_LEN, SHAREGPT_MAX_LEN = 1024, 2048

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class SampleRequest:
    """One benchmark request: its prompt's token ids and how many tokens to generate."""

    prompt_token_ids: list[int]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def _length_bounds(name: str, length: int, range_ratio: float) -> tuple[int, int]:
    if length < 1:
        raise ValueError(f"{name} must be >= 1, got {length}")
    return max(1, int(length * (1 - range_ratio))), max(1, int(length * (1 + range_ratio)))


def random_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    vocab_size: int,
    range_ratio: float = 0.0,
    prefix_len: int = 0,
    seed: int = 0,
    special_ids: Collection[int] = (),
) -> list[SampleRequest]:
    """Prompts of random token ids: a shared prefix of `prefix_len` tokens, then
    `input_len` tokens of their own; input and output lengths are drawn uniformly
    within ± `range_ratio` of `input_len` and `output_len`. Special tokens are never drawn."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    if prefix_len < 0:
        raise ValueError(f"prefix_len must be >= 0, got {prefix_len}")
    in_lo, in_hi = _length_bounds("input_len", input_len, range_ratio)
    out_lo, out_hi = _length_bounds("output_len", output_len, range_ratio)
    allowed = np.setdiff1d(np.arange(vocab_size), np.fromiter(special_ids, dtype=np.int64))
    if allowed.size == 0:
        raise ValueError("the vocabulary has no ordinary tokens to draw prompts from")
    rng = np.random.default_rng(seed)
    prefix = allowed[rng.integers(0, allowed.size, prefix_len)].tolist()
    input_lens = rng.integers(in_lo, in_hi + 1, num_prompts)
    output_lens = rng.integers(out_lo, out_hi + 1, num_prompts)
    requests = []
    for n_in, n_out in zip(input_lens.tolist(), output_lens.tolist(), strict=True):
        own = allowed[rng.integers(0, allowed.size, n_in)].tolist()
        requests.append(SampleRequest(prefix + own, n_out))
    return requests


def sharegpt_like_lengths(
    num_prompts: int, seed: int, max_len: int = SHAREGPT_MAX_LEN
) -> list[tuple[int, int]]:
    """(prompt_len, output_len) pairs shaped like ShareGPT chat, within `max_len` in all."""
    if max_len < 5:
        raise ValueError(f"max_len must be >= 5 for sharegpt-like prompts, got {max_len}")
    rng = random.Random(seed)
    max_prompt = min(SHAREGPT_MAX_PROMPT_LEN, max_len - 1)
    pairs = []
    for _ in range(num_prompts):
        prompt = min(
            max(4, int(rng.lognormvariate(SHAREGPT_PROMPT_MU, SHAREGPT_SIGMA))), max_prompt
        )
        output = min(
            max(1, int(rng.lognormvariate(SHAREGPT_OUTPUT_MU, SHAREGPT_SIGMA))), max_len - prompt
        )
        pairs.append((prompt, output))
    return pairs


def sharegpt_like_requests(
    num_prompts: int,
    encode: Encode,
    seed: int = 0,
    max_len: int = SHAREGPT_MAX_LEN,
    output_len: int | None = None,
    corpus: str | None = None,
) -> list[SampleRequest]:
    """ShareGPT-shaped requests whose prompts are runs of English text (as token ids),
    each cut at a random place in `corpus` (default: `english_corpus()`).

    `output_len` fixes every output length instead of drawing it."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    if output_len is not None and output_len < 1:
        raise ValueError(f"output_len must be >= 1, got {output_len}")
    tokens = encode(corpus if corpus is not None else english_corpus())
    if not tokens:
        raise ValueError("the corpus has no tokens")
    rng = random.Random(seed + 1)  # offsets: independent of the lengths' stream
    requests = []
    for prompt_len, drawn_out in sharegpt_like_lengths(num_prompts, seed, max_len):
        start = rng.randrange(len(tokens))
        ids = tokens[start:] + tokens * (prompt_len // len(tokens) + 1)  # wraps around
        requests.append(SampleRequest(ids[:prompt_len], output_len or drawn_out))
    return requests


def english_corpus() -> str:
    """Real English prose on this machine, whitespace collapsed: the Python documentation's
    topic pages (the stdlib's `pydoc_data`), else the licences in /usr/share/common-licenses."""
    texts: list[str] = []
    try:
        from pydoc_data.topics import topics

        texts = [topics[k] for k in sorted(topics)]
    except ImportError:  # a Python built without its docs
        licenses = Path("/usr/share/common-licenses")
        if licenses.is_dir():
            texts = [
                p.read_text(errors="replace") for p in sorted(licenses.iterdir()) if p.is_file()
            ]
    text = re.sub(r"\s+", " ", " ".join(texts)).strip()
    if not text:
        raise RuntimeError("no English text found on this machine (pydoc_data, common-licenses)")
    return text


def file_requests(
    path: str | Path, encode: Encode, output_len: int, num_prompts: int | None = None
) -> list[SampleRequest]:
    """Requests from a JSON list; each entry is a prompt string, a list of token ids, or
    an object with "prompt" or "prompt_token_ids" and optionally "output_len" (else
    `output_len`). Takes the first `num_prompts` entries when given."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the dataset file {path}: {e}") from e
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty JSON list of prompts")
    if num_prompts is not None:
        entries = entries[:num_prompts]
    return [_file_entry(entry, i, encode, output_len, path) for i, entry in enumerate(entries)]


def _file_entry(
    entry: object, i: int, encode: Encode, output_len: int, path: object
) -> SampleRequest:
    where = f"{path}: entry {i}"
    n_out = output_len
    if isinstance(entry, dict):
        n_out = entry.get("output_len", output_len)
        if isinstance(n_out, bool) or not isinstance(n_out, int) or n_out < 1:
            raise ValueError(f"{where}: output_len must be a positive integer, got {n_out!r}")
        if "prompt_token_ids" in entry:
            entry = entry["prompt_token_ids"]
        elif "prompt" in entry:
            entry = entry["prompt"]
        else:
            raise ValueError(f"{where}: an object needs 'prompt' or 'prompt_token_ids'")
    if isinstance(entry, str):
        ids = encode(entry)
    elif isinstance(entry, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in entry
    ):
        ids = list(entry)
    else:
        raise ValueError(f"{where}: a prompt must be a string or a list of token ids")
    if not ids:
        raise ValueError(f"{where}: the prompt is empty")
    return SampleRequest(ids, n_out)


def total_lengths(requests: Sequence[SampleRequest]) -> tuple[int, int]:
    """(prompt tokens, output tokens asked for) over all requests."""
    return sum(r.prompt_len for r in requests), sum(r.output_len for r in requests)


def add_dataset_args(group: argparse._ActionsContainer) -> None:
    """The workload flags `bench throughput` and `bench serve` share (their `--seed` is
    each command's own)."""
    group.add_argument(
        "--dataset", choices=DATASETS, default="random", help="where prompts come from"
    )
    group.add_argument("--num-prompts", type=int, default=100, help="number of requests")
    group.add_argument(
        "--input-len", type=int, default=128, help="random: prompt tokens (after the prefix)"
    )
    group.add_argument(
        "--output-len",
        type=int,
        default=128,
        help="random: tokens to generate; file: for entries without their own output_len",
    )
    group.add_argument(
        "--range-ratio",
        type=float,
        default=0.0,
        help="random: draw lengths uniformly within ± this fraction of --input-len/--output-len",
    )
    group.add_argument(
        "--prefix-len", type=int, default=0, help="random: tokens of a prefix every prompt shares"
    )
    group.add_argument("--dataset-path", default=None, help="file: a JSON list of prompts")
    group.add_argument(
        "--sharegpt-output-len",
        type=int,
        default=None,
        help="sharegpt-like: generate this many tokens for every request instead of drawing it",
    )


def build_requests(
    args: argparse.Namespace, tokenizer: Any, vocab_size: int, max_len: int | None
) -> list[SampleRequest]:
    """The dataset the flags of `add_dataset_args` describe, seeded by `args.seed`; every
    request checked against the vocabulary and, when known, the model's length limit."""
    if args.dataset == "random":
        requests = random_requests(
            args.num_prompts,
            args.input_len,
            args.output_len,
            vocab_size,
            args.range_ratio,
            args.prefix_len,
            args.seed,
            set(tokenizer.hf.all_special_ids),
        )
    elif args.dataset == "sharegpt-like":
        requests = sharegpt_like_requests(
            args.num_prompts,
            lambda text: tokenizer.encode(text, add_special_tokens=False),
            args.seed,
            min(SHAREGPT_MAX_LEN, max_len or SHAREGPT_MAX_LEN),
            args.sharegpt_output_len,
        )
    else:
        requests = file_requests(
            args.dataset_path, tokenizer.encode, args.output_len, args.num_prompts
        )
    for i, r in enumerate(requests):
        if max(r.prompt_token_ids) >= vocab_size:
            raise ValueError(f"request {i}: token ids must be below the vocabulary ({vocab_size})")
        if max_len is not None and r.prompt_len + r.output_len > max_len:
            raise ValueError(
                f"request {i}: prompt ({r.prompt_len}) plus output ({r.output_len}) tokens "
                f"exceed max_model_len ({max_len})"
            )
    return requests
