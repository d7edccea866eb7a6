"""Beam selection on hand-made logprobs: survivors, pruning, the finished pool, scores."""

import math

import pytest

from pagedllm.sample.beam_search import BeamSearchState, Survivor, beam_score

EOS = 0
LN = math.log


def test_score_divides_by_generated_length_without_eos():
    assert beam_score(4, -2.0, 1.0) == pytest.approx(-0.5)
    assert beam_score(5, -2.0, 1.0, ends_with_eos=True) == pytest.approx(-0.5)
    assert beam_score(4, -2.0, 0.5) == pytest.approx(-1.0)
    assert beam_score(4, -2.0, 0.0) == pytest.approx(-2.0)
    assert beam_score(1, -3.0, 2.0, ends_with_eos=True) == pytest.approx(-3.0)  # length >= 1


def test_first_step_keeps_the_best_beam_width_tokens():
    state = BeamSearchState(beam_width=2, max_tokens=5, eos_token_id=EOS)
    survivors = state.step([([7, 8, 9, 10], [LN(0.5), LN(0.3), LN(0.1), LN(0.05)])])
    assert survivors == [Survivor(0, 7, LN(0.5)), Survivor(0, 8, LN(0.3))]
    assert [b.token_ids for b in state.live] == [[7], [8]]
    assert state.finished == []


def test_a_beam_can_take_every_slot_and_the_other_is_pruned():
    state = BeamSearchState(beam_width=2, max_tokens=5, eos_token_id=EOS)
    state.step([([7, 8], [-1.0, -2.0])])
    # beam [7] (cum -1) continues twice; beam [8] (cum -2) loses both its candidates
    survivors = state.step(
        [([3, 4, 5, 6], [-0.1, -0.2, -3, -4]), ([3, 4, 5, 6], [-0.5, -0.6, -5, -6])]
    )
    assert [(s.parent, s.token_id) for s in survivors] == [(0, 3), (0, 4)]
    assert [b.token_ids for b in state.live] == [[7, 3], [7, 4]]
    assert [b.cum_logprob for b in state.live] == pytest.approx([-1.1, -1.2])


def test_only_two_beam_width_candidates_per_beam_count():
    state = BeamSearchState(beam_width=1, max_tokens=5, eos_token_id=EOS)
    # the third candidate is past 2 * beam_width: even an EOS there is ignored
    state.step([([5, 6, EOS], [-1.0, -2.0, -0.5])])
    assert [b.token_ids for b in state.live] == [[5]]
    assert state.finished == []


def test_eos_goes_to_the_finished_pool_and_does_not_take_a_live_slot():
    state = BeamSearchState(beam_width=2, max_tokens=5, eos_token_id=EOS)
    survivors = state.step([([EOS, 5, 6, 7], [-0.1, -1.0, -2.0, -3.0])])
    assert [s.token_id for s in survivors] == [5, 6]
    (done,) = state.finished
    assert done.token_ids == [EOS] and done.finish_reason == "stop"
    assert done.score == pytest.approx(-0.1)  # length 0 counts as 1


def test_ignore_eos_treats_eos_as_any_token():
    state = BeamSearchState(beam_width=2, max_tokens=5, ignore_eos=True, eos_token_id=EOS)
    survivors = state.step([([EOS, 5, 6, 7], [-0.1, -1.0, -2.0, -3.0])])
    assert [s.token_id for s in survivors] == [EOS, 5]
    assert state.finished == []


def test_max_tokens_finishes_every_live_beam():
    state = BeamSearchState(beam_width=2, max_tokens=2, eos_token_id=EOS)
    state.step([([1, 2], [-1.0, -1.5])])
    assert not state.done
    survivors = state.step([([3, 4, 5, 6], [-0.2, -3, -4, -5]), ([3, 4, 5, 6], [-0.1, -3, -4, -5])])
    assert len(survivors) == 2
    assert state.done and state.live == []
    assert [b.token_ids for b in state.best()] == [[1, 3], [2, 3]]
    assert all(b.finish_reason == "length" for b in state.best())


def test_length_penalty_decides_between_short_and_long_finished_beams():
    def search(length_penalty):
        state = BeamSearchState(2, 3, length_penalty=length_penalty, eos_token_id=EOS)
        state.step([([1, 2], [-1.0, -1.2])])
        # [1] ends at once (score -1.5 / 1); [2] runs on to 3 tokens at cum -3.0
        state.step([([EOS, 9, 8, 7], [-0.5, -9, -9, -9]), ([3, 4, 5, 6], [-0.9, -0.95, -9, -9])])
        state.step([([5, 6, 7, 8], [-0.9, -9, -9, -9]), ([5, 6, 7, 8], [-0.9, -9, -9, -9])])
        assert state.done
        return state.best()

    short, long_ = [1, EOS], [2, 3, 5]
    by_sum = search(0.0)  # cum logprob alone: the short beam wins
    assert by_sum[0].token_ids == short and by_sum[0].score == pytest.approx(-1.5)
    by_mean = search(1.0)  # per token: -1.5 / 1 against -3.0 / 3
    assert by_mean[0].token_ids == long_ and by_mean[0].score == pytest.approx(-1.0)
    assert [b.score for b in by_mean] == sorted((b.score for b in by_mean), reverse=True)


def test_finished_pool_keeps_only_the_best_beam_width():
    state = BeamSearchState(beam_width=2, max_tokens=3, eos_token_id=EOS)
    state.step([([1, 2], [-1.0, -2.0])])
    state.step([([EOS, 3, 4, 5], [-1.0, -3, -4, -5]), ([EOS, 3, 4, 5], [-0.1, -3, -4, -5])])
    # pool: [1, EOS] at -2.0 and [2, EOS] at -2.1
    # the length-capped beams and the new EOS beams all score below -2.1
    state.step([([EOS, 6, 7, 8], [-5.0, -9, -9, -9]), ([EOS, 6, 7, 8], [-5.0, -9, -9, -9])])
    best = state.best()
    assert len(best) == 2
    assert [b.token_ids for b in best] == [[1, EOS], [2, EOS]]


def test_search_ends_early_when_no_beam_is_left_alive():
    state = BeamSearchState(beam_width=1, max_tokens=10, eos_token_id=EOS)
    assert state.step([([EOS], [0.0])]) == []
    assert state.done
    assert [b.token_ids for b in state.best()] == [[EOS]]


def test_candidates_must_match_the_live_beams():
    state = BeamSearchState(beam_width=2, max_tokens=3)
    with pytest.raises(ValueError, match="candidates for 2 beams"):
        state.step([([1], [0.0]), ([2], [0.0])])


def test_end_of_turn_tokens_end_a_beam_as_eos_does():
    end_of_turn = 7
    state = BeamSearchState(2, 5, eos_token_id=EOS, end_of_turn_ids=[end_of_turn])
    state.step([([end_of_turn, 1, 2, 3], [-0.1, -1.0, -2.0, -3.0])])
    assert [b.token_ids for b in state.finished] == [[end_of_turn]]
    assert state.finished[0].finish_reason == "stop"
    assert [b.token_ids for b in state.live] == [[1], [2]]
    ignoring = BeamSearchState(2, 5, ignore_eos=True, eos_token_id=EOS, end_of_turn_ids=[7])
    ignoring.step([([end_of_turn, 1, 2, 3], [-0.1, -1.0, -2.0, -3.0])])
    assert not ignoring.finished and [b.token_ids for b in ignoring.live] == [[7], [1]]


class _SearchToTheEnd(BeamSearchState):
    def _cannot_improve(self, live):
        return False


@pytest.mark.parametrize("length_penalty", [0.0, 0.5, 1.0, 2.0, -0.5])
def test_stopping_early_never_changes_the_answer(length_penalty):
    import random

    stopped_early = 0
    for trial in range(200):
        rng = random.Random(trial)
        width, max_tokens = rng.randint(1, 3), rng.randint(2, 12)

        def candidates(tokens, k=2 * width, rng_seed=trial):
            r = random.Random(f"{rng_seed}:{tokens}")
            weights = [r.random() ** 3 for _ in range(6)]
            weights[EOS] *= 4  # ends are common, so the pool fills before max_tokens
            total = sum(weights)
            ranked = sorted(range(6), key=lambda t: -weights[t])[:k]
            return ranked, [math.log(weights[t] / total) for t in ranked]

        results, steps = [], []
        for cls in (BeamSearchState, _SearchToTheEnd):
            state = cls(width, max_tokens, length_penalty, eos_token_id=EOS)
            n = 0
            while not state.done:
                state.step([candidates(tuple(b.token_ids)) for b in state.live])
                n += 1
            results.append([(b.token_ids, b.cum_logprob, b.score) for b in state.best()])
            steps.append(n)
        assert results[0] == results[1], trial
        stopped_early += steps[0] < steps[1]
    assert stopped_early > 0 if length_penalty >= 0 else stopped_early == 0
