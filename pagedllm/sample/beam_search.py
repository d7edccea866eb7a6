"""Beam search as pure selection: which continuations survive a step, and how beams rank.

No model and no KV cache here: a step takes, for every live beam of one prompt, its
top candidates (token ids and their log-probabilities) and says which ``beam_width``
continuations live on and which beams are finished. The engine's driver
(``pagedllm.engine.beam_search``) turns those decisions into forks, appends and aborts.

The algorithm is vLLM's (``LLM.beam_search``):

- each live beam offers its top ``2 * beam_width`` tokens (with one end token, EOS,
  ``beam_width`` others are always left to choose from; a chat model's end-of-turn
  tokens end a beam too, and when every candidate is an end the search stops early);
- a candidate ending in EOS or an end of turn (unless ``ignore_eos``) goes to the
  finished pool; the
  other candidates of all beams compete, and the ``beam_width`` with the highest
  cumulative logprob live on (ties go to the earlier beam, then the likelier token);
- after ``max_tokens`` tokens every live beam is finished; the search stops there,
  or earlier when no beam is left alive or none can beat the finished pool any more
  (an exact bound, so the answer is the same);
- finished beams are ranked by ``score = cum_logprob / length ** length_penalty``.

``length`` counts the generated tokens, not counting a final EOS (as HF transformers
and vLLM leave the EOS out), and is at least 1. vLLM also counts the prompt's tokens
in ``length``; we do not, so that a prompt's length does not change how its answers
rank against each other. With every beam of the same length (``ignore_eos``) the
choice does not change the order.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field


def beam_score(
    num_tokens: int, cum_logprob: float, length_penalty: float, ends_with_eos: bool = False
) -> float:
    """The length-penalised score of a beam with ``num_tokens`` generated tokens."""
    length = max(1, num_tokens - 1 if ends_with_eos else num_tokens)
    return cum_logprob / (length**length_penalty)


@dataclass
class Beam:
    """One hypothesis: the tokens generated so far and their summed logprob."""

    token_ids: list[int] = field(default_factory=list)
    cum_logprob: float = 0.0
    finish_reason: str | None = None  # "stop" (EOS) or "length" once finished
    score: float | None = None  # set when finished


@dataclass(frozen=True)
class Survivor:
    """A continuation that lives on: live beam ``parent`` extended by ``token_id``."""

    parent: int  # index into the live beams the step was given
    token_id: int
    cum_logprob: float


Candidates = tuple[Sequence[int], Sequence[float]]  # (top token ids, their logprobs)


class BeamSearchState:
    """The live beams and the finished pool of one prompt's search."""

    def __init__(
        self,
        beam_width: int,
        max_tokens: int,
        length_penalty: float = 1.0,
        ignore_eos: bool = False,
        eos_token_id: int | None = None,
        end_of_turn_ids: Collection[int] = (),
    ) -> None:
        self.beam_width = beam_width
        self.max_tokens = max_tokens
        self.length_penalty = length_penalty
        # tokens that end a beam as EOS does: a chat model's end of turn too
        ends = {eos_token_id, *end_of_turn_ids} - {None}
        self.end_ids: frozenset[int] = frozenset() if ignore_eos else frozenset(ends)  # type: ignore[arg-type]
        self.live: list[Beam] = [Beam()]
        self.finished: list[Beam] = []  # the best `beam_width` so far, best first

    @property
    def num_candidates(self) -> int:
        """How many top tokens each live beam must offer per step."""
        return 2 * self.beam_width

    @property
    def done(self) -> bool:
        return not self.live

    def step(self, candidates: Sequence[Candidates]) -> list[Survivor]:
        """Advance every live beam by one token; ``candidates[i]`` belongs to live beam i.

        Returns the survivors, best first, and updates ``live`` to match them (empty
        when the search is over) and ``finished`` with the beams that ended.
        """
        if len(candidates) != len(self.live):
            raise ValueError(f"got candidates for {len(candidates)} beams, {len(self.live)} live")
        k = self.num_candidates
        ends = self.end_ids
        growing: list[Survivor] = []
        for i, (beam, (token_ids, logprobs)) in enumerate(zip(self.live, candidates, strict=True)):
            for token_id, logprob in zip(token_ids[:k], logprobs[:k], strict=True):
                cum = beam.cum_logprob + logprob
                if token_id in ends:
                    self._finish(Beam([*beam.token_ids, token_id], cum, "stop"))
                else:
                    growing.append(Survivor(i, token_id, cum))
        # A stable sort keeps the earlier beam, then the likelier token, first on ties.
        growing.sort(key=lambda s: s.cum_logprob, reverse=True)
        survivors = growing[: self.beam_width]
        new_live = [
            Beam([*self.live[s.parent].token_ids, s.token_id], s.cum_logprob) for s in survivors
        ]
        if new_live and len(new_live[0].token_ids) >= self.max_tokens:
            for beam in new_live:
                beam.finish_reason = "length"
                self._finish(beam)
            new_live = []
        if new_live and self._cannot_improve(new_live):
            new_live = []  # what searching on to max_tokens would answer anyway
        self.live = new_live
        return survivors

    def _cannot_improve(self, live: list[Beam]) -> bool:
        """Whether the finished pool is full and no live beam can ever beat its worst.

        A beam's cum logprob only falls as it grows, so with ``length_penalty >= 0`` any
        beam it becomes scores at most ``cum / max_tokens ** length_penalty``: an exact
        bound, so stopping here changes no answer. It ends a chat search at its model's
        last end of turn instead of at ``max_tokens`` (which defaults to the context)."""
        if len(self.finished) < self.beam_width or self.length_penalty < 0:
            return False
        best_cum = max(beam.cum_logprob for beam in live)
        return best_cum / self.max_tokens**self.length_penalty <= self.finished[-1].score

    def _finish(self, beam: Beam) -> None:
        beam.score = beam_score(
            len(beam.token_ids), beam.cum_logprob, self.length_penalty, beam.finish_reason == "stop"
        )
        self.finished.append(beam)
        # Scores never change once finished, so only the best `beam_width` can matter.
        self.finished.sort(key=lambda b: b.score, reverse=True)
        del self.finished[self.beam_width :]

    def best(self) -> list[Beam]:
        """The finished beams, best score first (at most ``beam_width``)."""
        return list(self.finished)
