"""Request state and stop checks."""

import pytest

from pagedllm.request import Request, RequestStatus
from pagedllm.sampling_params import SamplingParams


def make(max_tokens=5, **params) -> Request:
    sp = SamplingParams(max_tokens=max_tokens, **params)
    return Request("r", [1, 2, 3], sp, eos_token_id=2)


def test_token_lists_stay_in_step():
    req = make()
    req.append_output_token_ids(7)
    req.append_output_token_ids([8, 9])
    assert req.output_token_ids == [7, 8, 9]
    assert req.all_token_ids == [1, 2, 3, 7, 8, 9]
    assert (req.num_tokens, req.num_prompt_tokens, req.num_output_tokens) == (6, 3, 3)


def test_prompt_list_is_not_aliased():
    prompt = [1, 2, 3]
    req = Request("r", prompt, SamplingParams())
    req.append_output_token_ids(4)
    assert prompt == [1, 2, 3]


def test_eos_stops_unless_ignored():
    req = make()
    req.append_output_token_ids(2)
    assert req.check_stop(100) and req.status is RequestStatus.FINISHED_STOPPED
    assert req.stop_reason is None and req.status.finish_reason == "stop"
    req = make(ignore_eos=True)
    req.append_output_token_ids(2)
    assert not req.check_stop(100) and req.status is RequestStatus.WAITING


def test_min_tokens_suppresses_eos_and_stop_tokens():
    req = make(min_tokens=2, stop_token_ids=[9])
    req.append_output_token_ids(2)
    assert not req.check_stop(100)
    req.append_output_token_ids(9)
    assert req.check_stop(100) and req.stop_reason == 9


def test_max_tokens_and_context_cap_length():
    req = make(max_tokens=2)
    req.append_output_token_ids(5)
    assert not req.check_stop(100)
    req.append_output_token_ids(5)
    assert req.check_stop(100) and req.status is RequestStatus.FINISHED_LENGTH_CAPPED
    assert req.status.finish_reason == "length"
    req = make(max_tokens=None)
    req.append_output_token_ids(5)
    assert req.check_stop(4)  # 4 tokens fill a 4-token context
    assert req.status is RequestStatus.FINISHED_LENGTH_CAPPED


def test_eos_on_the_last_allowed_token_reports_stop():
    req = make(max_tokens=1)
    req.append_output_token_ids(2)
    assert req.check_stop(100) and req.status is RequestStatus.FINISHED_STOPPED


def test_max_tokens_resolves_against_the_context():
    req = make(max_tokens=None)
    assert req.max_tokens is None
    assert req.resolve_max_tokens(10) == 7 and req.max_tokens == 7
    assert make(max_tokens=4).resolve_max_tokens(10) == 4


@pytest.mark.parametrize(
    ("status", "finished", "reason"),
    [
        (RequestStatus.WAITING, False, None),
        (RequestStatus.RUNNING, False, None),
        (RequestStatus.PREEMPTED, False, None),
        (RequestStatus.FINISHED_ABORTED, True, "abort"),
        (RequestStatus.FINISHED_IGNORED, True, "length"),
    ],
)
def test_status_is_finished(status, finished, reason):
    assert status.is_finished is finished
    assert status.finish_reason == reason


def test_fork_copies_tokens_and_links_the_parent():
    req = make()
    req.append_output_token_ids(7)
    req.num_computed_tokens = 3
    child = req.fork("c", output_token_ids=[8])
    assert child.parent_id == "r" and child.all_token_ids == [1, 2, 3, 8]
    assert child.num_computed_tokens == 3 and child.sampling_params is req.sampling_params
    child.append_output_token_ids(9)
    assert req.output_token_ids == [7]
    same = req.fork("d")
    assert same.output_token_ids == [7] and same.output_token_ids is not req.output_token_ids
    assert not same.is_finished
