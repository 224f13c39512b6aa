"""KV cache events as plain data: which prefix-cached blocks appeared and disappeared.

The block pool and the KV cache manager append to a ``KVEventLog`` when it is given to them
(``None`` otherwise: no event is built, the disabled path costs one ``is None`` test where a
hash changes). The engine drains the log once per step (``take``) and hands the events to a
publisher (``conveyor.kv_events``), which owns the wire format; nothing here knows ZMQ or msgpack.

Order is the order the cache changed in, so a consumer that applies the events in sequence holds
exactly the pool's set of cached hashes (``BlockPool.cached_hashes()``):

- ``BlockStored``: consecutive full blocks of one request got their prefix hashes; ``token_ids``
  holds their tokens in order, ``parent_block_hash`` the hash of the block before the first one
  (None for the first block of a prompt);
- ``BlockRemoved``: blocks lost their hash (evicted for reuse, or dropped as possibly corrupt);
- ``AllBlocksCleared``: the prefix cache was reset.

Hashes are the pool's own 16-byte keyed BLAKE2b digests; the publisher maps them to vLLM's
external form.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: tuple[bytes, ...]
    parent_block_hash: bytes | None
    token_ids: tuple[int, ...]
    block_size: int
    cache_salt: str = ""          # the request's cache salt (part of the first block's hash)


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventLog:
    """The events since the last ``take``, oldest first. Single-threaded: the engine's thread
    appends (inside a step) and takes (after it)."""

    __slots__ = ("_events",)

    def __init__(self) -> None:
        self._events: list[KVEvent] = []

    def append(self, event: KVEvent) -> None:
        self._events.append(event)

    def removed(self, block_hash: bytes) -> None:
        """One block lost its hash; merged into a directly preceding removal."""
        last = self._events[-1] if self._events else None
        if isinstance(last, BlockRemoved):
            self._events[-1] = BlockRemoved(last.block_hashes + (block_hash,))
        else:
            self._events.append(BlockRemoved((block_hash,)))

    def take(self) -> list[KVEvent]:
        """The events so far, and an empty log."""
        events, self._events = self._events, []
        return events

    def __len__(self) -> int:
        return len(self._events)
