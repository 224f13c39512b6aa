"""Per-request block tables over a ``BlockPool``, with prefix caching.

Invariants after every step: a running request's table holds
``ceil((num_computed_tokens + num_scheduled) / block_size)`` blocks (more after rejected
speculative drafts rolled ``num_computed_tokens`` back: those stay allocated and are rewritten
as it grows); a finished, aborted or preempted request holds none; every block's reference count equals the number of tables that
contain it.

Prefix caching: a full, computed block is named by a chained hash of (parent hash, its token
ids); the first block's parent is the request's extra keys: its tenant (unless tenants share the
cache, ``isolate_tenants=False``) and its ``cache_salt``, length-prefixed so that no two
(tenant, salt) pairs collide. So a request only ever hits blocks cached under its own tenant and
salt, and a cache hit (``num_cached_tokens``, timing) reveals nothing about other tenants' prompts.
The hash is keyed BLAKE2b with a secret drawn per engine (each ``KVCacheManager`` draws its own),
so clients cannot forge collisions or probe another salt's entries offline. A new request reuses
the longest chain of cached full blocks of its tokens, always leaving at least its last token to
compute (its logits are needed).
"""

from __future__ import annotations

import hashlib
import os
from array import array

from conveyor.core.block_pool import BlockPool
from conveyor.core.kv_events import BlockStored
from conveyor.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Allocates blocks as a request's tokens grow, shares cached prefixes, frees on exit."""

    def __init__(self, block_pool: BlockPool, block_size: int, reserve_full: bool = False,
                 enable_prefix_caching: bool = False, isolate_tenants: bool = True):
        """reserve_full: allocate prompt + max_tokens at admission (the Orca-era reservation
        baseline) instead of growing block by block (paged). isolate_tenants: the tenant is part
        of every block's hash (False: tenants share cached prefixes; the salt still counts)."""
        self.pool = block_pool
        self.block_size = block_size
        self.reserve_full = reserve_full
        self.enable_prefix_caching = enable_prefix_caching
        self.isolate_tenants = isolate_tenants
        self._tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[bytes]] = {}   # chained hashes of each request's full blocks
        self._num_cached: dict[str, int] = {}       # leading blocks already registered in the pool
        self._key = os.urandom(32)
        self.num_prefix_queries = 0                  # prompt tokens looked up
        self.num_prefix_hits = 0                     # of which found cached

    def num_blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        """The request's blocks in token order; the list is live (appended to in place)."""
        return self._tables.get(request_id, [])

    # ------------------------------------------------------------------ prefix cache
    def _block_hashes(self, request: Request) -> list[bytes]:
        """Chained hashes of the request's full blocks, extended as its tokens grow."""
        hashes = self._hashes.setdefault(request.request_id, [])
        tokens, bs = request.all_token_ids, self.block_size
        parent = hashes[-1] if hashes else self._root_hash(request)
        for b in range(len(hashes), len(tokens) // bs):
            h = hashlib.blake2b(array("q", tokens[b * bs:(b + 1) * bs]).tobytes(),
                                key=self._key, digest_size=16, person=b"conveyor-kv")
            h.update(parent)
            parent = h.digest()
            hashes.append(parent)
        return hashes

    def _root_hash(self, request: Request) -> bytes:
        """The first block's parent: the request's extra keys (tenant, cache salt)."""
        h = hashlib.blake2b(key=self._key, digest_size=16, person=b"conveyor-root")
        for extra in (request.tenant if self.isolate_tenants else "", request.cache_salt):
            data = extra.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        return h.digest()

    def get_computed_blocks(self, request: Request) -> list[int]:
        """Cached blocks covering the longest prefix of the request's tokens (not its last)."""
        if not self.enable_prefix_caching or request.num_computed_tokens:
            return []
        limit = (request.num_tokens - 1) // self.block_size
        hits = []
        for h in self._block_hashes(request)[:limit]:
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted lookup (not retries of a request that did not fit)."""
        if self.enable_prefix_caching:
            self.num_prefix_queries += num_tokens
            self.num_prefix_hits += num_hit_tokens

    def take_computed_blocks(self, request: Request, blocks: list[int]) -> None:
        """Adopt cache hits as the start of the request's table (before ``allocate_slots``)."""
        if not blocks:
            return
        self.pool.touch(blocks)
        self._tables[request.request_id] = list(blocks)
        self._num_cached[request.request_id] = len(blocks)
        request.num_computed_tokens = len(blocks) * self.block_size

    def cache_computed_blocks(self, request: Request) -> None:
        """Register the request's newly full, computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        full = request.num_computed_tokens // self.block_size
        done = self._num_cached.get(rid, 0)
        if full <= done:
            return
        hashes, table = self._block_hashes(request), self._tables[rid]
        stored = [b for b in range(done, full) if self.pool.cache_block(table[b], hashes[b])]
        self._num_cached[rid] = full
        if stored and self.pool.events is not None:
            self._record_stored(request, hashes, stored)

    def _record_stored(self, request: Request, hashes: list[bytes], stored: list[int]) -> None:
        """One ``BlockStored`` per run of consecutive newly cached blocks (a block whose content
        was cached already breaks a run: it is no news)."""
        bs, tokens = self.block_size, request.all_token_ids
        start = 0
        for i in range(1, len(stored) + 1):
            if i < len(stored) and stored[i] == stored[i - 1] + 1:
                continue
            first, last = stored[start], stored[i - 1]
            self.pool.events.append(BlockStored(
                tuple(hashes[first:last + 1]), hashes[first - 1] if first else None,
                tuple(tokens[first * bs:(last + 1) * bs]), bs,
                request.cache_salt if first == 0 else ""))
            start = i

    def uncache(self, request: Request) -> None:
        """Drop every block the request holds from the prefix cache, the ones it adopted from
        the cache included (a NaN may have come from them), and register none of its blocks any
        more: call before freeing a request whose KV may be corrupt, so that no later request
        adopts it. Requests holding the same blocks keep them, uncached."""
        for block in self._tables.get(request.request_id, ()):
            self.pool.uncache_block(block)
        self._num_cached[request.request_id] = len(self._tables.get(request.request_id, ()))

    # ------------------------------------------------------------------ allocation
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
        self._num_cached.pop(request.request_id, None)
        if table:
            # Tail first: under LRU reuse a sequence's tail is evicted before its shared head.
            self.pool.free(table[::-1])

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix when no request holds a block (see ``BlockPool``)."""
        return self.pool.reset_prefix_cache()

    def forget(self, request: Request) -> None:
        """Drop per-request hash state once the request is gone for good."""
        self._hashes.pop(request.request_id, None)

    @property
    def num_held_blocks(self) -> int:
        """Distinct blocks held by live requests."""
        return len({b for t in self._tables.values() for b in t})

    def check_invariant(self) -> None:
        """free + held == total, and ref counts equal the number of tables holding each block."""
        self.pool.check_invariant()
        counts: dict[int, int] = {}
        for t in self._tables.values():
            for b in t:
                counts[b] = counts.get(b, 0) + 1
        for b, c in counts.items():
            if self.pool.ref_count(b) != c:
                raise AssertionError(f"block {b}: ref count {self.pool.ref_count(b)}, {c} holders")
        if len(counts) + self.pool.num_free_blocks != self.pool.num_blocks:
            raise AssertionError(
                f"block leak: {len(counts)} held + {self.pool.num_free_blocks} free "
                f"!= {self.pool.num_blocks}")
