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


@dataclass(slots=True)
class _SeqBlocks:
    """What the manager knows about one sequence."""

    blocks: list[KVCacheBlock] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)  # kept in step with ``blocks``
    block_hashes: list[BlockHash] = field(default_factory=list)  # of its full blocks
    num_cached_blocks: int = 0  # leading blocks already offered to the prefix cache
    num_tokens: int = 0  # token positions the table has slots for
    counted: bool = False  # prefix-cache query recorded for this admission


class KVCacheManager:
    """Owns every sequence's block table and the pool behind them."""

    def __init__(self, num_blocks: int, block_size: int = 16, enable_caching: bool = True) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self._seqs: dict[str, _SeqBlocks] = {}
        self._pending_copies: list[tuple[int, int]] = []
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    def get_num_free_blocks(self) -> int:
        return self.block_pool.get_num_free_blocks()

    def get_usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return self.block_pool.get_usage()

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ lookup

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest run of cached full blocks matching the start of the request.

        Returns the blocks (not yet referenced: pass them to ``allocate_slots``) and
        the number of tokens they cover. The last token is never taken from the
        cache, because its forward pass produces the logits the next token is
        sampled from. A request asking for prompt logprobs, or pooling every prompt
        position's state, needs every prompt position computed, so it skips the cache.
        """
        if (
            not self.enable_caching
            or request.sampling_params.prompt_logprobs is not None
            or request.needs_every_prompt_state
        ):
            return [], 0
        seq = self._seqs.get(request.request_id)
        if seq is None:
            seq = self._seqs[request.request_id] = _SeqBlocks()
        hashes = self._block_hashes(request, seq, (request.num_tokens - 1) // self.block_size)
        blocks = []
        for block_hash in hashes:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

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
        new_computed_blocks: Sequence[KVCacheBlock] = (),
        num_new_computed_tokens: int = 0,
    ) -> list[int] | None:
        """Give the request slots for ``num_new_tokens`` more tokens, all or nothing.

        The tokens go after ``request.num_computed_tokens`` plus the prefix hit
        (``new_computed_blocks``, only on a sequence's first allocation). If the
        block about to be written is shared with another sequence, it is copied
        first and the copy is queued for ``take_pending_copies``. Returns the ids of
        the blocks appended to the table (a new sequence: the whole table), or None
        with nothing changed when the pool has too few free blocks.
        """
        seq = self._seqs.get(request.request_id)
        if seq is None:
            seq = self._seqs[request.request_id] = _SeqBlocks()
        blocks = seq.blocks
        size = self.block_size
        num_computed = request.num_computed_tokens + num_new_computed_tokens
        num_total = num_computed + num_new_tokens
        if not new_computed_blocks:
            # Fast path, every decode step but one in block_size: the tokens land in
            # the last block, which this sequence holds alone.
            num_blocks = len(blocks)
            if num_total <= num_blocks * size and (
                num_new_tokens == 0
                or (num_computed // size == num_blocks - 1 and blocks[-1].ref_cnt == 1)
            ):
                if num_total > seq.num_tokens:
                    seq.num_tokens = num_total
                return []
        elif blocks:
            raise ValueError(
                f"request {request.request_id!r} already has blocks; prefix hits apply only "
                "to its first allocation"
            )
        num_new_blocks = max(0, -(-num_total // size) - len(blocks) - len(new_computed_blocks))

        # Shared blocks this step writes into must be copied first.
        cow = []
        if num_new_tokens > 0:
            for i in range(num_computed // size, min(len(blocks), -(-num_total // size))):
                if blocks[i].ref_cnt > 1:
                    cow.append(i)
        # A prefix hit on a free cached block takes it out of the free queue too.
        num_evictable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks + len(cow) + num_evictable_hits > self.block_pool.get_num_free_blocks():
            return None

        if not seq.counted and self.enable_caching:
            seq.counted = True
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += num_new_computed_tokens
        pool = self.block_pool
        new_ids: list[int] = []
        if new_computed_blocks:
            pool.touch(new_computed_blocks)
            blocks.extend(new_computed_blocks)
            new_ids.extend(b.block_id for b in new_computed_blocks)
            seq.num_cached_blocks = len(new_computed_blocks)
        for i in cow:
            src = blocks[i]
            (dst,) = pool.get_new_blocks(1)
            blocks[i] = dst
            seq.block_ids[i] = dst.block_id
            pool.free_blocks([src])  # still referenced by the other holders
            self._pending_copies.append((src.block_id, dst.block_id))
        if num_new_blocks:
            fresh = pool.get_new_blocks(num_new_blocks)
            blocks.extend(fresh)
            new_ids.extend(b.block_id for b in fresh)
        seq.block_ids.extend(new_ids)
        seq.num_tokens = max(seq.num_tokens, num_total)
        return new_ids

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
        num_full = min(num_computed_tokens // self.block_size, len(seq.blocks))
        if num_full <= seq.num_cached_blocks:
            return
        hashes = self._block_hashes(request, seq, num_full)
        cache = self.block_pool.cache_full_block
        for i in range(seq.num_cached_blocks, num_full):
            cache(seq.blocks[i], hashes[i])
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
        dropped = seq.blocks[keep:]
        del seq.blocks[keep:], seq.block_ids[keep:]
        seq.num_tokens = num_tokens
        self.block_pool.free_blocks(reversed(dropped))

    def take_pending_copies(self) -> list[tuple[int, int]]:
        """Copy-on-write copies (source, destination) to perform before the next step.

        The worker must copy them in order (or as one gather-then-scatter) before
        running the step that writes the destinations.
        """
        copies, self._pending_copies = self._pending_copies, []
        return copies

    # ------------------------------------------------------------ fork and free

    def fork(self, parent_request_id: str, child_request_id: str) -> None:
        """Give the child the parent's whole block table, sharing every block.

        Nothing is copied now: the first write into a shared, partly filled block
        copies it then (``allocate_slots``). The child must have the parent's tokens
        up to the parent's computed tokens at least.
        """
        parent = self._seqs.get(parent_request_id)
        if parent is None or not parent.blocks:
            raise ValueError(f"cannot fork {parent_request_id!r}: it holds no blocks")
        if child_request_id in self._seqs:
            raise ValueError(f"cannot fork into {child_request_id!r}: that id already exists")
        self.block_pool.touch(parent.blocks)
        num_full = parent.num_tokens // self.block_size
        self._seqs[child_request_id] = _SeqBlocks(
            blocks=list(parent.blocks),
            block_ids=list(parent.block_ids),
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
        if seq is None or not seq.blocks:
            return
        self.block_pool.free_blocks(reversed(seq.blocks))
        if self._pending_copies:
            # A copy into a block this request just gave up is no longer wanted.
            gone = {b.block_id for b in seq.blocks if b.ref_cnt == 0}
            self._pending_copies = [c for c in self._pending_copies if c[1] not in gone]

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table (a copy), empty if it holds no blocks."""
        seq = self._seqs.get(request_id)
        return [] if seq is None else list(seq.block_ids)

    def get_block_table(self, request_id: str) -> list[int]:
        """The request's block table itself, without a copy: read it, never change it.

        It changes when the request is next given slots or freed; the scheduler
        hands these out once per step, where copying 256 tables would cost more
        than the rest of the step.
        """
        return self._seqs[request_id].block_ids

    def holds_blocks(self, request_id: str) -> bool:
        seq = self._seqs.get(request_id)
        return seq is not None and bool(seq.blocks)

    # ---------------------------------------------------------------- checking

    def stats(self) -> KVCacheStats:
        """Blocks and slots in use now, and prefix-cache counters since start."""
        size = self.block_size
        filled: dict[int, int] = {}
        for seq in self._seqs.values():
            for i, block in enumerate(seq.blocks):
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

        Benchmarks sample it every step. All but a sequence's last block are full,
        so only distinct partly filled last blocks waste slots: O(sequences), not
        O(blocks).
        """
        size = self.block_size
        gaps: dict[int, int] = {}
        for seq in self._seqs.values():
            gap = len(seq.blocks) * size - seq.num_tokens
            if gap:
                block_id = seq.block_ids[-1]
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
        block is partly filled); with nothing alive, every block must be free. With
        ``requests`` given, also recompute every sequence's hash chain from its
        tokens and check its cached blocks carry those hashes.
        """
        pool = self.block_pool
        pool.check_invariants()
        size = self.block_size
        ref_counts: dict[int, int] = {}
        for request_id, seq in self._seqs.items():
            require(request_id in live_request_ids, f"dead request {request_id!r} holds state")
            require(
                [b.block_id for b in seq.blocks] == seq.block_ids,
                f"{request_id!r}: block ids out of step with its blocks",
            )
            # Blocks only where tokens are: all but the last block are full.
            require(
                len(seq.blocks) == self.num_blocks_for(seq.num_tokens),
                f"{request_id!r} holds {len(seq.blocks)} blocks for {seq.num_tokens} tokens "
                "(more than one partly filled block)",
            )
            for block in seq.blocks:
                ref_counts[block.block_id] = ref_counts.get(block.block_id, 0) + 1
            require(
                seq.num_cached_blocks <= len(seq.blocks),
                f"{request_id!r} has more cached blocks than blocks",
            )
            for i in range(seq.num_cached_blocks):
                h = seq.blocks[i].block_hash
                require(
                    h is None or h == seq.block_hashes[i],
                    f"{request_id!r} block {i} carries another prefix's hash",
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
