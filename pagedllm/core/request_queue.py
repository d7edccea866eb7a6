"""The waiting queue, in the order the scheduling policy admits requests.

FCFS keeps arrival order, with preempted requests put back at the head. The
priority policy serves the lowest ``(priority, arrival_time)`` first; a preempted
request keeps its key, so it goes back ahead of everything that arrived after it.
"""

from __future__ import annotations

import abc
import heapq
import itertools
from collections import deque
from collections.abc import Iterator

from pagedllm.request import Request


class RequestQueue(abc.ABC):
    """What the scheduler needs from a waiting queue."""

    @abc.abstractmethod
    def add(self, request: Request) -> None:
        """Queue a new arrival."""

    @abc.abstractmethod
    def prepend(self, request: Request) -> None:
        """Put a preempted request back where it will be admitted soonest."""

    @abc.abstractmethod
    def peek(self) -> Request:
        """The request to admit next."""

    @abc.abstractmethod
    def pop(self) -> Request:
        """Take the request to admit next."""

    @abc.abstractmethod
    def remove(self, request: Request) -> None:
        """Take out a request wherever it is (an abort)."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of requests waiting."""

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Request]:
        """The requests in admission order."""


class FCFSQueue(RequestQueue):
    """First come, first served."""

    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def prepend(self, request: Request) -> None:
        self._queue.appendleft(request)

    def peek(self) -> Request:
        return self._queue[0]

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)


class PriorityQueue(RequestQueue):
    """Lowest ``priority`` value first, then earliest arrival, then insertion order."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Request]] = []
        self._counter = itertools.count()

    def add(self, request: Request) -> None:
        key = (request.priority, request.arrival_time, next(self._counter), request)
        heapq.heappush(self._heap, key)

    prepend = add  # the key already places a preempted request ahead of later arrivals

    def peek(self) -> Request:
        return self._heap[0][3]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3]

    def remove(self, request: Request) -> None:
        # Aborts are rare; an O(n) rebuild keeps the heap simple.
        self._heap = [entry for entry in self._heap if entry[3] is not request]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (entry[3] for entry in sorted(self._heap))


def make_request_queue(policy: str) -> RequestQueue:
    """The waiting queue for a scheduling policy ("fcfs" or "priority")."""
    if policy == "priority":
        return PriorityQueue()
    if policy == "fcfs":
        return FCFSQueue()
    raise ValueError(f"policy must be 'fcfs' or 'priority', got {policy!r}")
