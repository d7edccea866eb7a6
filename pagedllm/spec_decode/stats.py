"""Counters of speculative decoding, as vLLM names them: drafts, draft tokens, accepted
tokens, and accepted tokens per draft position."""

from __future__ import annotations

from dataclasses import dataclass, field

# get_metrics() key prefix of the accepted-token count at draft position i (0-based)
ACCEPTED_PER_POSITION = "spec_decode_num_accepted_tokens_per_pos_"


@dataclass
class SpecDecodeStats:
    num_drafts: int = 0  # verified steps that carried drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def observe(self, num_drafts: int, num_accepted: int) -> None:
        if num_drafts == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_position) < num_drafts:
            self.accepted_per_position += [0] * (num_drafts - len(self.accepted_per_position))
        for i in range(num_accepted):
            self.accepted_per_position[i] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0
