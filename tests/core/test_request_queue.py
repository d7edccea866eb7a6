"""Waiting-queue order under the FCFS and priority policies."""

import pytest

from pagedllm.core.request_queue import FCFSQueue, PriorityQueue, make_request_queue
from tests.core.utils import make_request


def test_fcfs_keeps_arrival_order_and_puts_preempted_first():
    queue = make_request_queue("fcfs")
    assert isinstance(queue, FCFSQueue)
    a, b, c = (make_request(x, 3) for x in "abc")
    queue.add(a)
    queue.add(b)
    queue.prepend(c)
    assert [r.request_id for r in queue] == ["c", "a", "b"]
    queue.remove(a)
    assert queue.peek() is c and queue.pop() is c and queue.pop() is b
    assert len(queue) == 0


def test_priority_serves_lowest_value_then_earliest_arrival():
    queue = make_request_queue("priority")
    assert isinstance(queue, PriorityQueue)
    late_urgent = make_request("late_urgent", 3, priority=0, arrival_time=5.0)
    early = make_request("early", 3, priority=1, arrival_time=1.0)
    later = make_request("later", 3, priority=1, arrival_time=2.0)
    for r in (later, early, late_urgent):
        queue.add(r)
    assert [r.request_id for r in queue] == ["late_urgent", "early", "later"]
    queue.remove(early)
    assert len(queue) == 2
    assert queue.pop() is late_urgent
    # A preempted request goes back ahead of everything that arrived after it.
    queue.prepend(early)
    assert queue.peek() is early


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="policy"):
        make_request_queue("lifo")
