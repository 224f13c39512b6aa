"""Routing policies for engine replicas, as pure logic: no Ray, no clock, no I/O.

Owns the decisions the Ray request routers (``conveyor.ray.router``) make: the rendering of a
request's prompt into text, the chained chunk hashes of that text, the per-replica prefix index,
the prefix-aware choice balanced against load, and round-robin order. Replicas are any hashable
keys (Ray's ``ReplicaID`` in production, strings in tests).

Invariants: the index holds at most ``max_chunks_per_replica`` hashes per replica and no entry
for a replica it was told is gone; a ranking names every candidate exactly once.

The prefix index approximates the engines' prefix caches. It hashes fixed-size chunks of the
request's *text* (roles and contents in order, tools after a leading system message, or the
completion prompt), where an engine hashes token blocks of the templated prompt: equal leading
chunks mean equal leading text and so (up to a token straddling a chunk edge) equal leading
blocks. What a replica's engine has evicted, or never cached because the request failed, the
index still believes is there until its own LRU drops it; it forgets a path tail-first, as the
engine's block pool does, so the leading chunks that matter most stay longest.
"""

from __future__ import annotations

import enum
import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Sequence

from conveyor.errors import ConfigError

ReplicaKey = Hashable


@dataclass(frozen=True, slots=True)
class PrefixRoutingConfig:
    """The knobs of the ``prefix`` router (its ``request_router_kwargs``)."""

    chunk_chars: int = 64                # text per hashed chunk (~16 tokens, one KV block)
    max_chunks_per_replica: int = 32768  # index bound per replica (LRU); ~2M chars of prompts
    imbalance_threshold: int = 4         # max extra load (waiting + running) a match may cost
    min_match_fraction: float = 0.1      # a match shorter than this share of the prompt is none
    per_credential: bool = True          # API keys never share prefixes (tenant-scoped cache)

    def __post_init__(self) -> None:
        for name in ("chunk_chars", "max_chunks_per_replica"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"prefix router: {name} must be an integer >= 1; "
                                  f"got {getattr(self, name)!r}", name)
        if not isinstance(self.per_credential, bool):
            raise ConfigError("prefix router: per_credential must be true or false; "
                              f"got {self.per_credential!r}", "per_credential")
        if not isinstance(self.imbalance_threshold, int) or self.imbalance_threshold < 0:
            raise ConfigError("prefix router: imbalance_threshold must be an integer >= 0; "
                              f"got {self.imbalance_threshold!r}", "imbalance_threshold")
        fraction = self.min_match_fraction
        if not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise ConfigError("prefix router: min_match_fraction must be a number in [0, 1]; "
                              f"got {fraction!r}", "min_match_fraction")

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> PrefixRoutingConfig:
        """Build from ``request_router_kwargs``; an unknown key is a ``ConfigError``."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"prefix router: unknown option(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(known))}", unknown[0])
        return cls(**kwargs)


# -- the text a request's prompt renders to -------------------------------------------------

def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):   # content parts: the text ones, in order
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part)
                       for part in content)
    return json.dumps(content, sort_keys=True)


def _message_text(message: Any) -> str:
    if not isinstance(message, dict):
        return str(message)
    parts = [str(message.get("role", "")), str(message.get("name", "") or ""),
             _content_text(message.get("content"))]
    if message.get("tool_calls"):
        parts.append(json.dumps(message["tool_calls"], sort_keys=True))
    if message.get("tool_call_id"):
        parts.append(str(message["tool_call_id"]))
    return "\x1f".join(parts) + "\x1e"


def request_text(body: Mapping[str, Any] | None) -> str | None:
    """The text of a completion or chat request's prompt, in the order the engine sees it, or
    None when the body has neither ``messages`` nor ``prompt`` (e.g. ``/v1/models``).

    Chat: each message's role, name, content (text parts), tool calls, with the ``tools`` after
    the leading system message (where chat templates put them). Completion: the prompt string,
    or the first prompt of a batch (a token-id list renders as its numbers)."""
    if not isinstance(body, Mapping):
        return None
    messages = body.get("messages")
    if isinstance(messages, list):
        texts = [_message_text(m) for m in messages]
        tools = body.get("tools")
        if tools:
            leading_system = bool(messages) and isinstance(messages[0], dict) \
                and messages[0].get("role") in ("system", "developer")
            texts.insert(1 if leading_system else 0, json.dumps(tools, sort_keys=True) + "\x1e")
        return "".join(texts)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return ",".join(str(token) for token in prompt) + ","
    return None


def chunk_hashes(text: str, chunk_chars: int, scope: Hashable = None) -> list[int]:
    """Chained hashes of the full ``chunk_chars``-long chunks of ``text`` (a partial tail chunk
    is not hashed, as the engine caches full blocks only); hash i stands for ``text[:(i+1)*c]``
    within ``scope`` (what else keys the engine's cache: see ``cache_scope``). Python's ``hash``
    is salted per process, and the index lives in one process."""
    hashes: list[int] = []
    previous = hash(("conveyor-prefix", scope))
    for start in range(0, len(text) - chunk_chars + 1, chunk_chars):
        previous = hash((previous, text[start:start + chunk_chars]))
        hashes.append(previous)
    return hashes


def cache_scope(body: Mapping[str, Any] | None, credential: str | None) -> Hashable:
    """What, besides the text, keys an engine's prefix cache: the request's ``cache_salt`` and
    its tenant. The router cannot map an API key to its tenant, so it scopes by the credential
    itself (``per_credential``; off for ``--prefix-cache-scope global``)."""
    salt = body.get("cache_salt") if isinstance(body, Mapping) else None
    return (salt if isinstance(salt, str) else None, credential)


# -- the index ------------------------------------------------------------------------------

@dataclass(slots=True)
class PrefixIndex:
    """Per replica, an LRU set of the chunk hashes of the prompts routed to it."""

    max_chunks_per_replica: int
    _chunks: dict[ReplicaKey, OrderedDict[int, None]] = field(default_factory=dict)

    def record(self, replica: ReplicaKey, hashes: Sequence[int]) -> None:
        """Note that ``replica`` now holds the prefix ``hashes``; drop its least recent beyond
        the bound. Touched deepest-first, so a path's leading chunks are its most recent."""
        chunks = self._chunks.setdefault(replica, OrderedDict())
        for h in reversed(hashes):
            chunks[h] = None
            chunks.move_to_end(h)
        while len(chunks) > self.max_chunks_per_replica:
            chunks.popitem(last=False)

    def match_len(self, replica: ReplicaKey, hashes: Sequence[int]) -> int:
        """How many leading chunks of ``hashes`` ``replica`` holds."""
        chunks = self._chunks.get(replica)
        if not chunks:
            return 0
        for n, h in enumerate(hashes):
            if h not in chunks:
                return n
        return len(hashes)

    def num_chunks(self, replica: ReplicaKey) -> int:
        return len(self._chunks.get(replica, ()))

    def replicas(self) -> set[ReplicaKey]:
        return set(self._chunks)

    def remove(self, replica: ReplicaKey) -> None:
        """Forget a replica that left (died, scaled down)."""
        self._chunks.pop(replica, None)

    def retain(self, live: set[ReplicaKey]) -> None:
        """Forget every replica not in ``live``."""
        for replica in list(self._chunks):
            if replica not in live:
                del self._chunks[replica]


# -- decisions ------------------------------------------------------------------------------

class RouteReason(enum.Enum):
    PREFIX = "prefix"            # the longest match, within the imbalance threshold
    IMBALANCED = "imbalanced"    # a match exists only on replicas loaded too far above the least
    NO_MATCH = "no_match"        # no replica holds a match worth having
    NO_PROMPT = "no_prompt"      # no prompt text (or shorter than one chunk)


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """A ranking of the candidates (best first, each once) and why the first is first."""

    ranked: tuple[ReplicaKey, ...]
    reason: RouteReason
    matched_chunks: int          # leading chunks the first replica holds (0 for a fallback)


@dataclass(slots=True)
class PrefixPolicy:
    """The ``prefix`` policy: route to the replica holding the longest prefix of the prompt
    unless its load exceeds the least loaded's by more than ``imbalance_threshold``; without a
    match worth having, to the least loaded (ties: the replica indexing the fewest chunks, so
    distinct prefixes spread). Call ``record`` once the request is sent."""

    config: PrefixRoutingConfig = field(default_factory=PrefixRoutingConfig)
    index: PrefixIndex = field(init=False)

    def __post_init__(self) -> None:
        self.index = PrefixIndex(self.config.max_chunks_per_replica)

    def hashes(self, body: Mapping[str, Any] | None, credential: str | None = None) -> list[int]:
        """The chunk hashes of a request (``body``: its JSON; ``credential``: its
        ``Authorization`` header), [] when it has no prompt."""
        text = request_text(body)
        if not text:
            return []
        scope = cache_scope(body, credential if self.config.per_credential else None)
        return chunk_hashes(text, self.config.chunk_chars, scope)

    def choose(self, hashes: Sequence[int], loads: Mapping[ReplicaKey, int]) -> RouteDecision:
        """Rank the replicas in ``loads`` (replica -> waiting + running) for a request whose
        prompt has chunk ``hashes``. ``loads`` must not be empty."""
        if not loads:
            raise ValueError("choose() needs at least one candidate replica")
        by_load = sorted(loads, key=lambda r: (loads[r], self.index.num_chunks(r)))
        if not hashes:
            return RouteDecision(tuple(by_load), RouteReason.NO_PROMPT, 0)
        needed = max(1, math.ceil(self.config.min_match_fraction * len(hashes)))
        matches = {r: self.index.match_len(r, hashes) for r in by_load}
        ceiling = loads[by_load[0]] + self.config.imbalance_threshold
        eligible = [r for r in by_load if loads[r] <= ceiling]
        best = max(eligible, key=lambda r: matches[r])   # max keeps the first (least loaded) tie
        if matches[best] >= needed:
            rest = tuple(r for r in by_load if r != best)
            return RouteDecision((best,) + rest, RouteReason.PREFIX, matches[best])
        reason = (RouteReason.IMBALANCED if any(m >= needed for m in matches.values())
                  else RouteReason.NO_MATCH)
        return RouteDecision(tuple(by_load), reason, 0)

    def record(self, replica: ReplicaKey, hashes: Sequence[int]) -> None:
        if hashes:
            self.index.record(replica, hashes)


@dataclass(slots=True)
class RoundRobin:
    """Strict rotation over the candidates in the order given (the next one first, then the
    rest in rotation order, for when the first is full)."""

    cursor: int = 0

    def order(self, replicas: Sequence[ReplicaKey]) -> tuple[ReplicaKey, ...]:
        if not replicas:
            return ()
        start = self.cursor % len(replicas)
        self.cursor = start + 1
        return tuple(replicas[start:]) + tuple(replicas[:start])
