import pytest

from pagedllm.sampling_params import BeamSearchParams, SamplingParams

BAD_VALUES = [
    ("n", 0),
    ("n", 1.5),
    ("temperature", -0.1),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("temperature", "hot"),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_k", -2),
    ("top_k", 2.0),
    ("min_p", -0.1),
    ("min_p", 1.1),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.5),
    ("frequency_penalty", 2.5),
    ("frequency_penalty", -2.5),
    ("seed", 1.0),
    ("seed", 2**64),
    ("seed", -(2**63) - 1),
    ("max_tokens", 0),
    ("min_tokens", -1),
    ("stop", [""]),
    ("stop", [3]),
    ("stop", 3),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", ["a"]),
    ("stop_token_ids", 7),
    ("logprobs", -1),
    ("logprobs", 21),
    ("prompt_logprobs", 21),
    ("logit_bias", {-1: 1.0}),
    ("logit_bias", {1: 101.0}),
    ("logit_bias", {1: "x"}),
    ("logit_bias", {"abc": 1.0}),
    ("logit_bias", {1.5: 1.0}),
    ("logit_bias", [1, 2]),
    ("include_stop_str_in_output", "yes"),
    ("ignore_eos", 1),
    ("skip_special_tokens", None),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_bad_field_raises_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)


def test_defaults_are_valid_and_random():
    params = SamplingParams()
    assert not params.greedy
    assert params.stop == [] and params.stop_token_ids == []


def test_normalisation():
    params = SamplingParams(
        temperature=0, top_k=-1, stop="###", logit_bias={"5": 2, 7: -1.5}, seed=-1
    )
    assert params.greedy
    assert params.top_k == 0
    assert params.stop == ["###"]
    assert params.logit_bias == {5: 2.0, 7: -1.5}


def test_clone_revalidates():
    params = SamplingParams(temperature=0.5)
    assert params.clone(top_k=3).top_k == 3
    with pytest.raises(ValueError, match="top_k"):
        params.clone(top_k=-5)


def test_beam_search_params_validated():
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens"):
        BeamSearchParams(beam_width=2, max_tokens=0)


@pytest.mark.parametrize(
    ("field", "at_cap", "over_cap"),
    [
        ("stop", ["x"] * 32, ["x"] * 33),
        ("stop", ["x" * 512], ["x" * 513]),
        ("stop_token_ids", list(range(256)), list(range(257))),
        ("logit_bias", {i: 1.0 for i in range(300)}, {i: 1.0 for i in range(301)}),
    ],
)
def test_fields_walked_every_step_are_capped(field, at_cap, over_cap):
    SamplingParams(**{field: at_cap})
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**{field: over_cap})


def test_ids_past_the_vocabulary_are_dropped_once_at_intake():
    params = SamplingParams(logit_bias={3: 1.0, 99: 2.0}, stop_token_ids=[1, 100])
    kept = params.within_vocabulary(50)
    assert kept.logit_bias == {3: 1.0} and kept.stop_token_ids == [1]
    inside = SamplingParams(logit_bias={3: 1.0})
    assert inside.within_vocabulary(50) is inside
