"""A stand-in for the model runner that checks what the scheduler asks of it.

Its "KV cache" stores, in each slot, the token id computed at that position. It
performs the block copies, writes every scheduled token, and checks that no
shared or cached block is written in place and that every scheduled request can
read its whole context back, token for token, through its block table: a wrong
prefix hit, a missed copy-on-write or a reused live block all show up here.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from pagedllm.core.kv_cache_manager import hash_request_tokens, request_extra_keys
from pagedllm.core.sched_output import SchedulerOutput
from pagedllm.core.scheduler import Scheduler


class FakeConnector:
    """A KV tier holding blocks' slot contents by hash; `broken` hashes fail to load.
    It saves blocks as they leave the pool, and as they are computed if `on_compute`."""

    def __init__(self, on_compute: bool = False) -> None:
        self.on_compute = on_compute
        self.store: dict[bytes, list[int | None]] = {}
        self.broken: set[bytes] = set()
        self.num_saved = self.num_loaded = 0

    def num_loadable_blocks(self, block_hashes: Sequence[bytes], transfer_params: object) -> int:
        return next(
            (i for i, h in enumerate(block_hashes) if h not in self.store), len(block_hashes)
        )

    def wants_block(self, block_hash: bytes, evicted: bool) -> bool:
        return (evicted or self.on_compute) and block_hash not in self.store


class FakeWorker:
    def __init__(
        self,
        scheduler: Scheduler,
        vocab_size: int = 50,
        seed: int = 0,
        connector: FakeConnector | None = None,
    ) -> None:
        """With `connector`, saves and loads blocks through it; a load is reported one
        step after it starts (as an asynchronous transfer would be)."""
        self.scheduler = scheduler
        self.connector = connector
        self.loads_in_flight: dict[str, int] = {}
        kv = scheduler.kv_cache_manager
        self.block_size = kv.block_size
        self.slots: list[list[int | None]] = [[None] * kv.block_size for _ in range(kv.num_blocks)]
        self.chains: dict[bytes, list[int]] = {}  # block hash -> that block's tokens
        self.rng = random.Random(seed)
        self.vocab_size = vocab_size
        self.next_tokens: dict[str, list[int]] = {}  # forced samples, per request
        # what a worker in another process would know of each request: its prompt and
        # output as rebuilt from the steps' new requests and deltas alone
        self.known: dict[str, tuple[list[int], list[int]]] = {}

    def execute(self, output: SchedulerOutput) -> dict[str, list[int]]:
        """Run the step; return one sampled token per request that samples."""
        kv = self.scheduler.kv_cache_manager
        blocks = kv.block_pool.blocks
        size = self.block_size
        if self.connector is not None:
            self._transfer(output)
        # Copies first, as one gather then scatter.
        gathered = [list(self.slots[src]) for src, _ in output.block_copies]
        for (_, dst), data in zip(output.block_copies, gathered, strict=True):
            self.slots[dst] = data
        self._follow_requests(output)
        sampled: dict[str, list[int]] = {}
        windows = kv.sliding_windows
        for sched in output.scheduled_requests:
            request = self.scheduler.get_request(sched.request_id)
            assert request is not None
            tables = self._tables(output, sched.request_id)
            assert tables[0] == kv.get_block_ids(sched.request_id)
            assert len(tables) == len(windows)
            start = sched.num_computed_tokens_before
            end = start + sched.num_new_tokens
            known = end - sched.num_draft_tokens  # drafts follow the sequence's own tokens
            assert sched.token_ids[: known - start] == request.all_token_ids[start:known]
            assert known == start + 1 or not sched.num_draft_tokens, "drafts only on a decode"
            for table in tables:  # every group writes the step's tokens into its blocks
                assert len(table) * size >= end, "too few blocks for the scheduled tokens"
                for pos in range(start, end):
                    block = blocks[table[pos // size]]
                    assert block.ref_cnt == 1, f"write into shared {block}"
                    assert block.block_hash is None, f"write into cached {block}"
                    self.slots[block.block_id][pos % size] = sched.token_ids[pos - start]
        # Reads after all writes: a request may read KV another wrote this step.
        for sched in output.scheduled_requests:
            request = self.scheduler.get_request(sched.request_id)
            assert request is not None
            start = sched.num_computed_tokens_before
            end = start + sched.num_new_tokens
            drafts = sched.token_ids[len(sched.token_ids) - sched.num_draft_tokens :]
            context = request.all_token_ids[: end - len(drafts)] + drafts
            for table, window in zip(self._tables(output, sched.request_id), windows, strict=True):
                # what the step's first query sees: a sliding group only its window
                first = 0 if window is None else max(0, start - window + 1)
                seen = [self.slots[table[p // size]][p % size] for p in range(first, end)]
                assert seen == context[first:], f"{sched.request_id} reads wrong KV"
            if not sched.is_prefill_chunk:
                assert end - len(drafts) == request.num_tokens
                forced = self.next_tokens.get(sched.request_id)
                token = forced.pop(0) if forced else self.rng.randrange(self.vocab_size)
                # a verification keeps a random number of drafts, then its own token
                accepted = drafts[: self.rng.randint(0, len(drafts))]
                sampled[sched.request_id] = [*accepted, token]
        return sampled

    def _follow_requests(self, output: SchedulerOutput) -> None:
        """Rebuild every scheduled request from the step's own data, as a worker in
        another process must, and check it against the scheduler's request."""
        for request_id in [*output.finished_req_ids, *output.preempted_req_ids]:
            self.known.pop(request_id, None)
        for new in output.new_requests:
            assert new.request_id not in self.known, f"{new.request_id} sent twice"
            self.known[new.request_id] = (new.prompt_token_ids, list(new.output_token_ids))
        for s in output.scheduled_requests:
            assert s.request_id in self.known, f"{s.request_id} scheduled but never sent"
            prompt, out = self.known[s.request_id]
            out.extend(s.new_output_token_ids)
            request = self.scheduler.get_request(s.request_id)
            assert request is not None
            assert prompt == request.prompt_token_ids and out == request.output_token_ids

    def _transfer(self, output: SchedulerOutput) -> None:
        """Save evicted blocks (their content must be the hash's), then run the loads."""
        connector = self.connector
        assert connector is not None
        blocks = self.scheduler.kv_cache_manager.block_pool.blocks
        self.save(output.kv_saves)
        for load in output.kv_loads:
            assert load.request_id not in self.loads_in_flight
            num = 0
            for block_hash, block_id in zip(load.block_hashes, load.block_ids, strict=True):
                block = blocks[block_id]
                assert block.ref_cnt == 1 and block.block_hash is None, f"load into {block}"
                if block_hash in connector.broken or block_hash not in connector.store:
                    break
                self.slots[block_id] = list(connector.store[block_hash])
                num += 1
            connector.num_loaded += num
            self.loads_in_flight[load.request_id] = num

    def save(self, saves: list[tuple[bytes, int, bool]]) -> None:
        """Keep each block's content, which must be what its hash names."""
        assert self.connector is not None
        self.record_chains()
        for block_hash, block_id, _ in saves:
            assert self.slots[block_id] == self.chains[block_hash], "saved a block's stale KV"
            self.connector.store[block_hash] = list(self.slots[block_id])
            self.connector.num_saved += 1

    @staticmethod
    def _tables(output: SchedulerOutput, request_id: str) -> list[list[int]]:
        """The request's block table in every layer group, group 0 first."""
        return output.group_block_tables.get(request_id) or [output.block_tables[request_id]]

    def record_chains(self, also: list | None = None) -> None:
        """Remember the content of every full block of every live request (and of
        `also`: requests that just finished, whose last blocks were cached as they
        finished), by hash."""
        for request in [*self.scheduler.requests.values(), *(also or ())]:
            tokens = request.all_token_ids
            hashes = hash_request_tokens(tokens, self.block_size, request_extra_keys(request))
            for i, block_hash in enumerate(hashes):
                self.chains[block_hash] = tokens[i * self.block_size : (i + 1) * self.block_size]

    def check_cached_blocks(self) -> None:
        """Every cached block, free or not, still holds the tokens its hash names."""
        pool = self.scheduler.kv_cache_manager.block_pool
        for key, block in pool.cached_block_hash_to_block.items():
            block_hash = key[:32]  # a group's key is the block's hash and the group
            assert block_hash in self.chains, f"{block} has a hash no request produced"
            assert self.slots[block.block_id] == self.chains[block_hash], f"{block} content"

    def step(self) -> list:
        """schedule, execute, update; with every check. Returns the finished requests."""
        self.record_chains()
        output = self.scheduler.schedule()
        self.scheduler.check_invariants()
        reported, self.loads_in_flight = self.loads_in_flight, {}
        sampled = self.execute(output)
        finished = self.scheduler.update_from_output(output, sampled)
        if self.connector is not None:
            self.save(self.scheduler.take_kv_saves())
        self.scheduler.finish_kv_loads(reported)
        self.scheduler.check_invariants()
        self.record_chains(finished)
        self.check_cached_blocks()
        self.last_output = output
        return finished
