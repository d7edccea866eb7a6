"""Random operation sequences against the pool, the manager and the scheduler.

After every operation the invariants of DESIGN.md must hold: free + referenced =
total; reference counts equal the number of block tables holding the block; no
shared block is written in place; at most one partly filled block per sequence;
every block free when nothing is alive; a cached block's hash matches its chain
of tokens (checked against the KV a fake worker actually wrote).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from pagedllm.config import CacheConfig, SchedulerConfig
from pagedllm.core.block_pool import BlockPool
from pagedllm.core.kv_cache_manager import (
    KVCacheManager,
    hash_request_tokens,
    request_extra_keys,
)
from pagedllm.core.scheduler import Scheduler
from pagedllm.request import Request, RequestStatus
from tests.core.fake_worker import FakeWorker
from tests.core.utils import make_request

SETTINGS = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Layer groups' sliding windows (None: full attention), group 0 first: one full group
# (Llama), one sliding group (Mistral), a full group beside sliding ones (Gemma 3).
WINDOWS = st.sampled_from([(None,), (3,), (None, 3), (None, 5, 5), (None, 1)])

# A few shared prompt heads so that prefix hits and shared blocks are common.
HEADS = [[], [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9, 9, 9], [7] * 12]
prompts = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from(HEADS),
    st.lists(st.integers(0, 9), min_size=1, max_size=12),
)


class BlockPoolMachine(RuleBasedStateMachine):
    """Hand out, share, cache and free blocks; the pool must match a plain model."""

    @initialize(num_blocks=st.integers(1, 12), caching=st.booleans())
    def setup(self, num_blocks: int, caching: bool) -> None:
        self.pool = BlockPool(num_blocks, caching)
        self.held: list = []  # one entry per reference we hold

    @rule(n=st.integers(0, 6))
    def allocate(self, n: int) -> None:
        free = self.pool.get_num_free_blocks()
        if n > free:
            try:
                self.pool.get_new_blocks(n)
            except ValueError:
                assert self.pool.get_num_free_blocks() == free
                return
            raise AssertionError("overcommitted the pool")
        blocks = self.pool.get_new_blocks(n)
        assert all(b.block_hash is None and b.ref_cnt == 1 for b in blocks)
        self.held.extend(blocks)

    @rule(data=st.data())
    def free_some(self, data: st.DataObject) -> None:
        if not self.held:
            return
        picks = data.draw(st.lists(st.integers(0, len(self.held) - 1), unique=True))
        blocks = [self.held[i] for i in picks]
        for i in sorted(picks, reverse=True):
            del self.held[i]
        self.pool.free_blocks(blocks)

    @rule(data=st.data())
    def share(self, data: st.DataObject) -> None:
        if not self.held:
            return
        block = data.draw(st.sampled_from(self.held))
        self.pool.touch([block])
        self.held.append(block)

    @rule(data=st.data(), key=st.integers(0, 5))
    def cache(self, data: st.DataObject, key: int) -> None:
        if not self.held:
            return
        block = data.draw(st.sampled_from(self.held))
        self.pool.cache_full_block(block, bytes([key]))

    @rule(key=st.integers(0, 5))
    def hit(self, key: int) -> None:
        block = self.pool.get_cached_block(bytes([key]))
        if block is not None:
            assert block.block_hash == bytes([key])
            self.pool.touch([block])
            self.held.append(block)

    @invariant()
    def consistent(self) -> None:
        self.pool.check_invariants()
        for block in self.pool.blocks:
            assert block.ref_cnt == sum(1 for b in self.held if b is block)

    def teardown(self) -> None:
        self.pool.free_blocks(self.held)
        assert self.pool.get_num_free_blocks() == self.pool.num_blocks


class KVCacheManagerMachine(RuleBasedStateMachine):
    """Sequences grow, fork, get cut off and are freed; KV must always read back."""

    @initialize(
        num_blocks=st.integers(2, 24),
        block_size=st.sampled_from([1, 2, 4]),
        caching=st.booleans(),
        windows=WINDOWS,
    )
    def setup(self, num_blocks: int, block_size: int, caching: bool, windows) -> None:
        self.kv = KVCacheManager(num_blocks, block_size, caching, windows)
        self.windows = windows
        self.size = block_size
        self.slots = [[None] * block_size for _ in range(num_blocks)]
        self.requests: dict[str, Request] = {}
        self.chains: dict[bytes, list[int]] = {}
        self.counter = 0

    def _run(self, request: Request, num_new: int, hit=([], 0)) -> bool:
        """Allocate, copy, write and commit ``num_new`` tokens; False if refused."""
        kv = self.kv
        free_before = kv.get_num_free_blocks()
        held_before = self._held(request.request_id)
        ids = kv.allocate_slots(request, num_new, *hit)
        if ids is None:
            # nothing changed but the blocks a sliding window has left
            assert kv.get_num_free_blocks() >= free_before
            held, lengths = self._held(request.request_id)
            assert held <= held_before[0] and lengths == held_before[1]
            return False
        copies = kv.take_pending_copies()
        data = [list(self.slots[src]) for src, _ in copies]
        for (_, dst), d in zip(copies, data, strict=True):
            self.slots[dst] = d
        request.num_computed_tokens += hit[1]
        start = request.num_computed_tokens
        for table in kv.get_group_block_tables(request.request_id):
            for pos in range(start, start + num_new):
                block = kv.block_pool.blocks[table[pos // self.size]]
                assert block.ref_cnt == 1, f"write into shared {block}"
                assert block.block_hash is None, f"write into cached {block}"
                self.slots[block.block_id][pos % self.size] = request.all_token_ids[pos]
        request.num_computed_tokens += num_new
        kv.cache_blocks(request, request.num_computed_tokens)
        self._record(request)
        return True

    def _held(self, request_id: str) -> tuple[int, list[int]]:
        """How many blocks the request holds, and its tables' lengths."""
        if not self.kv.holds_blocks(request_id):
            return 0, []
        tables = self.kv.get_group_block_tables(request_id)
        return self.kv.num_held_blocks(request_id), [len(t) for t in tables]

    def _record(self, request: Request) -> None:
        tokens = request.all_token_ids
        for i, h in enumerate(hash_request_tokens(tokens, self.size, request_extra_keys(request))):
            self.chains[h] = tokens[i * self.size : (i + 1) * self.size]

    def _new_id(self) -> str:
        self.counter += 1
        return f"s{self.counter}"

    @rule(prompt=prompts, chunk=st.integers(1, 30))
    def add(self, prompt: list[int], chunk: int) -> None:
        request = make_request(self._new_id(), prompt)
        self.requests[request.request_id] = request
        hit = self.kv.get_computed_blocks(request)
        num_new = min(request.num_tokens - hit[1], chunk)
        if not self._run(request, num_new, hit):
            self._drop(request.request_id)

    @rule(data=st.data(), chunk=st.integers(1, 8), token=st.integers(0, 9))
    def grow(self, data: st.DataObject, chunk: int, token: int) -> None:
        if not self.requests:
            return
        request = self.requests[data.draw(st.sampled_from(sorted(self.requests)))]
        if request.num_computed_tokens == request.num_tokens:
            request.append_output_token_ids(token)  # "sampled" after a full prefill
        num_new = min(request.num_tokens - request.num_computed_tokens, chunk)
        if not self._run(request, num_new):
            self._drop(request.request_id)  # as if preempted

    @rule(data=st.data(), token=st.integers(0, 9), same_last=st.booleans())
    def fork(self, data: st.DataObject, token: int, same_last: bool) -> None:
        if not self.requests:
            return
        parent = self.requests[data.draw(st.sampled_from(sorted(self.requests)))]
        if not self.kv.holds_blocks(parent.request_id):
            return
        if parent.num_computed_tokens == parent.num_tokens:
            parent.append_output_token_ids(token)
        output = list(parent.output_token_ids)
        if output and not same_last:
            # Beam search: the child continues with another last token. That
            # token's KV is not computed yet, so the blocks may still be shared.
            output[-1] = (output[-1] + 1) % 10
        child = parent.fork(self._new_id(), output_token_ids=output)
        self.kv.fork(parent.request_id, child.request_id)
        self.requests[child.request_id] = child

    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        if not self.requests:
            return
        self._drop(data.draw(st.sampled_from(sorted(self.requests))))

    def _drop(self, request_id: str) -> None:
        self.kv.free(request_id)
        del self.requests[request_id]

    @invariant()
    def consistent(self) -> None:
        kv = self.kv
        kv.check_invariants(self.requests.keys(), self.requests)
        for request in self.requests.values():
            if not kv.holds_blocks(request.request_id):
                continue
            n = request.num_computed_tokens
            tables = kv.get_group_block_tables(request.request_id)
            for table, window in zip(tables, self.windows, strict=True):
                # a sliding group keeps what the next query (at position n) sees
                first = 0 if window is None else max(0, n - window + 1)
                seen = [self.slots[table[p // self.size]][p % self.size] for p in range(first, n)]
                assert seen == request.all_token_ids[first:n], (
                    f"{request.request_id} reads wrong KV"
                )
            held = kv.num_held_blocks(request.request_id)
            assert held <= kv.blocks_needed(request.num_tokens), "more blocks than it can need"
        for key, block in kv.block_pool.cached_block_hash_to_block.items():
            assert self.slots[block.block_id] == self.chains[key[:32]]
        stats = kv.stats()
        allocated = stats.num_blocks_used * self.size
        assert kv.slot_usage() == (stats.num_token_slots_used, allocated)

    def teardown(self) -> None:
        for request_id in list(self.requests):
            self._drop(request_id)
        self.kv.check_invariants(set())
        assert self.kv.get_num_free_blocks() == self.kv.num_blocks


class SchedulerMachine(RuleBasedStateMachine):
    """Requests arrive, run, fork, stop and are aborted at random moments."""

    @initialize(
        num_blocks=st.integers(4, 24),
        block_size=st.sampled_from([2, 4]),
        budget=st.integers(4, 48),
        max_num_seqs=st.integers(1, 6),
        chunked=st.booleans(),
        caching=st.booleans(),
        policy=st.sampled_from(["fcfs", "priority"]),
        windows=WINDOWS,
    )
    def setup(
        self, num_blocks, block_size, budget, max_num_seqs, chunked, caching, policy, windows
    ):
        max_model_len = 48
        if not chunked:
            budget = max(budget, max_model_len)
        config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget,
            max_model_len=max_model_len,
            enable_chunked_prefill=chunked,
            policy=policy,
        )
        cache = CacheConfig(block_size=block_size, enable_prefix_caching=caching)
        self.scheduler = Scheduler(config, cache, num_blocks, windows)
        self.worker = FakeWorker(self.scheduler, vocab_size=10)
        self.counter = 0
        self.finished: set[str] = set()

    @rule(
        prompt=prompts,
        max_tokens=st.integers(1, 30),
        priority=st.integers(0, 2),
        stop_on_eos=st.booleans(),
    )
    def add(self, prompt: list[int], max_tokens: int, priority: int, stop_on_eos: bool) -> None:
        self.counter += 1
        request = make_request(
            f"r{self.counter}",
            prompt,
            max_tokens,
            ignore_eos=not stop_on_eos,
            eos_token_id=0,
            priority=priority,
            arrival_time=float(self.counter),
        )
        kv = self.scheduler.kv_cache_manager
        fits = (
            len(prompt) + max_tokens <= 48
            and kv.blocks_needed(len(prompt) + max_tokens - 1) <= kv.num_blocks
        )
        try:
            self.scheduler.add_request(request)
        except ValueError:
            assert not fits
            assert request.status is RequestStatus.FINISHED_IGNORED
        else:
            assert fits

    @rule()
    def step(self) -> None:
        for request in self.worker.step():
            self.finished.add(request.request_id)
        out = self.worker.last_output
        assert (
            out.total_num_scheduled_tokens <= self.scheduler.scheduler_config.max_num_batched_tokens
        )
        assert len(out.scheduled_requests) <= self.scheduler.scheduler_config.max_num_seqs

    @rule(
        data=st.data(),
        status=st.sampled_from([RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_STOPPED]),
    )
    def finish(self, data: st.DataObject, status: RequestStatus) -> None:
        if not self.scheduler.requests:
            return
        request_id = data.draw(st.sampled_from(sorted(self.scheduler.requests)))
        [done] = self.scheduler.finish_requests([request_id], status)
        assert done.status is status
        self.finished.add(request_id)

    @rule(data=st.data(), n=st.integers(1, 3), beam=st.booleans())
    def fork(self, data: st.DataObject, n: int, beam: bool) -> None:
        if not self.scheduler.running:
            return
        parent = data.draw(st.sampled_from(self.scheduler.running))
        if parent.num_computed_tokens >= parent.num_tokens:
            return  # no sampled token yet to continue from
        children = []
        for k in range(n):
            self.counter += 1
            output = list(parent.output_token_ids)
            if beam and output and parent.num_computed_tokens == parent.num_tokens - 1:
                output[-1] = (output[-1] + k + 1) % 10
            children.append(parent.fork(f"r{self.counter}", output_token_ids=output))
        try:
            self.scheduler.fork_request(parent.request_id, children)
        except ValueError:
            # Only a child that has already reached max_tokens may be refused.
            assert parent.num_output_tokens >= (parent.max_tokens or 0)

    @rule(data=st.data(), drafts=st.lists(st.integers(0, 9), min_size=1, max_size=5))
    def draft(self, data: st.DataObject, drafts: list[int]) -> None:
        """Speculative drafts for a request: verified next step with a random accepted
        count (FakeWorker); the rejected ones' slots must never count as computed."""
        if self.scheduler.running:
            data.draw(st.sampled_from(self.scheduler.running)).spec_token_ids = drafts

    @invariant()
    def consistent(self) -> None:
        self.scheduler.check_invariants()
        self.worker.check_cached_blocks()
        for request in self.scheduler.running:
            assert request.num_computed_tokens <= request.num_tokens

    def teardown(self) -> None:
        for _ in range(2000):
            if not self.scheduler.has_unfinished_requests():
                break
            self.worker.step()
        assert not self.scheduler.has_unfinished_requests(), "requests never finished"
        kv = self.scheduler.kv_cache_manager
        kv.check_invariants(set())
        assert kv.get_num_free_blocks() == kv.num_blocks


TestBlockPool = BlockPoolMachine.TestCase
TestBlockPool.settings = SETTINGS
TestKVCacheManager = KVCacheManagerMachine.TestCase
TestKVCacheManager.settings = SETTINGS
TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = SETTINGS


workloads = st.lists(
    # prompt, max_tokens, priority, steps before it arrives
    st.tuples(prompts, st.integers(1, 24), st.integers(0, 2), st.integers(0, 6)),
    min_size=1,
    max_size=10,
)


@SETTINGS
@given(
    workload=workloads,
    num_blocks=st.integers(6, 16),
    budget=st.integers(4, 40),
    policy=st.sampled_from(["fcfs", "priority"]),
    caching=st.booleans(),
    windows=WINDOWS,
)
def test_random_workloads_finish_without_leaks_and_admit_in_order(
    workload, num_blocks, budget, policy, caching, windows
):
    """Tight pools force preemption (and, under "priority", unscheduling) every few
    steps; everything still finishes, first admissions follow the policy's order, and
    the fake worker's checks hold at every step."""
    config = SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=budget, max_model_len=48, policy=policy
    )
    cache = CacheConfig(block_size=2, enable_prefix_caching=caching)
    scheduler = Scheduler(config, cache, num_blocks, windows)
    worker = FakeWorker(scheduler, vocab_size=10)
    arrivals = sorted(range(len(workload)), key=lambda k: workload[k][3])
    accepted: list[Request] = []
    admitted: list[str] = []
    step = 0
    while arrivals or scheduler.has_unfinished_requests():
        while arrivals and workload[arrivals[0]][3] <= step:
            k = arrivals.pop(0)
            prompt, max_tokens, priority, _ = workload[k]
            request = make_request(
                f"r{k}", prompt, max_tokens, priority=priority, arrival_time=float(step)
            )
            try:
                scheduler.add_request(request)
            except ValueError:
                continue
            accepted.append(request)
        worker.step()
        step += 1
        assert step < 3000, "requests never finished"
        new = [
            s.request_id
            for s in worker.last_output.scheduled_requests
            if s.request_id not in admitted
        ]
        admitted += new
        if policy == "priority":
            # Nobody is admitted while a more urgent new request is left waiting.
            for request_id in new:
                r = next(x for x in accepted if x.request_id == request_id)
                for q in scheduler.waiting:
                    if q.status is RequestStatus.WAITING:
                        assert (q.priority, q.arrival_time) >= (r.priority, r.arrival_time)
    assert all(r.status is RequestStatus.FINISHED_LENGTH_CAPPED for r in accepted)
    assert all(r.num_output_tokens == r.max_tokens for r in accepted)
    if policy == "fcfs":
        assert admitted == [r.request_id for r in accepted]
    kv = scheduler.kv_cache_manager
    kv.check_invariants(set())
    assert kv.get_num_free_blocks() == kv.num_blocks
