"""A pool of fixed-size KV blocks: reference counts, an LRU free queue, and the prefix-cache map.

The pool knows nothing about requests: the KV cache manager decides who holds which block.
A block is either *held* (ref count > 0) or *free* (ref count 0, in the free queue exactly once).
A free block may still carry a cached prefix hash: its contents stay valid and a later request
with the same prefix can take it back (``touch``). Free blocks are reused least-recently-freed
first, and only then is a cached block's hash evicted.

Invariant (``check_invariant``): free + held == total; cached hashes point at blocks that carry
that hash. With a ``KVEventLog`` every hash leaving the cache is recorded (``BlockRemoved``; the
manager records ``BlockStored``, it knows the tokens), and a reset as ``AllBlocksCleared``.
"""

from __future__ import annotations

from collections import OrderedDict

from conveyor.core.kv_events import AllBlocksCleared, KVEventLog


class BlockPool:
    """``num_blocks`` blocks, ids ``0 .. num_blocks - 1``; allocation is check-then-act."""

    def __init__(self, num_blocks: int, events: KVEventLog | None = None):
        """events: where cache changes are recorded (None: not recorded, no cost)."""
        if num_blocks <= 0:
            raise ValueError("a block pool needs at least one block")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}          # prefix hash -> block holding that content
        self._num_cached_free = 0                    # free blocks carrying a hash (kept in step)
        self.num_evictions = 0
        self.events = events

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now, evictable cached blocks included."""
        return len(self._free)

    @property
    def num_cached_free_blocks(self) -> int:
        """Free blocks that still hold a cached prefix (evictable). O(1): read every step."""
        return self._num_cached_free

    @property
    def usage(self) -> float:
        """Share of blocks held by live requests, in [0, 1] (evictable cached blocks count free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks (ref count 1 each), evicting their cached hashes. Check first."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks with {len(self._free)} free")
        ids = []
        for _ in range(n):
            i, _ = self._free.popitem(last=False)
            self._evict(i)
            self._ref_counts[i] = 1
            ids.append(i)
        return ids

    def _evict(self, i: int) -> None:
        h = self._hash_of[i]
        if h is not None:
            self._num_cached_free -= 1               # only ever called on a block leaving free
            self._hash_of[i] = None
            if self._cached.get(h) == i:
                del self._cached[h]
                self.num_evictions += 1
                if self.events is not None:
                    self.events.removed(h)

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; blocks reaching zero join the free queue's tail
        (most recently used), keeping their cached contents until evicted."""
        for i in block_ids:
            count = self._ref_counts[i]
            if count <= 0:
                raise RuntimeError(f"block {i} freed while not held")
            self._ref_counts[i] = count - 1
            if count == 1:
                self._free[i] = None
                if self._hash_of[i] is not None:
                    self._num_cached_free += 1

    # ------------------------------------------------------------------ prefix cache
    def lookup(self, block_hash: bytes) -> int | None:
        return self._cached.get(block_hash)

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference to cached blocks (a prefix hit); free ones leave the free queue."""
        for i in block_ids:
            if self._ref_counts[i] == 0:
                del self._free[i]
                if self._hash_of[i] is not None:
                    self._num_cached_free -= 1
            self._ref_counts[i] += 1

    def cache_block(self, block_id: int, block_hash: bytes) -> bool:
        """Record that a held, fully computed block holds the content named by ``block_hash``.
        Returns whether the cache gained the hash (False: that content is cached already)."""
        if block_hash in self._cached or self._hash_of[block_id] is not None:
            return False                             # same content cached elsewhere: keep that one
        self._hash_of[block_id] = block_hash
        self._cached[block_hash] = block_id
        return True

    def uncache_block(self, block_id: int) -> None:
        """Forget the cached content of a held block (it may be corrupt): no later request can
        take it from the cache; its holders keep it. Idempotent."""
        h = self._hash_of[block_id]
        if h is None or self._ref_counts[block_id] == 0:
            return                                   # free blocks are counted in _num_cached_free
        self._hash_of[block_id] = None
        if self._cached.get(h) == block_id:
            del self._cached[h]
            if self.events is not None:
                self.events.removed(h)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash, if no block is held (vLLM's rule: a running request's blocks
        stay valid). Returns whether it reset; records ``AllBlocksCleared`` when it did."""
        if len(self._free) != self.num_blocks:
            return False
        self._hash_of = [None] * self.num_blocks
        self._cached.clear()
        self._num_cached_free = 0
        if self.events is not None:
            self.events.append(AllBlocksCleared())
        return True

    def cached_hashes(self) -> set[bytes]:
        """The hashes the prefix cache holds now (what a KV-event subscriber should believe)."""
        return set(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def check_invariant(self) -> None:
        for i, count in enumerate(self._ref_counts):
            if (count == 0) != (i in self._free):
                raise AssertionError(f"block {i}: ref count {count} but free={i in self._free}")
            if count < 0:
                raise AssertionError(f"block {i}: negative ref count")
        for h, i in self._cached.items():
            if self._hash_of[i] != h:
                raise AssertionError(f"cached hash of block {i} is stale")
        if self._num_cached_free != sum(1 for i in self._free if self._hash_of[i] is not None):
            raise AssertionError("cached-free block count drifted")
