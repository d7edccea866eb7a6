"""Prompt lookup (n-gram) drafts: the tokens that followed the last earlier occurrence of
the sequence's final n tokens, longest n first. Outputs that copy their prompt (edits,
extracts, summaries quoting the source, code) are drafted almost for free."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from pagedllm.config import SpeculativeConfig
from pagedllm.request import Request

MAX_BACKOFF_STEPS = 32


class NgramProposer:
    """Drafts up to `num_speculative_tokens` for each decoding request, and backs off
    per request while its drafts keep being rejected (a draft costs a verification row
    even when nothing repeats)."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.k = config.num_speculative_tokens
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max
        self._misses: dict[str, int] = {}  # drafts rejected in a row, per request
        self._skip: dict[str, int] = {}  # steps left before the next draft

    def propose(self, requests: Iterable[Request]) -> None:
        """Set `spec_token_ids` on every request that decodes next step and has a match."""
        for request in requests:
            tokens = request.all_token_ids
            if request.num_computed_tokens != len(tokens) - 1 or request.is_finished:
                continue  # mid-prefill (or preempted): nothing to draft after
            skip = self._skip.get(request.request_id, 0)
            if skip:
                self._skip[request.request_id] = skip - 1
                continue
            request.spec_token_ids = self.lookup(tokens)

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

    def observe(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        """A verified step's result: a request whose drafts all missed waits 1, 2, 4, …
        steps (up to MAX_BACKOFF_STEPS) before drafting again; any hit resets it."""
        if num_drafts == 0:
            return
        if num_accepted:
            self._misses.pop(request_id, None)
            return
        misses = self._misses.get(request_id, 0) + 1
        self._misses[request_id] = misses
        self._skip[request_id] = min(MAX_BACKOFF_STEPS, 2 ** (misses - 1))

    def release(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self._misses.pop(request_id, None)
            self._skip.pop(request_id, None)
