import pytest
import torch

from pagedllm.sample import (
    RowSamplingState,
    Sampler,
    SamplingMetadata,
    compute_prompt_logprobs,
    seeded_generator,
)
from pagedllm.sampling_params import SamplingParams

V = 32


def make_logits(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, V, generator=torch.Generator().manual_seed(seed)) * 3


def sample(logits, rows, sampler=None):
    meta = SamplingMetadata.from_requests(rows, vocab_size=logits.shape[1], device="cpu")
    return (sampler or Sampler(torch.Generator().manual_seed(0)))(logits, meta)


def row(**params) -> RowSamplingState:
    return RowSamplingState(params=SamplingParams(**params))


def draws(logits_row: torch.Tensor, n: int, **params) -> torch.Tensor:
    """n independent samples from one row, drawn as a batch of n identical rows."""
    logits = logits_row.expand(n, -1).contiguous()
    return sample(logits, [row(**params) for _ in range(n)]).sampled_token_ids


def test_all_greedy_batch_is_argmax():
    logits = make_logits(8)
    out = sample(logits, [row(temperature=0.0) for _ in range(8)])
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.logprobs is None


def test_input_logits_are_not_modified():
    logits = make_logits(4)
    before = logits.clone()
    sample(logits, [row(top_k=3, repetition_penalty=2.0, logit_bias={1: 5.0})] * 4)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("params", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 0.999}])
def test_truncation_to_one_token_equals_greedy(params):
    logits = make_logits(64, seed=1) / 3  # flat enough that plain sampling varies
    out = sample(logits, [row(temperature=1.0, **params) for _ in range(64)])
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    plain = sample(logits, [row(temperature=1.0) for _ in range(64)])
    assert not torch.equal(plain.sampled_token_ids, logits.argmax(-1))


def test_top_k_keeps_only_k_most_likely():
    logits = torch.zeros(1, V)
    logits[0, :5] = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6])
    got = set(draws(logits[0], 2000, top_k=3).tolist())
    assert got == {0, 1, 2}


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.full((V,), -1e9)
    logits[:4] = probs.log()
    assert set(draws(logits, 2000, top_p=0.7).tolist()) == {0, 1}
    assert set(draws(logits, 2000, top_p=0.85).tolist()) == {0, 1, 2}


def test_min_p_drops_unlikely_tokens():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.full((V,), -1e9)
    logits[:4] = probs.log()
    assert set(draws(logits, 2000, min_p=0.2).tolist()) == {0, 1, 2}


def test_logit_bias_bans_and_forces_tokens():
    logits = make_logits(4)
    top = logits.argmax(-1)
    banned = [
        RowSamplingState(params=SamplingParams(temperature=0, logit_bias={int(t): -100}))
        for t in top
    ]
    out = sample(logits, banned).sampled_token_ids
    assert not torch.equal(out, top)
    assert (out != top).all()
    forced = sample(logits, [row(temperature=1.0, logit_bias={7: 100})] * 4)
    assert (forced.sampled_token_ids == 7).all()


def test_repetition_penalty_changes_argmax_of_seen_token():
    logits = torch.zeros(2, V)
    logits[:, 3] = 2.0
    logits[:, 5] = 1.5
    logits[:, 9] = -1.0
    rows = [
        RowSamplingState(SamplingParams(temperature=0, repetition_penalty=2.0), [3, 9], []),
        RowSamplingState(SamplingParams(temperature=0, repetition_penalty=2.0), [1], [3]),
    ]
    assert sample(logits, rows).sampled_token_ids.tolist() == [5, 5]
    unpenalised = [RowSamplingState(SamplingParams(temperature=0), [3], [3])] * 2
    assert sample(logits, unpenalised).sampled_token_ids.tolist() == [3, 3]


def test_repetition_penalty_multiplies_negative_logits():
    # All logits negative: a seen token must get *less* likely, i.e. more negative.
    logits = torch.full((1, V), -5.0)
    logits[0, 3] = -1.0
    logits[0, 4] = -1.5
    rows = [RowSamplingState(SamplingParams(temperature=0, repetition_penalty=2.0), [3], [])]
    assert sample(logits, rows).sampled_token_ids.tolist() == [4]


def test_presence_and_frequency_penalties_use_output_tokens_only():
    logits = torch.zeros(3, V)
    logits[:, 3] = 1.0
    logits[:, 5] = 0.5
    rows = [
        RowSamplingState(SamplingParams(temperature=0, presence_penalty=1.0), [], [3]),
        RowSamplingState(SamplingParams(temperature=0, frequency_penalty=0.3), [], [3, 3]),
        RowSamplingState(SamplingParams(temperature=0, presence_penalty=1.0), [3, 3], []),
    ]
    assert sample(logits, rows).sampled_token_ids.tolist() == [5, 5, 3]
    # One occurrence at frequency 0.3 is not enough to flip 1.0 vs 0.5.
    once = [RowSamplingState(SamplingParams(temperature=0, frequency_penalty=0.3), [], [3])]
    assert sample(logits[:1], once).sampled_token_ids.tolist() == [3]


def test_min_tokens_suppresses_eos_and_stop_tokens():
    logits = torch.zeros(3, V)
    logits[:, 2] = 10.0  # EOS
    logits[:, 6] = 9.0  # a stop token
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[6])
    rows = [
        RowSamplingState(params, [1], [], eos_token_id=2),
        RowSamplingState(params, [1], [4], eos_token_id=2),
        RowSamplingState(params, [1], [4, 4], eos_token_id=2),
    ]
    out = sample(logits, rows).sampled_token_ids.tolist()
    assert out[0] not in (2, 6) and out[1] not in (2, 6)
    assert out[2] == 2


def test_greedy_rows_in_mixed_batch_stay_argmax():
    logits = make_logits(16, seed=3) / 3
    rows = [row(temperature=0.0 if i % 2 else 1.5, top_k=5) for i in range(16)]
    out = sample(logits, rows).sampled_token_ids
    assert torch.equal(out[1::2], logits.argmax(-1)[1::2])
    assert not torch.equal(out[0::2], logits.argmax(-1)[0::2])


def seeded_row(seed: int, **params) -> RowSamplingState:
    return RowSamplingState(
        params=SamplingParams(seed=seed, **params), generator=seeded_generator(seed)
    )


def run_steps(logits: torch.Tensor, make_rows, steps: int, sampler: Sampler) -> list[list[int]]:
    rows = make_rows()
    out = []
    for _ in range(steps):
        out.append(sample(logits, rows, sampler).sampled_token_ids.tolist())
    return out


def test_seeded_row_is_independent_of_batch():
    logits = make_logits(5, seed=4) / 2
    steps = 20

    alone = run_steps(
        logits[2:3], lambda: [seeded_row(1234, top_p=0.9)], steps, Sampler(torch.Generator())
    )
    in_batch = run_steps(
        logits,
        lambda: [
            row(temperature=0.8),
            seeded_row(99),
            seeded_row(1234, top_p=0.9),
            row(temperature=1.2, top_k=4),
            row(temperature=0),
        ],
        steps,
        Sampler(torch.Generator().manual_seed(7)),
    )
    assert [s[0] for s in alone] == [s[2] for s in in_batch]
    # A second, separately created engine's generator of the same seed agrees too.
    again = run_steps(
        logits[2:3], lambda: [seeded_row(1234, top_p=0.9)], steps, Sampler(torch.Generator())
    )
    assert again == alone
    # ...and the seed matters.
    other = run_steps(
        logits[2:3], lambda: [seeded_row(4321, top_p=0.9)], steps, Sampler(torch.Generator())
    )
    assert other != alone


def test_empirical_distribution_matches_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 40_000
    counts = torch.bincount(draws(logits, n, temperature=1.0), minlength=6).double()
    expected = torch.softmax(logits.double(), 0) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 25.0  # 5 degrees of freedom: p < 1e-4 for a correct sampler


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0])
    n = 20_000
    freq = {
        t: float((draws(logits, n, temperature=t) == 0).double().mean()) for t in (0.5, 1.0, 2.0)
    }
    for t, f in freq.items():
        assert abs(f - float(torch.softmax(logits / t, 0)[0])) < 0.02
    assert freq[0.5] > freq[1.0] > freq[2.0]


def test_logprobs_are_raw_log_softmax_with_ranks():
    logits = make_logits(4, seed=5)
    rows = [
        row(temperature=1.0, logprobs=3, repetition_penalty=1.5),
        row(temperature=0, logprobs=1, logit_bias={0: 50.0}),
        row(temperature=2.0),
        row(temperature=1.0, logprobs=0, top_k=10),
    ]
    rows[0].prompt_token_ids = list(range(10))
    out = sample(logits, rows)
    lp = out.logprobs
    raw = torch.log_softmax(logits, -1)
    assert lp.top_ids.shape == (4, 3)
    top_vals, top_ids = raw.topk(3, dim=-1)
    assert torch.equal(lp.top_ids, top_ids)
    assert torch.allclose(lp.top_logprobs, top_vals)
    sampled = out.sampled_token_ids
    assert sampled[1] == 0  # forced by the bias, reported with its raw logprob
    assert torch.allclose(lp.sampled_logprob, raw.gather(1, sampled[:, None]).squeeze(1))
    expected_rank = (raw > raw.gather(1, sampled[:, None])).sum(-1) + 1
    assert torch.equal(lp.sampled_rank, expected_rank)
    order = raw.argsort(-1, descending=True)
    for i in range(4):
        assert order[i, lp.sampled_rank[i] - 1] == sampled[i]


def test_prompt_logprobs_score_next_tokens():
    logits = make_logits(6, seed=6)
    prompt = torch.tensor([4, 8, 15, 16, 23, 42 % V, 7])
    lp = compute_prompt_logprobs(logits, prompt[1:], 2)
    raw = torch.log_softmax(logits, -1)
    assert torch.allclose(lp.sampled_logprob, raw[torch.arange(6), prompt[1:]])
    assert torch.equal(lp.top_ids, raw.topk(2, -1).indices)
    assert lp.tolist()[0][3] == int((raw[0] > raw[0, prompt[1]]).sum()) + 1


def test_out_of_vocab_bias_and_stop_ids_are_ignored():
    logits = make_logits(2)
    rows = [
        RowSamplingState(
            SamplingParams(temperature=0, logit_bias={V + 5: 10.0}, min_tokens=3),
            eos_token_id=V + 1,
        )
    ] * 2
    assert torch.equal(sample(logits, rows).sampled_token_ids, logits.argmax(-1))


def test_top_p_applies_to_what_top_k_kept():
    probs = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1])
    logits = torch.full((V,), -1e9)
    logits[:5] = probs.log()
    # Over the 3 kept tokens the mass is [0.4, 0.33, 0.27]: 0.6 needs two of them
    # (over the full distribution it would need three).
    assert set(draws(logits, 2000, top_k=3, top_p=0.6).tolist()) == {0, 1}
    assert set(draws(logits, 2000, top_k=2, top_p=0.99).tolist()) == {0, 1}


def test_logprobs_zero_reports_only_the_sampled_token():
    logits = make_logits(3)
    out = sample(logits, [row(temperature=0, logprobs=0)] * 3)
    assert out.logprobs.top_ids.shape == (3, 0)
    assert torch.equal(out.logprobs.sampled_rank, torch.ones(3, dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_seeded_mixed_batch_on_cuda():
    device = torch.device("cuda")
    logits = make_logits(4, seed=8).to(device)

    def rows():
        seeded = RowSamplingState(
            SamplingParams(seed=5, top_p=0.9, min_p=0.01, repetition_penalty=1.2),
            [1, 2],
            [3],
            eos_token_id=0,
            generator=seeded_generator(5, device),
        )
        return [
            seeded,
            row(temperature=0, logit_bias={4: 3.0}, logprobs=2),
            row(top_k=3, frequency_penalty=0.5, min_tokens=2),
        ]

    def run(batch_logits, batch_rows):
        meta = SamplingMetadata.from_requests(batch_rows, V, device)
        return Sampler(torch.Generator(device).manual_seed(1))(batch_logits, meta)

    out = run(logits[:3], rows())
    assert out.sampled_token_ids.device.type == "cuda"
    alone = run(logits[:1], rows()[:1])
    assert out.sampled_token_ids[0] == alone.sampled_token_ids[0]


def test_a_constraint_that_allows_only_eos_outranks_min_tokens():
    """A grammar that has matched (regex "") allows EOS alone; min_tokens must not ban
    it too, or no token is left and the draw falls off the vocabulary."""
    logits = make_logits(2)
    params = SamplingParams(min_tokens=3)
    rows = [RowSamplingState(params, [1], [], eos_token_id=2) for _ in range(2)]
    meta = SamplingMetadata.from_requests(rows, vocab_size=V, device="cpu")
    bitmask = torch.zeros(2, (V + 31) // 32, dtype=torch.int32)
    bitmask[0, 0] = 1 << 2  # row 0: EOS only
    bitmask[1, 0] = (1 << 2) | (1 << 7)  # row 1: EOS or token 7
    meta.allowed_bitmask = bitmask
    out = Sampler(torch.Generator().manual_seed(0))(logits, meta).sampled_token_ids.tolist()
    assert out == [2, 7]


def test_greedy_tokens_are_torchs_argmax_with_ties_nans_and_infinities():
    """The numpy argmax the CPU uses picks what torch's does: the first of tied maxima,
    the first NaN, index 0 of a row that is all -inf."""
    from pagedllm.sample.sampler import greedy_tokens

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 49152, generator=generator)
    logits[1, [7, 70, 700]] = 50.0  # ties
    logits[2, [9, 30_000]] = float("nan")
    logits[3] = float("-inf")
    logits[4, 123] = float("inf")
    logits[5] = 0.0
    expected = logits.argmax(dim=-1)
    assert torch.equal(greedy_tokens(logits), expected)
    assert greedy_tokens(logits).tolist() == [int(expected[0]), 7, 9, 0, 123, 0]
    assert torch.equal(greedy_tokens(logits[:, ::2]), logits[:, ::2].argmax(dim=-1))  # strided
    assert greedy_tokens(logits).dtype == torch.int64
