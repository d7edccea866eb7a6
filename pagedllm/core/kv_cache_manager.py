"""Per-sequence block tables over the block pool: allocate, share, copy on write, free.

A sequence's block table maps its token positions to physical blocks: position p
lives in slot ``p % block_size`` of block ``table[p // block_size]``. Blocks are
added only when the last one is full, so each sequence wastes less than a block.

Prefix caching names each full block by a hash that chains the previous block's
hash, the block's token ids and extra keys (the request's cache salt), so equal
hashes mean equal prefixes up to and including that block. Blocks are registered
in the cache only after the step that wrote them (``cache_blocks``, called from the
scheduler's update), so no request can ever be pointed at KV that is not yet there.

Hashes are SHA-256 digests rather than Python's ``hash``: a collision would hand one
request another's KV (wrong tokens, and a leak between users), and 64 bits make that
thinkable over a long-running server; a digest is also stable across processes for
string keys such as salts, which ``hash`` of a ``str`` is not. It costs about a
microsecond per 16-token block.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from pagedllm.core.block_pool import BlockHash, BlockPool, KVCacheBlock
from pagedllm.core.invariants import require
from pagedllm.request import Request

_ROOT_HASH = hashlib.sha256(b"pagedllm prefix cache root").digest()


def hash_block_tokens(
    parent_block_hash: BlockHash | None,
    token_ids: Sequence[int],
    extra_keys: tuple[object, ...] = (),
) -> BlockHash:
    """The content hash of a full block: its parent's hash, its tokens, extra keys."""
    h = hashlib.sha256(parent_block_hash or _ROOT_HASH)
    h.update(len(token_ids).to_bytes(4, "little"))
    h.update(array("q", token_ids).tobytes())
    if extra_keys:
        h.update(repr(extra_keys).encode())
    return h.digest()


def hash_request_tokens(
    token_ids: Sequence[int], block_size: int, extra_keys: tuple[object, ...] = ()
) -> list[BlockHash]:
    """The hash chain of every full block of ``token_ids``."""
    hashes: list[BlockHash] = []
    parent = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start : start + block_size], extra_keys)
        hashes.append(parent)
    return hashes


def request_extra_keys(request: Request) -> tuple[object, ...]:
    """Keys beside the tokens that decide whether two requests may share KV."""
    return () if request.cache_salt is None else (request.cache_salt,)


@dataclass
class KVCacheStats:
    """A snapshot of how the pool is used (for metrics, logs and benchmarks)."""

    num_blocks_total: int
    num_blocks_used: int
    num_blocks_cached_free: int
    num_token_slots_used: int  # slots holding (or about to hold) a real token
    num_token_slots_wasted: int  # slots in used blocks that hold nothing
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found

    @property
    def prefix_cache_hit_rate(self) -> float:
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        )

    @property
    def kv_utilization(self) -> float:
        """Slots holding real tokens over slots allocated; 1.0 when nothing is allocated."""
        allocated = self.num_token_slots_used + self.num_token_slots_wasted
        return self.num_token_slots_used / allocated if allocated else 1.0


NULL_BLOCK_ID = 0  # what a sliding table holds where its window has left: never read


def _group_key(block_hash: BlockHash, group: int) -> BlockHash:
    """The prefix-cache key of a block of ``group``: equal tokens in two groups are
    different KV (different layers), so each group caches under its own key."""
    return block_hash if group == 0 else block_hash + group.to_bytes(2, "little")


@dataclass(slots=True)
class _Table:
    """One sequence's block table in one layer group."""

    blocks: list[KVCacheBlock | None] = field(default_factory=list)  # None: dropped
    block_ids: list[int] = field(default_factory=list)  # kept in step with ``blocks``
    num_dropped: int = 0  # leading blocks a sliding window has left (None, NULL_BLOCK_ID)


@dataclass(slots=True)
class _SeqBlocks:
    """What the manager knows about one sequence: a table per group, one hash chain."""

    tables: list[_Table]
    block_hashes: list[BlockHash] = field(default_factory=list)  # of its full blocks
    num_cached_blocks: int = 0  # leading blocks (of every table) offered to the prefix cache
    num_tokens: int = 0  # token positions the tables have slots for
    counted: bool = False  # prefix-cache query recorded for this admission
    # every group's prefix hit from get_computed_blocks, for its first allocate_slots
    hit: list[list[KVCacheBlock | None]] | None = None


class KVCacheManager:
    """Owns every sequence's block tables (one per layer group) and the pool behind them.

    ``sliding_windows`` has one entry per layer group (core/kv_cache_groups.py): None
    for full attention, else the group's window. A sliding group's blocks that no later
    query can see are freed (to the prefix cache, when on) as the sequence moves on.
    ``max_step_tokens`` (the step's token budget) bounds how many blocks a sliding group
    holds at once; without it the bound is the whole sequence.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        enable_caching: bool = True,
        sliding_windows: Sequence[int | None] = (None,),
        max_step_tokens: int | None = None,
    ) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if not sliding_windows:
            raise ValueError("sliding_windows needs one entry per layer group")
        for window in sliding_windows:
            if window is not None and (not isinstance(window, int) or window < 1):
                raise ValueError(f"a sliding window must be a positive integer, got {window!r}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.sliding_windows = list(sliding_windows)
        self._slides = any(w is not None for w in self.sliding_windows)
        self.max_step_tokens = max_step_tokens
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self._seqs: dict[str, _SeqBlocks] = {}
        self._pending_copies: list[tuple[int, int]] = []
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def num_groups(self) -> int:
        return len(self.sliding_windows)

    def get_num_free_blocks(self) -> int:
        return self.block_pool.get_num_free_blocks()

    def get_usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return self.block_pool.get_usage()

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens (in one group's table)."""
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, num_tokens: int) -> int:
        """The most blocks, all groups together, a sequence of ``num_tokens`` holds at once."""
        full = self.num_blocks_for(num_tokens)
        total = 0
        for window in self.sliding_windows:
            if window is None or self.max_step_tokens is None:
                total += full
            else:
                # a step's first query sees window - 1 keys before it; its chunk spans
                # max_step_tokens more; either end may straddle a block
                span = (window + self.max_step_tokens - 2) // self.block_size + 2
                total += min(full, span)
        return total

    def max_sequence_tokens(self, limit: int) -> int:
        """The longest sequence, of at most ``limit`` tokens, the whole pool can hold."""
        low, high = 0, limit
        while low < high:  # the largest n with blocks_needed(n) <= num_blocks
            mid = (low + high + 1) // 2
            if self.blocks_needed(mid) <= self.num_blocks:
                low = mid
            else:
                high = mid - 1
        return low

    # ------------------------------------------------------------------ lookup

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock | None], int]:
        """The longest cached prefix of the request that every group can resume from.

        Returns group 0's blocks for it (a sliding group 0 has None where its window
        has left) and its length in tokens; the other groups' blocks are kept for the
        request's first ``allocate_slots``. A full-attention group needs every block of
        the prefix cached; a sliding group only those its next query can see. At least
        one prompt token is always left to compute (its logits are needed). Requests
        wanting prompt logprobs or every prompt state compute their whole prompt.
        """
        hashes = self.prompt_block_hashes(request)
        if not hashes:
            return [], 0
        seq = self._seq(request.request_id)
        lookup = self.block_pool.get_cached_block
        cached = [[lookup(_group_key(h, g)) for h in hashes] for g in range(self.num_groups)]
        num_hit = len(hashes)
        for g, window in enumerate(self.sliding_windows):
            if window is None:
                num_hit = next((i for i, b in enumerate(cached[g][:num_hit]) if b is None), num_hit)
        changed = True
        while changed:  # a shorter hit may need a sliding group's earlier blocks: repeat
            changed = False
            for g, window in enumerate(self.sliding_windows):
                if window is not None:
                    shorter = self._sliding_hit(cached[g], window, num_hit)
                    changed |= shorter != num_hit
                    num_hit = shorter
        seq.hit = []
        for g, window in enumerate(self.sliding_windows):
            first = 0 if window is None else self._first_visible(window, num_hit * self.block_size)
            seq.hit.append([None] * first + cached[g][first:num_hit])
        return seq.hit[0], num_hit * self.block_size

    def prompt_block_hashes(self, request: Request) -> list[BlockHash]:
        """The hashes of the full blocks a prefix hit may cover: all but the prompt's last
        token; none when the request computes its whole prompt or caching is off."""
        if (
            not self.enable_caching
            or request.sampling_params.prompt_logprobs is not None
            or request.needs_every_prompt_state
        ):
            return []
        seq = self._seq(request.request_id)
        return self._block_hashes(request, seq, (request.num_tokens - 1) // self.block_size)

    def _first_visible(self, window: int, position: int) -> int:
        """The first block a query at ``position`` (or later) sees through ``window``."""
        return max(0, position - window + 1) // self.block_size

    def _sliding_hit(self, cached: list[KVCacheBlock | None], window: int, limit: int) -> int:
        """The longest hit of at most ``limit`` blocks whose window is cached in a group."""
        for num_hit in range(limit, 0, -1):
            first = self._first_visible(window, num_hit * self.block_size)
            if all(b is not None for b in cached[first:num_hit]):
                return num_hit
        return 0

    def _seq(self, request_id: str) -> _SeqBlocks:
        seq = self._seqs.get(request_id)
        if seq is None:
            seq = self._seqs[request_id] = _SeqBlocks([_Table() for _ in self.sliding_windows])
        return seq

    def _block_hashes(self, request: Request, seq: _SeqBlocks, num_blocks: int) -> list[BlockHash]:
        """The first ``num_blocks`` full-block hashes of the request, computed once."""
        hashes = seq.block_hashes
        if len(hashes) < num_blocks:
            tokens = request.all_token_ids
            extra = request_extra_keys(request)
            size = self.block_size
            parent = hashes[-1] if hashes else None
            for i in range(len(hashes), num_blocks):
                parent = hash_block_tokens(parent, tokens[i * size : (i + 1) * size], extra)
                hashes.append(parent)
        return hashes[:num_blocks]

    # -------------------------------------------------------------- allocation

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock | None] = (),
        num_new_computed_tokens: int = 0,
    ) -> list[int] | None:
        """Give the request slots for ``num_new_tokens`` more tokens, all or nothing.

        The tokens go after ``request.num_computed_tokens`` plus the prefix hit
        (``new_computed_blocks``, from ``get_computed_blocks``, only on a sequence's first
        allocation). If the block about to be written is shared with another sequence,
        it is copied first and the copy is queued for ``take_pending_copies``. A sliding
        group first frees the blocks its window has left. Returns the ids of the blocks
        appended to group 0's table (a new sequence: the whole table), or None when the
        pool has too few free blocks, with nothing changed but blocks no query can see.
        """
        seq = self._seq(request.request_id)
        tables = seq.tables
        size = self.block_size
        num_computed = request.num_computed_tokens + num_new_computed_tokens
        num_total = num_computed + num_new_tokens
        if self._slides:
            self._drop_out_of_window(tables, num_computed)
        if not new_computed_blocks:
            # Fast path, every decode step but one in block_size: the tokens land in
            # each table's last block, which this sequence holds alone.
            num_blocks = len(tables[0].blocks)
            if num_total <= num_blocks * size and (
                num_new_tokens == 0
                or (
                    num_computed // size == num_blocks - 1
                    and all(t.blocks[-1].ref_cnt == 1 for t in tables)  # type: ignore[union-attr]
                )
            ):
                if num_total > seq.num_tokens:
                    seq.num_tokens = num_total
                return []
            hits: list[Sequence[KVCacheBlock | None]] = [()] * len(tables)
        elif tables[0].blocks:
            raise ValueError(
                f"request {request.request_id!r} already has blocks; prefix hits apply only "
                "to its first allocation"
            )
        elif len(tables) == 1:
            hits = [new_computed_blocks]
        else:
            if seq.hit is None or list(seq.hit[0]) != list(new_computed_blocks):
                raise ValueError(
                    f"request {request.request_id!r}: a prefix hit must come from "
                    "get_computed_blocks"
                )
            hits = seq.hit
        num_table_blocks = -(-num_total // size)
        num_new_blocks = [
            max(0, num_table_blocks - len(t.blocks) - len(hit))
            for t, hit in zip(tables, hits, strict=True)
        ]

        # Shared blocks this step writes into must be copied first.
        cow: list[tuple[_Table, int]] = []
        if num_new_tokens > 0:
            for t in tables:
                for i in range(num_computed // size, min(len(t.blocks), num_table_blocks)):
                    block = t.blocks[i]
                    if block is not None and block.ref_cnt > 1:
                        cow.append((t, i))
        # A prefix hit on a free cached block takes it out of the free queue too.
        num_evictable_hits = sum(1 for hit in hits for b in hit if b is not None and b.ref_cnt == 0)
        pool = self.block_pool
        if sum(num_new_blocks) + len(cow) + num_evictable_hits > pool.get_num_free_blocks():
            return None

        if not seq.counted and self.enable_caching:
            seq.counted = True
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += num_new_computed_tokens
        seq.hit = None
        if new_computed_blocks:
            seq.num_cached_blocks = len(new_computed_blocks)
        new_ids: list[int] = []
        # Every group's hits leave the free queue before any fresh block is taken from
        # it: a fresh block must never be one another group is about to reuse.
        pool.touch([b for hit in hits for b in hit if b is not None])
        for g, (t, hit) in enumerate(zip(tables, hits, strict=True)):
            ids: list[int] = []
            if hit:
                t.blocks.extend(hit)
                ids.extend(NULL_BLOCK_ID if b is None else b.block_id for b in hit)
                t.num_dropped = next((i for i, b in enumerate(hit) if b is not None), len(hit))
            if num_new_blocks[g]:
                fresh = pool.get_new_blocks(num_new_blocks[g])
                t.blocks.extend(fresh)
                ids.extend(b.block_id for b in fresh)
            t.block_ids.extend(ids)
            if g == 0:
                new_ids = ids
        for t, i in cow:
            src = t.blocks[i]
            assert src is not None
            (dst,) = pool.get_new_blocks(1)
            t.blocks[i] = dst
            t.block_ids[i] = dst.block_id
            pool.free_blocks([src])  # still referenced by the other holders
            self._pending_copies.append((src.block_id, dst.block_id))
        seq.num_tokens = max(seq.num_tokens, num_total)
        return new_ids

    def _drop_out_of_window(self, tables: list[_Table], num_computed: int) -> None:
        """Free each sliding table's blocks that no query from ``num_computed`` on sees.

        They go back to the pool in table order (oldest first evicted); a cached one
        stays findable by its hash until it is handed out again.
        """
        for t, window in zip(tables, self.sliding_windows, strict=True):
            if window is None:
                continue
            first = min(self._first_visible(window, num_computed), len(t.blocks))
            if first <= t.num_dropped:
                continue
            dropped = [b for b in t.blocks[t.num_dropped : first] if b is not None]
            for i in range(t.num_dropped, first):
                t.blocks[i] = None
                t.block_ids[i] = NULL_BLOCK_ID
            t.num_dropped = first
            self._release(dropped)

    def _release(self, blocks: list[KVCacheBlock]) -> None:
        """Drop one reference from each block, forgetting copies into blocks now free."""
        self.block_pool.free_blocks(blocks)
        if self._pending_copies:
            gone = {b.block_id for b in blocks if b.ref_cnt == 0}
            if gone:
                self._pending_copies = [c for c in self._pending_copies if c[1] not in gone]

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Offer the request's blocks that are now full of computed KV to the cache.

        Called once the step that computed them has run, so a later hit always
        finds the KV already written.
        """
        if not self.enable_caching:
            return
        seq = self._seqs.get(request.request_id)
        if seq is None:
            return
        num_full = min(num_computed_tokens // self.block_size, len(seq.tables[0].blocks))
        if num_full <= seq.num_cached_blocks:
            return
        hashes = self._block_hashes(request, seq, num_full)
        cache = self.block_pool.cache_full_block
        for g, t in enumerate(seq.tables):
            for i in range(seq.num_cached_blocks, num_full):
                block = t.blocks[i]
                if block is not None:
                    cache(block, _group_key(hashes[i], g))
        seq.num_cached_blocks = num_full

    def rollback(self, request_id: str, num_tokens: int) -> None:
        """Shrink a sequence to its first ``num_tokens`` slots: what speculation keeps once
        its rejected drafts are dropped. Blocks past them go back to the pool (allocated
        in the verifying step and never cached: ``cache_blocks`` runs after this); a
        partly rejected last block is simply overwritten later."""
        seq = self._seqs.get(request_id)
        if seq is None or num_tokens >= seq.num_tokens:
            return
        keep = self.num_blocks_for(num_tokens)
        require(keep >= seq.num_cached_blocks, f"{request_id!r}: rollback into cached blocks")
        for t in seq.tables:
            dropped = [b for b in reversed(t.blocks[keep:]) if b is not None]
            del t.blocks[keep:], t.block_ids[keep:]
            self.block_pool.free_blocks(dropped)
        seq.num_tokens = num_tokens

    def take_pending_copies(self) -> list[tuple[int, int]]:
        """Copy-on-write copies (source, destination) to perform before the next step.

        The worker must copy them in order (or as one gather-then-scatter) before
        running the step that writes the destinations.
        """
        copies, self._pending_copies = self._pending_copies, []
        return copies

    # ------------------------------------------------------------ fork and free

    def fork(self, parent_request_id: str, child_request_id: str) -> None:
        """Give the child the parent's whole block tables, sharing every block.

        Nothing is copied now: the first write into a shared, partly filled block
        copies it then (``allocate_slots``). The child must have the parent's tokens
        up to the parent's computed tokens at least.
        """
        parent = self._seqs.get(parent_request_id)
        if parent is None or not parent.tables[0].blocks:
            raise ValueError(f"cannot fork {parent_request_id!r}: it holds no blocks")
        if child_request_id in self._seqs:
            raise ValueError(f"cannot fork into {child_request_id!r}: that id already exists")
        num_full = parent.num_tokens // self.block_size
        tables = []
        for t in parent.tables:
            self.block_pool.touch([b for b in t.blocks if b is not None])
            tables.append(_Table(list(t.blocks), list(t.block_ids), t.num_dropped))
        self._seqs[child_request_id] = _SeqBlocks(
            tables=tables,
            block_hashes=parent.block_hashes[:num_full],
            num_cached_blocks=min(parent.num_cached_blocks, num_full),
            num_tokens=parent.num_tokens,
            counted=True,
        )

    def free(self, request_id: str) -> None:
        """Release every block the request holds (finish, abort or preemption).

        Tail blocks are freed first so they are evicted first: a prompt's early
        blocks are the ones other requests are likeliest to share.
        """
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return
        for t in seq.tables:
            self._release([b for b in reversed(t.blocks) if b is not None])

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's group-0 block table (a copy), empty if it holds no blocks."""
        seq = self._seqs.get(request_id)
        return [] if seq is None else list(seq.tables[0].block_ids)

    def get_block_table(self, request_id: str) -> list[int]:
        """The request's group-0 block table itself, without a copy: read it, never
        change it.

        It changes when the request is next given slots or freed; the scheduler
        hands these out once per step, where copying 256 tables would cost more
        than the rest of the step.
        """
        return self._seqs[request_id].tables[0].block_ids

    def get_group_block_tables(self, request_id: str) -> list[list[int]]:
        """Every group's block table, group 0 first, without copies (as ``get_block_table``)."""
        return [t.block_ids for t in self._seqs[request_id].tables]

    def num_held_blocks(self, request_id: str) -> int:
        """Blocks the request's tables reference, all groups together."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return 0
        return sum(1 for t in seq.tables for b in t.blocks if b is not None)

    def holds_blocks(self, request_id: str) -> bool:
        seq = self._seqs.get(request_id)
        return seq is not None and bool(seq.tables[0].blocks)

    # ---------------------------------------------------------------- checking

    def stats(self) -> KVCacheStats:
        """Blocks and slots in use now, and prefix-cache counters since start."""
        size = self.block_size
        filled: dict[int, int] = {}
        for seq in self._seqs.values():
            for t in seq.tables:
                for i, block in enumerate(t.blocks):
                    if block is None:
                        continue
                    n = min(size, seq.num_tokens - i * size)
                    if n > filled.get(block.block_id, 0):
                        filled[block.block_id] = n
        num_used = self.block_pool.num_blocks - self.block_pool.get_num_free_blocks()
        slots_used = sum(filled.values())
        return KVCacheStats(
            num_blocks_total=self.block_pool.num_blocks,
            num_blocks_used=num_used,
            num_blocks_cached_free=self.block_pool.get_num_cached_free_blocks(),
            num_token_slots_used=slots_used,
            num_token_slots_wasted=num_used * size - slots_used,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
        )

    def slot_usage(self) -> tuple[int, int]:
        """(slots holding tokens, slots in blocks in use): ``stats()``'s numbers, but cheap.

        Benchmarks sample it every step. All but a table's last block are full,
        so only distinct partly filled last blocks waste slots: O(tables), not
        O(blocks).
        """
        size = self.block_size
        gaps: dict[int, int] = {}
        for seq in self._seqs.values():
            for t in seq.tables:
                gap = len(t.blocks) * size - seq.num_tokens
                if gap:
                    block_id = t.block_ids[-1]
                    gaps[block_id] = min(gap, gaps.get(block_id, size))
        pool = self.block_pool
        allocated = (pool.num_blocks - pool.get_num_free_blocks()) * size
        return allocated - sum(gaps.values()), allocated

    def check_invariants(
        self,
        live_request_ids: Collection[str],
        requests: Mapping[str, Request] | None = None,
    ) -> None:
        """Raise InvariantError unless the tables and the pool agree (tests, debug).

        Every block's ref count must equal the number of block tables holding it;
        each table must hold blocks only where its tokens are (so at most its last
        block is partly filled), and a sliding table nothing but its dropped prefix
        before them; with nothing alive, every block must be free. With ``requests``
        given, also recompute every sequence's hash chain from its tokens and check
        its cached blocks carry those hashes.
        """
        pool = self.block_pool
        pool.check_invariants()
        size = self.block_size
        ref_counts: dict[int, int] = {}
        for request_id, seq in self._seqs.items():
            require(request_id in live_request_ids, f"dead request {request_id!r} holds state")
            require(len(seq.tables) == self.num_groups, f"{request_id!r} has a table per group")
            for g, t in enumerate(seq.tables):
                where = f"{request_id!r} group {g}"
                require(
                    [NULL_BLOCK_ID if b is None else b.block_id for b in t.blocks] == t.block_ids,
                    f"{where}: block ids out of step with its blocks",
                )
                # Blocks only where tokens are: all but the last block are full.
                require(
                    len(t.blocks) == self.num_blocks_for(seq.num_tokens),
                    f"{where} holds {len(t.blocks)} blocks for {seq.num_tokens} tokens "
                    "(more than one partly filled block)",
                )
                require(
                    all(b is None for b in t.blocks[: t.num_dropped])
                    and all(b is not None for b in t.blocks[t.num_dropped :]),
                    f"{where}: dropped blocks are not exactly its first {t.num_dropped}",
                )
                require(
                    self.sliding_windows[g] is not None or t.num_dropped == 0,
                    f"{where}: a full-attention table dropped blocks",
                )
                for block in t.blocks:
                    if block is not None:
                        ref_counts[block.block_id] = ref_counts.get(block.block_id, 0) + 1
                require(
                    seq.num_cached_blocks <= len(t.blocks),
                    f"{where} has more cached blocks than blocks",
                )
                for i in range(t.num_dropped, seq.num_cached_blocks):
                    block = t.blocks[i]
                    assert block is not None
                    h = block.block_hash
                    require(
                        h is None or h == _group_key(seq.block_hashes[i], g),
                        f"{where} block {i} carries another prefix's hash",
                    )
            if requests is not None and request_id in requests:
                tokens = requests[request_id].all_token_ids
                expected = hash_request_tokens(
                    tokens, size, request_extra_keys(requests[request_id])
                )
                n = len(seq.block_hashes)
                require(seq.block_hashes == expected[:n], f"{request_id!r} hash chain is stale")
        if not ref_counts:
            # Implied by the ref counts below, but a leak deserves its own message.
            require(
                pool.get_num_free_blocks() == pool.num_blocks,
                f"blocks leaked: no sequence holds blocks but "
                f"{pool.num_blocks - pool.get_num_free_blocks()} are referenced",
            )
        for block in pool.blocks:
            holders = ref_counts.get(block.block_id, 0)
            require(
                block.ref_cnt == holders,
                f"{block} has ref_cnt {block.ref_cnt} but is held by {holders} block tables",
            )
        for src, dst in self._pending_copies:
            require(
                pool.blocks[dst].ref_cnt > 0,
                f"a pending copy {src} -> {dst} writes into a free block",
            )
