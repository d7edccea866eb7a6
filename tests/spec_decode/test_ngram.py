"""The n-gram proposer: longest suffix first, latest earlier occurrence, at most k tokens,
and a per-request back-off while drafts keep missing."""

from __future__ import annotations

import pytest

from pagedllm.config import EngineArgs, SpeculativeConfig
from pagedllm.spec_decode import NgramProposer, SpecDecodeStats
from tests.core.utils import make_request


def proposer(k: int = 4, lo: int = 2, hi: int = 4) -> NgramProposer:
    return NgramProposer(SpeculativeConfig("ngram", k, lo, hi))


def test_drafts_continue_the_latest_earlier_occurrence_of_the_longest_suffix():
    p = proposer(k=3)
    # suffix [7, 8, 9] occurs at 0 (then 1, 2) and at 5 (then 4, 4): the latest wins
    assert p.lookup([7, 8, 9, 1, 2, 7, 8, 9, 4, 4, 6, 7, 8, 9]) == [4, 4, 6]
    # the 4-token suffix [5, 7, 8, 9] matches only the first occurrence: longest first
    assert p.lookup([5, 7, 8, 9, 1, 2, 7, 8, 9, 3, 5, 7, 8, 9]) == [1, 2, 7]
    assert p.lookup([1, 2, 3, 1, 2]) == [3, 1, 2]  # a continuation may run into the suffix
    assert p.lookup([1, 2, 3, 4, 5]) == []  # nothing repeats
    assert p.lookup([1, 2]) == []  # shorter than prompt_lookup_min + 1
    assert proposer(k=2, lo=1, hi=1).lookup([4, 1, 2, 9, 9, 4]) == [1, 2]


def test_only_decoding_requests_get_drafts_and_misses_back_off():
    p = proposer(k=2)
    request = make_request("a", [1, 2, 3, 1, 2], 10)
    request.num_computed_tokens = 2  # mid-prefill
    p.propose([request])
    assert request.spec_token_ids == []
    request.num_computed_tokens = 4
    p.propose([request])
    assert request.spec_token_ids == [3, 1]
    # two verified steps with nothing accepted: skip 1 step, then 2
    p.observe("a", 2, 0)
    request.spec_token_ids = []
    p.propose([request])
    assert request.spec_token_ids == []
    p.propose([request])
    assert request.spec_token_ids == [3, 1]
    p.observe("a", 2, 0)
    for _ in range(2):
        request.spec_token_ids = []
        p.propose([request])
        assert request.spec_token_ids == []
    p.propose([request])
    assert request.spec_token_ids == [3, 1]
    p.observe("a", 2, 1)  # a hit resets the back-off
    p.observe("a", 2, 0)
    request.spec_token_ids = []
    p.propose([request])
    p.propose([request])
    assert request.spec_token_ids == [3, 1]
    p.release(["a"])
    assert not p.live_request_ids()


def test_an_embedding_request_gets_no_drafts():
    """It samples nothing, so nothing can verify drafts after its last prompt token."""
    request = make_request("e", [1, 2, 3, 1, 2], 10)
    request.pooling = "mean"
    request.num_computed_tokens = 4
    proposer(k=2).propose([request])
    assert request.spec_token_ids == []


def test_stats_count_acceptance_per_position():
    stats = SpecDecodeStats()
    stats.observe(3, 2)
    stats.observe(4, 0)
    stats.observe(0, 0)  # a step without drafts is not a draft
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (2, 7, 2)
    assert stats.accepted_per_position == [1, 1, 0, 0]
    assert stats.acceptance_rate == pytest.approx(2 / 7)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{"method": "eagle"}', "method must be one of"),
        ("{not json", "not JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"num_speculative_tokens": 2}', "method required"),
        ('{"method": "ngram", "k": 2}', "takes"),
        ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens"),
        ('{"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 2}', "is more than"),
    ],
)
def test_a_bad_speculative_config_names_the_problem(value, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(speculative_config=value)


def test_the_config_comes_as_json_or_a_dict():
    as_json = EngineArgs(speculative_config='{"method": "ngram", "num_speculative_tokens": 3}')
    as_dict = EngineArgs(speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    assert as_json.speculative == as_dict.speculative == SpeculativeConfig("ngram", 3)
    assert EngineArgs().speculative is None
