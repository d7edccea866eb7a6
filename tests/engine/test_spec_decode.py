"""Speculative decoding (n-gram; a draft model in test_draft_model.py) in the engine, on the default model: greedy outputs equal
to plain decoding, every sampling field keeping its meaning on the verified path, the
output distribution unchanged (a chi-square test that a biased verifier fails), and the
counters."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.model.loader import resolve_model_path
from pagedllm.sampling_params import BeamSearchParams
from pagedllm.worker import model_runner
from tests.conftest import ENGLISH

pytestmark = pytest.mark.slow

DEFAULT_MODEL = str(resolve_model_path(None))
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2}
COPY = f"Repeat the passage word for word.\n\n{ENGLISH}\n\nThe passage again:\n\n"
PROMPTS = [COPY, "Paris is the capital of", "def fibonacci(n):", "1, 2, 3, 4,"]
GREEDY = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)


@pytest.fixture(scope="module")
def plain():
    return LLM(seed=0)


@pytest.fixture(scope="module")
def spec():
    return LLM(seed=0, speculative_config=NGRAM)


def tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_greedy_output_is_plain_decodings_alone_and_batched(plain, spec):
    """Verification rows are decode rows: the same kernels compute each position as a
    plain step would (batched here within the 16 rows of the one-call layers; a batch's
    own prefill rounds apart from a lone one's, so alone is compared with alone)."""
    before = spec.get_metrics()
    for prompt in PROMPTS:
        assert tokens(spec, [prompt], GREEDY) == tokens(plain, [prompt], GREEDY), prompt[:30]
    assert tokens(spec, PROMPTS[:3], GREEDY) == tokens(plain, PROMPTS[:3], GREEDY)
    m = spec.get_metrics()
    drafted = m["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"]
    accepted = m["spec_decode_num_accepted_tokens"] - before["spec_decode_num_accepted_tokens"]
    assert m["spec_decode_num_drafts"] > 0 and accepted > max(20, 0.25 * drafted)
    assert m["num_free_kv_blocks"] == m["num_kv_blocks"]


def test_exact_path_greedy_output_is_plain_decodings_with_64_prompts():
    prompts = PROMPTS + [ENGLISH[i : i + 200] + ENGLISH[i : i + 60] for i in range(0, 180, 3)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = tokens(LLM(seed=0, exact_matmul=True), prompts, params)
    got = tokens(LLM(seed=0, exact_matmul=True, speculative_config=NGRAM), prompts, params)
    same = sum(g == e for g, e in zip(got, expected, strict=True))
    assert same >= len(prompts) - 1, same  # float32 tiles of other sizes may round one apart


def test_stop_tokens_and_max_tokens_inside_a_draft_end_the_output_there(plain, spec):
    [want] = tokens(plain, [COPY], GREEDY)
    stop_at = want[10]
    params = GREEDY.clone(stop_token_ids=[stop_at])
    [out] = spec.generate(COPY, params, use_tqdm=False)
    cut = want.index(stop_at)
    assert out.outputs[0].token_ids == want[: cut + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_at
    for n in (1, 5, 7):
        [out] = spec.generate(COPY, GREEDY.clone(max_tokens=n), use_tqdm=False)
        assert out.outputs[0].token_ids == want[:n]
        assert out.outputs[0].finish_reason == "length"
    m = spec.get_metrics()
    assert m["num_free_kv_blocks"] == m["num_kv_blocks"]


def test_sampling_fields_keep_their_meaning_on_the_verified_path(plain, spec):
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=32, logprobs=2)
    first, second = spec.generate([COPY, COPY], seeded, use_tqdm=False)
    assert first.outputs[0].token_ids == second.outputs[0].token_ids  # the seed rules
    sample = first.outputs[0]
    assert len(sample.logprobs) == len(sample.token_ids)
    assert all(t in entry for t, entry in zip(sample.token_ids, sample.logprobs, strict=True))
    # penalties and logit_bias see the drafts before each position as output: the same
    # greedy tokens as plain decoding
    edited = GREEDY.clone(presence_penalty=0.5, repetition_penalty=1.2, logit_bias={198: -5})
    assert tokens(spec, [COPY], edited) == tokens(plain, [COPY], edited)


def test_beam_search_refuses_speculation(spec):
    with pytest.raises(ValueError, match="speculative decoding"):
        spec.beam_search(["Hello"], BeamSearchParams(beam_width=2, max_tokens=4))


# ------------------------------------------------------------------- distribution

PATTERN = "1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,"
SAMPLES = 2000


def first_tokens(llm: LLM, num: int = SAMPLES) -> Counter:
    params = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True)
    outs = llm.generate([PATTERN] * num, params, use_tqdm=False)
    return Counter(tuple(o.outputs[0].token_ids) for o in outs)


def homogeneity_p_value(a: Counter, b: Counter) -> float:
    """Chi-square test that two samples come from one distribution (categories with
    fewer than 10 expected draws pooled into one)."""
    keys = sorted(set(a) | set(b), key=lambda k: -(a[k] + b[k]))
    rows, rest = [], [0, 0]
    for k in keys:
        if a[k] + b[k] >= 20:
            rows.append([a[k], b[k]])
        else:
            rest[0] += a[k]
            rest[1] += b[k]
    if sum(rest):
        rows.append(rest)
    table = torch.tensor(rows, dtype=torch.float64)
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    df = len(rows) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2), torch.tensor(statistic / 2)))


@pytest.fixture(scope="module")
def plain_sample(plain):
    return first_tokens(plain)


def test_speculation_keeps_the_sampling_distribution(spec, plain_sample):
    before = spec.get_metrics()["spec_decode_num_accepted_tokens"]
    sample = first_tokens(spec)
    assert spec.get_metrics()["spec_decode_num_accepted_tokens"] > before + SAMPLES // 4
    assert homogeneity_p_value(plain_sample, sample) > 0.01


def test_a_draft_model_keeps_the_sampling_distribution(plain_sample):
    """The draft's greedy token is one token with certainty: the target's draw decides.
    (Half the n-gram test's draws: the draft model doubles each step's cost, and the
    verifier is the same code, whose power the test below shows on the full sample.)"""
    spec = LLM(seed=1, speculative_config={"method": "draft_model", "model": DEFAULT_MODEL})
    sample = first_tokens(spec, SAMPLES // 2)
    assert spec.get_metrics()["spec_decode_num_accepted_tokens"] > SAMPLES // 8
    assert homogeneity_p_value(plain_sample, sample) > 0.01


def test_the_distribution_check_catches_a_verifier_that_keeps_every_draft(
    spec, plain_sample, monkeypatch
):
    monkeypatch.setattr(model_runner, "verify_draft", lambda sampled, draft: (draft, True))
    assert homogeneity_p_value(plain_sample, first_tokens(spec)) < 0.01
    assert not math.isnan(homogeneity_p_value(plain_sample, plain_sample))


def test_parallel_samples_and_preemption_run_with_drafts(plain, spec):
    """n > 1 children draft on their own; a pool too small for the batch preempts
    requests mid-speculation and resumes them; nothing leaks."""
    [single] = tokens(plain, [COPY], GREEDY)
    [out] = spec.generate(COPY, GREEDY.clone(n=3), use_tqdm=False)
    assert [c.token_ids for c in out.outputs] == [single] * 3
    tight = LLM(seed=0, num_kv_blocks=48, max_num_batched_tokens=256, speculative_config=NGRAM)
    prompts = [COPY[i * 7 :] for i in range(8)]
    outs = tight.generate(prompts, GREEDY, use_tqdm=False)
    m = tight.get_metrics()
    assert m["num_preemptions_total"] > 0 and m["spec_decode_num_accepted_tokens"] > 0
    assert all(len(o.outputs[0].token_ids) == GREEDY.max_tokens for o in outs)
    assert m["num_free_kv_blocks"] == m["num_kv_blocks"] and m["num_requests_running"] == 0
