"""``KVEventsConfig``: vLLM's ``--kv-events-config`` JSON, checked at construction.

The keys are vLLM's (``enable_kv_cache_events``, ``publisher``, ``endpoint``, ``replay_endpoint``,
``buffer_steps``, ``hwm``, ``max_queue_size``, ``topic``), with vLLM's defaults, so a vLLM
command line's value works unchanged. One key is conveyor's own: ``event_encoding``, "map" (each
event a tagged msgpack map, what vLLM publishes since its KV events switched away from
positional arrays) or "array" (the older tagged positional arrays, for subscribers built before
that switch). Invalid values raise ``ConfigError`` naming ``kv_events_config``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from conveyor.config_flags import config_from_json
from conveyor.errors import ConfigError

PUBLISHERS = ("null", "zmq")
ENCODINGS = ("map", "array")
_ENDPOINT = re.compile(r"^(tcp://[^\s:/]+|tcp://\[[0-9a-fA-F:.]+\]):(\d+|\*)$|^(ipc|inproc)://\S+$")
_FIELD = "kv_events_config"


@dataclass(frozen=True, slots=True)
class KVEventsConfig:
    """Where and how KV cache events are published (vLLM's names and defaults).

    publisher: None resolves as vLLM does: "zmq" when ``enable_kv_cache_events``, else "null".
    endpoint: the PUB socket; bound when it holds a wildcard (``*``, ``::``) or is ipc/inproc,
        connected otherwise (vLLM's rule). replay_endpoint: an optional ROUTER socket (always
        bound) that re-sends buffered batches from a requested sequence number.
    buffer_steps: batches kept for replay; hwm: the PUB socket's high-water mark (messages a
        slow subscriber may queue before ZMQ drops for it); max_queue_size: batches waiting for
        the publisher thread before new ones are dropped (counted; the step never blocks).
    """

    enable_kv_cache_events: bool = False
    publisher: str | None = None
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""
    event_encoding: str = "map"

    def __post_init__(self) -> None:
        if self.publisher is None:
            object.__setattr__(self, "publisher",
                               "zmq" if self.enable_kv_cache_events else "null")
        _require(isinstance(self.enable_kv_cache_events, bool),
                 "enable_kv_cache_events must be true or false")
        _require(self.publisher in PUBLISHERS,
                 f"unknown publisher {self.publisher!r}; use one of {list(PUBLISHERS)}")
        _require(self.event_encoding in ENCODINGS,
                 f"event_encoding must be one of {list(ENCODINGS)}; got {self.event_encoding!r}")
        for name in ("endpoint", "replay_endpoint"):
            value = getattr(self, name)
            if value is not None or name == "endpoint":
                _require(isinstance(value, str) and bool(_ENDPOINT.match(value)),
                         f"{name} {value!r} is not a ZMQ endpoint (tcp://HOST:PORT, "
                         f"tcp://*:PORT, ipc://PATH or inproc://NAME)")
        for name, low in (("buffer_steps", 0), ("hwm", 0), ("max_queue_size", 1)):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value >= low,
                     f"{name} must be an integer >= {low}; got {value!r}")
        _require(isinstance(self.topic, str), "topic must be a string")

    @property
    def is_enabled(self) -> bool:
        """Events are recorded and published (enabled, and a publisher that publishes)."""
        return self.enable_kv_cache_events and self.publisher != "null"

    @classmethod
    def from_json(cls, value: "str | dict | KVEventsConfig | None") -> "KVEventsConfig | None":
        """From ``--kv-events-config`` JSON text or a dict (None stays None)."""
        return config_from_json(cls, value, _FIELD)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"{_FIELD}: {message}", _FIELD)
