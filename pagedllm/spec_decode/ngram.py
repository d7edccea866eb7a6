"""Prompt lookup (n-gram) drafts: the tokens that followed the last earlier occurrence of
the sequence's final n tokens, longest n first. Outputs that copy their prompt (edits,
extracts, summaries quoting the source, code) are drafted almost for free."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from pagedllm.config import SpeculativeConfig
from pagedllm.core.sched_output import NewRequestData, SchedulerOutput
from pagedllm.request import Request
from pagedllm.spec_decode.backoff import Backoff
from pagedllm.spec_decode.proposer import decodes_next


class NgramProposer:
    """Drafts up to `num_speculative_tokens` for each decoding request, and backs off
    per request while its drafts keep being rejected (a draft costs a verification row
    even when nothing repeats)."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.k = config.num_speculative_tokens
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max
        self.backoff = Backoff()

    def propose(self, requests: Iterable[Request]) -> None:
        """Set `spec_token_ids` on every request that decodes next step and has a match."""
        for request in requests:
            if decodes_next(request) and self.backoff.ready(request.request_id):
                request.spec_token_ids = self.lookup(request.all_token_ids)

    def lookup(self, tokens: list[int]) -> list[int]:
        """The continuation of the latest earlier occurrence of the longest suffix
        (prompt_lookup_max down to _min tokens), up to k tokens; [] when none."""
        if len(tokens) <= self.min_n:
            return []
        history = np.asarray(tokens, dtype=np.int64)
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            suffix = history[-n:]
            # every window that starts early enough to have a token after it
            windows = sliding_window_view(history[:-1], n)
            starts = np.flatnonzero((windows == suffix).all(axis=1))
            if starts.size:
                first = int(starts[-1]) + n
                return history[first : first + self.k].tolist()
        return []

    def draft(self, sched: SchedulerOutput, requests: Mapping[str, NewRequestData]) -> None:
        """Nothing to fill: n-gram drafts are tokens before scheduling."""

    def observe(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        self.backoff.observe(request_id, num_drafts, num_accepted)

    def release(self, request_ids: Iterable[str]) -> None:
        self.backoff.release(request_ids)

    def live_request_ids(self) -> set[str]:
        return self.backoff.live_request_ids()
