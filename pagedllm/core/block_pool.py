"""The physical KV blocks: reference counts, the free queue and the content-hash map.

A block is either referenced (ref_cnt > 0, owned by one or more block tables) or
free (ref_cnt == 0, waiting in the free queue). A free block that was cached keeps
its hash, so a later request with the same prefix can take it back out of the
queue; it loses the hash only when it is handed out for new content. The queue is
in least-recently-freed order, so the blocks evicted first are the ones nobody has
needed for longest.
"""

from __future__ import annotations

from collections.abc import Iterable

from pagedllm.core.invariants import require

BlockHash = bytes


class KVCacheBlock:
    """One physical block of ``block_size`` token slots in every layer's KV cache."""

    __slots__ = ("block_hash", "block_id", "next_free", "prev_free", "ref_cnt")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None  # set only while the block is cached
        # Links of the doubly linked free queue; None while referenced.
        self.prev_free: KVCacheBlock | None = None
        self.next_free: KVCacheBlock | None = None

    def __repr__(self) -> str:
        cached = "" if self.block_hash is None else f", hash={self.block_hash.hex()[:8]}"
        return f"KVCacheBlock(id={self.block_id}, ref_cnt={self.ref_cnt}{cached})"


class FreeBlockQueue:
    """Free blocks in eviction order, with O(1) removal from the middle.

    A prefix-cache hit takes a free block out of wherever it sits in the queue,
    which a deque cannot do in O(1); the links live in the blocks themselves.
    """

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        # Sentinels spare every operation the empty-queue special cases.
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVCacheBlock:
        """Take the block to evict next (the least recently freed one)."""
        block = self._head.next_free
        if block is self._tail or block is None:
            raise ValueError("no free blocks left")
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        """Unlink a block from anywhere in the queue."""
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        """Put a block at the end: it will be evicted after every block already here."""
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free_blocks += 1

    def __iter__(self):
        block = self._head.next_free
        while block is not self._tail and block is not None:
            yield block
            block = block.next_free

    def __len__(self) -> int:
        return self.num_free_blocks


class BlockPool:
    """A fixed set of blocks; hands them out, takes them back, finds them by content."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_block_queue = FreeBlockQueue(self.blocks)
        self.cached_block_hash_to_block: dict[BlockHash, KVCacheBlock] = {}
        # (hash, block id, evicted) of each block cached (False) or evicted (True) since
        # the last take_block_events(), kept only for a KV connector (else None)
        self.block_events: list[tuple[BlockHash, int, bool]] | None = None

    def get_num_free_blocks(self) -> int:
        """Blocks that can be handed out now, cached ones included (they are evictable)."""
        return self.free_block_queue.num_free_blocks

    def get_usage(self) -> float:
        """Fraction of blocks referenced by some sequence, in [0, 1]."""
        return 1.0 - self.free_block_queue.num_free_blocks / self.num_blocks

    def get_num_cached_free_blocks(self) -> int:
        """Free blocks that still hold a reusable prefix."""
        return sum(1 for b in self.cached_block_hash_to_block.values() if b.ref_cnt == 0)

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take ``num_blocks`` free blocks for new content, evicting their old hashes.

        Refuses (ValueError) rather than overcommit: callers check
        ``get_num_free_blocks`` first and back off.
        """
        if num_blocks > self.free_block_queue.num_free_blocks:
            raise ValueError(
                f"cannot allocate {num_blocks} blocks: only "
                f"{self.free_block_queue.num_free_blocks} are free"
            )
        popleft = self.free_block_queue.popleft
        blocks = []
        for _ in range(num_blocks):
            block = popleft()
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Add a reference to each block (a prefix hit or a fork), unfreeing it if need be."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block; those left unreferenced join the queue.

        Blocks are queued in the order given, so the first given is evicted first:
        the KV-cache manager passes a sequence's blocks tail first, because a tail
        block is the least likely to be shared by a later request's prefix.
        """
        for block in ordered_blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} freed more often than referenced")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_block_queue.append(block)

    def cache_full_block(self, block: KVCacheBlock, block_hash: BlockHash) -> bool:
        """Make a full block findable by its content hash; True if it is now cached.

        When another block already holds the same content this one stays uncached:
        one copy per content is enough and the map stays one-to-one.
        """
        if not self.enable_caching or block.block_hash is not None:
            return False
        if block_hash in self.cached_block_hash_to_block:
            return False
        block.block_hash = block_hash
        self.cached_block_hash_to_block[block_hash] = block
        if self.block_events is not None:
            self.block_events.append((block_hash, block.block_id, False))
        return True

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        """The block holding this content, referenced or free, if it survived."""
        return self.cached_block_hash_to_block.get(block_hash)

    def _evict(self, block: KVCacheBlock) -> None:
        assert block.block_hash is not None
        del self.cached_block_hash_to_block[block.block_hash]
        if self.block_events is not None:
            self.block_events.append((block.block_hash, block.block_id, True))
        block.block_hash = None

    def take_block_events(self) -> list[tuple[BlockHash, int, bool]]:
        """Blocks cached (their step has run) or evicted since the last call: either way
        their KV is intact until the next step runs."""
        events = self.block_events
        if not events:
            return []
        self.block_events = []
        return events

    def check_invariants(self) -> None:
        """Raise InvariantError unless the pool's bookkeeping is consistent (tests, debug)."""
        queued = list(self.free_block_queue)
        require(
            len(queued) == self.free_block_queue.num_free_blocks,
            f"free count drifted: {self.free_block_queue.num_free_blocks} counted, "
            f"{len(queued)} queued",
        )
        queued_ids = {b.block_id for b in queued}
        require(len(queued_ids) == len(queued), "a block is queued twice")
        num_referenced = 0
        for block in self.blocks:
            require(block.ref_cnt >= 0, f"{block} has a negative ref_cnt")
            if block.ref_cnt == 0:
                require(block.block_id in queued_ids, f"free {block} missing from the queue")
            else:
                num_referenced += 1
                require(block.block_id not in queued_ids, f"referenced {block} is queued")
                require(
                    block.prev_free is None and block.next_free is None,
                    f"referenced {block} is still linked into the free queue",
                )
            if block.block_hash is not None:
                require(
                    self.cached_block_hash_to_block.get(block.block_hash) is block,
                    f"{block} has a hash the map does not point back to",
                )
        require(
            num_referenced + len(queued) == self.num_blocks,
            f"free ({len(queued)}) + referenced ({num_referenced}) != total ({self.num_blocks})",
        )
        for block_hash, block in self.cached_block_hash_to_block.items():
            require(block.block_hash == block_hash, f"map entry for {block} has a stale hash")
        require(
            self.enable_caching or not self.cached_block_hash_to_block,
            "caching is off but blocks are cached",
        )
