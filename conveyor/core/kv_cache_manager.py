"""Per-request block tables over a ``BlockPool``.

Invariant after every step: a request's table holds exactly
``ceil((num_computed_tokens + num_scheduled) / block_size)`` blocks while it runs, and nothing
once it finished, aborted or was preempted (``free`` returns every block to the pool).
"""

from __future__ import annotations

from conveyor.core.block_pool import BlockPool
from conveyor.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Allocates blocks as a request's tokens grow and frees them when it leaves."""

    def __init__(self, block_pool: BlockPool, block_size: int, reserve_full: bool = False):
        """reserve_full: allocate prompt + max_tokens at admission (the Orca-era reservation
        baseline) instead of growing block by block (paged)."""
        self.pool = block_pool
        self.block_size = block_size
        self.reserve_full = reserve_full
        self._tables: dict[str, list[int]] = {}

    def num_blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        """The request's blocks in token order; the list is live (appended to in place)."""
        return self._tables.get(request_id, [])

    def allocate_slots(self, request: Request, num_new_tokens: int) -> list[int] | None:
        """Make room for ``num_new_tokens`` more computed tokens.

        Returns the newly added block ids (possibly empty), or None when the pool cannot supply
        them; on None nothing changed.
        """
        table = self._tables.setdefault(request.request_id, [])
        target = request.num_computed_tokens + num_new_tokens
        if self.reserve_full:
            target = max(target, request.num_prompt_tokens + request.max_tokens)
        needed = self.num_blocks_for(target) - len(table)
        if needed <= 0:
            return []
        if not self.pool.can_allocate(needed):
            if not table:
                del self._tables[request.request_id]
            return None
        new_blocks = self.pool.allocate(needed)
        table.extend(new_blocks)
        return new_blocks

    def free(self, request: Request) -> None:
        """Return all of the request's blocks to the pool (idempotent)."""
        table = self._tables.pop(request.request_id, None)
        if table:
            # Free tail first so a later cache-aware pool evicts a sequence's tail before its head.
            self.pool.free(table[::-1])

    @property
    def num_held_blocks(self) -> int:
        return sum(len(t) for t in self._tables.values())

    def check_invariant(self) -> None:
        """free + held == total, and the pool's own bookkeeping is consistent."""
        self.pool.check_invariant()
        held = self.num_held_blocks
        if held + self.pool.num_free_blocks != self.pool.num_blocks:
            raise AssertionError(
                f"block leak: {held} held + {self.pool.num_free_blocks} free != {self.pool.num_blocks}")
