"""Per-request back-off: a request whose drafts keep missing stops paying for them."""

from __future__ import annotations

from collections.abc import Iterable

MAX_BACKOFF_STEPS = 32


class Backoff:
    """A request whose verified drafts all missed waits 1, 2, 4, … steps (up to
    MAX_BACKOFF_STEPS) before drafting again; any accepted draft resets it. A draft costs
    a verification row (and, for a draft model, its forward) even when nothing matches."""

    def __init__(self) -> None:
        self._misses: dict[str, int] = {}  # verified steps in a row with nothing accepted
        self._skip: dict[str, int] = {}  # steps left before the next draft

    def ready(self, request_id: str) -> bool:
        """Whether the request drafts this step (counts down a pending wait)."""
        skip = self._skip.get(request_id, 0)
        if skip:
            self._skip[request_id] = skip - 1
            return False
        return True

    def observe(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
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

    def live_request_ids(self) -> set[str]:
        return set(self._misses) | set(self._skip)
