"""A policy-free pool of fixed-size KV blocks with reference counts and a free list.

The pool knows nothing about requests: the KV cache manager decides who holds which block.
Invariant (checked by ``check_invariant``): every block is either free (ref count 0, in the free
list exactly once) or held (ref count > 0, not in the free list).
"""

from __future__ import annotations

from collections import deque


class BlockPool:
    """``num_blocks`` blocks, ids ``0 .. num_blocks - 1``; allocation is check-then-act."""

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError("a block pool needs at least one block")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Share of blocks held, in [0, 1]."""
        return 1.0 - len(self._free) / self.num_blocks

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks (ref count 1 each). Call ``can_allocate`` first."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks with {len(self._free)} free")
        ids = [self._free.popleft() for _ in range(n)]
        for i in ids:
            self._ref_counts[i] = 1
        return ids

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; blocks reaching zero return to the free list."""
        for i in block_ids:
            count = self._ref_counts[i]
            if count <= 0:
                raise RuntimeError(f"block {i} freed while not held")
            self._ref_counts[i] = count - 1
            if count == 1:
                self._free.append(i)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def check_invariant(self) -> None:
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a block appears twice in the free list")
        for i, count in enumerate(self._ref_counts):
            if (count == 0) != (i in free):
                raise AssertionError(f"block {i}: ref count {count} but free={i in free}")
