"""vLLM's KV-event wire format, written with ``msgpack`` as vLLM's msgspec encoder lays it out.

A ZMQ message is three frames: ``[topic, seq, payload]``, ``seq`` an 8-byte big-endian counter
(+1 per batch) and ``payload`` one msgpack-encoded ``KVEventBatch``:

- the batch is a positional array ``[ts, events, data_parallel_rank]`` (msgspec ``array_like``);
  ``ts`` a float64 of wall-clock seconds, ``data_parallel_rank`` 0;
- encoding "map" (vLLM now): each event a map whose first key is the tag ``"type"`` (the class
  name), then its fields in declaration order, fields at their default (None) left out. Stored:
  ``block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name,
  extra_keys, group_idx, kv_cache_spec_kind``; removed: ``block_hashes, medium, group_idx``;
  cleared: the tag alone;
- encoding "array" (vLLM before the switch): each event a positional array led by its tag:
  ``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium]``,
  ``["BlockRemoved", block_hashes, medium]``, ``["AllBlocksCleared"]``.

Block hashes: conveyor's are 16-byte keyed BLAKE2b digests; on the wire a hash is its last 8
bytes read big-endian as an unsigned 64-bit int, the form vLLM sends by default
(``ExternalBlockHash`` as int). ``medium`` is "GPU", what vLLM sends for its primary KV pool on
every device (its CPU backend included): it names the engine's own pool, not the hardware.
"""

from __future__ import annotations

from typing import Any

import msgpack

from conveyor.core.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

MEDIUM = "GPU"
KV_CACHE_SPEC_KIND = "full_attention"   # one block table serves every layer (windows included)


def external_hash(block_hash: bytes) -> int:
    """A pool hash as vLLM's integer ``ExternalBlockHash`` (last 8 bytes, big-endian)."""
    return int.from_bytes(block_hash[-8:], "big")


def encode_batch(ts: float, events: list[KVEvent], encoding: str = "map",
                 data_parallel_rank: int = 0) -> bytes:
    """One ``KVEventBatch`` payload."""
    one = _as_map if encoding == "map" else _as_array
    return msgpack.packb([float(ts), [one(e) for e in events], data_parallel_rank],
                         use_bin_type=True)


def _as_map(event: KVEvent) -> dict[str, Any]:
    if isinstance(event, BlockStored):
        n = len(event.block_hashes)
        extra = [(event.cache_salt,) if i == 0 and event.cache_salt else None for i in range(n)]
        return {"type": "BlockStored",
                "block_hashes": [external_hash(h) for h in event.block_hashes],
                "parent_block_hash": _parent(event), "token_ids": list(event.token_ids),
                "block_size": event.block_size, "lora_id": None, "medium": MEDIUM,
                "lora_name": None, "extra_keys": extra, "group_idx": 0,
                "kv_cache_spec_kind": KV_CACHE_SPEC_KIND}
    if isinstance(event, BlockRemoved):
        return {"type": "BlockRemoved",
                "block_hashes": [external_hash(h) for h in event.block_hashes],
                "medium": MEDIUM, "group_idx": 0}
    return {"type": "AllBlocksCleared"}


def _as_array(event: KVEvent) -> list[Any]:
    if isinstance(event, BlockStored):
        return ["BlockStored", [external_hash(h) for h in event.block_hashes], _parent(event),
                list(event.token_ids), event.block_size, None, MEDIUM]
    if isinstance(event, BlockRemoved):
        return ["BlockRemoved", [external_hash(h) for h in event.block_hashes], MEDIUM]
    return ["AllBlocksCleared"]


def _parent(event: BlockStored) -> int | None:
    return None if event.parent_block_hash is None else external_hash(event.parent_block_hash)


def decode_batch(payload: bytes) -> tuple[float, list[dict[str, Any]], int | None]:
    """A subscriber's view of a payload in either encoding: ``(ts, events, rank)``, each event a
    dict with its ``type`` and named fields (array events get their fields' names)."""
    batch = msgpack.unpackb(payload, raw=False)
    ts, events = batch[0], batch[1]
    rank = batch[2] if len(batch) > 2 else None
    return ts, [e if isinstance(e, dict) else _named(e) for e in events], rank


_ARRAY_FIELDS = {"BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size",
                                 "lora_id", "medium"),
                 "BlockRemoved": ("block_hashes", "medium"), "AllBlocksCleared": ()}


def _named(event: list[Any]) -> dict[str, Any]:
    tag = event[0]
    return {"type": tag, **dict(zip(_ARRAY_FIELDS[tag], event[1:]))}


def is_cleared(event: dict[str, Any]) -> bool:
    return event["type"] == AllBlocksCleared.__name__
