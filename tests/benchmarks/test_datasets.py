"""Benchmark datasets: seeded, within their length bounds, shared prefixes really shared."""

import json

import pytest

from pagedllm.benchmarks.datasets import (
    SHAREGPT_MAX_PROMPT_LEN,
    english_corpus,
    file_requests,
    random_requests,
    sharegpt_like_lengths,
    sharegpt_like_requests,
    total_lengths,
)

VOCAB = 500
SPECIAL = {0, 1, 2, 3}


def encode(text: str) -> list[int]:
    """A stand-in tokenizer: one id per word, stable across calls."""
    return [sum(map(ord, word)) % VOCAB for word in text.split()]


def test_random_is_reproducible_from_its_seed():
    a = random_requests(8, 32, 16, VOCAB, range_ratio=0.5, prefix_len=8, seed=3)
    b = random_requests(8, 32, 16, VOCAB, range_ratio=0.5, prefix_len=8, seed=3)
    c = random_requests(8, 32, 16, VOCAB, range_ratio=0.5, prefix_len=8, seed=4)
    assert a == b
    assert a != c


def test_random_lengths_stay_within_the_range_ratio():
    reqs = random_requests(200, 40, 20, VOCAB, range_ratio=0.25, prefix_len=5, seed=0)
    inputs = {r.prompt_len - 5 for r in reqs}
    outputs = {r.output_len for r in reqs}
    assert min(inputs) >= 30 and max(inputs) <= 50
    assert min(outputs) >= 15 and max(outputs) <= 25
    assert len(inputs) > 5 and len(outputs) > 5  # lengths really vary


def test_random_without_range_ratio_gives_exact_lengths():
    reqs = random_requests(5, 16, 8, VOCAB, seed=1)
    assert [(r.prompt_len, r.output_len) for r in reqs] == [(16, 8)] * 5
    assert total_lengths(reqs) == (80, 40)


def test_random_prompts_share_exactly_the_prefix():
    reqs = random_requests(6, 24, 4, VOCAB, prefix_len=16, seed=2)
    prefix = reqs[0].prompt_token_ids[:16]
    assert all(r.prompt_token_ids[:16] == prefix for r in reqs)
    tails = {tuple(r.prompt_token_ids[16:]) for r in reqs}
    assert len(tails) == 6  # what follows the prefix is each prompt's own


def test_random_never_draws_special_tokens():
    reqs = random_requests(20, 64, 4, VOCAB, prefix_len=8, seed=0, special_ids=SPECIAL)
    ids = {t for r in reqs for t in r.prompt_token_ids}
    assert not ids & SPECIAL
    assert all(0 <= t < VOCAB for t in ids)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"range_ratio": 1.0}, "range_ratio"),
        ({"prefix_len": -1}, "prefix_len"),
        ({"input_len": 0}, "input_len"),
        ({"num_prompts": 0}, "num_prompts"),
    ],
)
def test_random_rejects_bad_arguments(kwargs, message):
    args = {"num_prompts": 2, "input_len": 8, "output_len": 4, "vocab_size": VOCAB} | kwargs
    with pytest.raises(ValueError, match=message):
        random_requests(**args)


def test_sharegpt_like_lengths_follow_the_shape_and_limits():
    pairs = sharegpt_like_lengths(2000, seed=0, max_len=2048)
    prompts = sorted(p for p, _ in pairs)
    outputs = sorted(o for _, o in pairs)
    assert all(4 <= p <= SHAREGPT_MAX_PROMPT_LEN and p + o <= 2048 and o >= 1 for p, o in pairs)
    assert 80 <= prompts[len(prompts) // 2] <= 120  # median ~100
    assert 160 <= outputs[len(outputs) // 2] <= 240  # median ~200
    assert all(p + o <= 64 for p, o in sharegpt_like_lengths(100, seed=0, max_len=64))


def test_sharegpt_like_prompts_are_runs_of_the_corpus():
    corpus = "the quick brown fox jumps over the lazy dog " * 7
    tokens = encode(corpus)
    reqs = sharegpt_like_requests(20, encode, seed=5, corpus=corpus, max_len=256)
    assert reqs == sharegpt_like_requests(20, encode, seed=5, corpus=corpus, max_len=256)
    doubled = tokens * (256 // len(tokens) + 2)
    for r in reqs:
        n = r.prompt_len
        assert any(doubled[i : i + n] == r.prompt_token_ids for i in range(len(tokens)))
    fixed = sharegpt_like_requests(5, encode, seed=5, corpus=corpus, output_len=7)
    assert {r.output_len for r in fixed} == {7}


def test_english_corpus_is_english_prose():
    text = english_corpus()
    words = text.lower().split()
    assert len(words) > 10_000
    for common in ("the", "and", "of", "is"):
        assert words.count(common) > 100


def test_file_dataset_reads_every_prompt_form(tmp_path):
    path = tmp_path / "prompts.json"
    entries = [
        "hello there world",
        [5, 6, 7],
        {"prompt": "one two", "output_len": 3},
        {"prompt_token_ids": [9, 9], "output_len": 4},
    ]
    path.write_text(json.dumps(entries))
    reqs = file_requests(path, encode, output_len=10)
    assert [r.prompt_token_ids for r in reqs] == [
        encode("hello there world"),
        [5, 6, 7],
        encode("one two"),
        [9, 9],
    ]
    assert [r.output_len for r in reqs] == [10, 10, 3, 4]
    assert len(file_requests(path, encode, output_len=10, num_prompts=2)) == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "cannot read"),
        ("{}", "non-empty JSON list"),
        ('[{"output_len": 3}]', "entry 0: an object needs"),
        ('["ok", {"prompt": "x", "output_len": 0}]', "entry 1: output_len"),
        ('["ok", [1, -2]]', "entry 1: a prompt must be"),
        ('[""]', "entry 0: the prompt is empty"),
    ],
)
def test_file_dataset_errors_name_the_entry(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        file_requests(path, encode, output_len=4)
