"""What the engine hands back to callers, shaped like vLLM's ``RequestOutput``.

``CompletionOutput`` carries the cumulative text/tokens and this step's delta, so the same type
serves the offline API (read the final one) and streaming (send the deltas). Each step hands out
new objects; an output a caller holds does not change afterwards. Invariant: making an output is
O(new tokens), never O(output so far): until a completion finishes, its cumulative ``token_ids``
and ``logprobs`` are ``PrefixView`` objects over the engine's own append-only lists (a finished
completion carries plain lists, handed over once).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class RequestMetrics:
    """Per-request timings in ``time.monotonic()`` seconds (0.0 = not reached)."""

    arrival_time: float
    first_scheduled_time: float = 0.0
    first_token_time: float = 0.0
    finished_time: float = 0.0
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        return self.first_token_time - self.arrival_time if self.first_token_time else None

    @property
    def e2e_latency(self) -> float | None:
        return self.finished_time - self.arrival_time if self.finished_time else None

    @property
    def queue_time(self) -> float | None:
        return self.first_scheduled_time - self.arrival_time if self.first_scheduled_time else None


class PrefixView(Sequence):
    """The first ``length`` items of a list that is only ever appended to: O(1) to make, and it
    never changes, because nothing replaces an item once appended. Compares equal to a list or
    tuple with the same items; ``list(view)`` copies it (e.g. for JSON)."""

    __slots__ = ("_items", "_length")

    def __init__(self, items: list, length: int | None = None):
        self._items = items
        self._length = len(items) if length is None else length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._length)
            if step > 0:
                return self._items[start:stop:step]
            return [self._items[i] for i in range(start, stop, step)]
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError("PrefixView index out of range")
        return self._items[index]

    def __iter__(self):
        return itertools.islice(self._items, self._length)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (list, tuple, PrefixView)):
            return NotImplemented
        return len(other) == self._length and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(list(self))


@dataclass(slots=True)
class Logprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: Sequence[int]                  # cumulative; a PrefixView until finished
    finish_reason: str | None = None          # "stop" | "length" | "abort" | "error" | None
    stop_reason: int | str | None = None      # the stop string or stop token id that ended it
    logprobs: Sequence[Logprob] | None = None  # cumulative, like token_ids
    cumulative_logprob: float | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[Logprob] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    error: str | None = None
