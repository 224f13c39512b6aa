"""The belt feed: what every engine step did with its batch slots, kept for the dashboard and
/metrics of a running server.

``read_step`` turns the engine's last ``StepStats`` (``LLMEngine.last_step_stats``: data, the
engine's public output) into the ``StepRecord`` everything else here works on. ``BeltFeed.on_step`` runs on the engine thread after every step that computed tokens:
it is O(batch slots), a few microseconds at 64 running (see docs/serving.md, "Dashboard"), and
the heavier work (JSON frames) happens on the event loop, at most a few times a second.
Invariants:

- every step is recorded once; the cumulative counters (steps, slot-steps by state, padding and
  computed tokens) only grow;
- the feed holds at most ``BELT_STEPS`` belt columns and 61 one-second sums of the steps (the
  last minute), so memory is bounded under any load and reading it costs the same at any rate;
- reads from the event loop see whole records and sums only (one lock around the deques).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from conveyor.core.outputs import StepStats
from conveyor.metrics.batch_usage import slot_counts
from conveyor.metrics.windows import MINUTE_S

BELT_STEPS = 120          # columns of the belt: the most recent steps
PREFILL, DECODE, PADDING = "prefill", "decode", "padding"
SLOT_STATES = ("useful", "held_idle", "empty")


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One engine step. cells: ``(slot, request_id, kind)`` for every held slot, kind one of
    prefill (computed prompt tokens), decode (one new token), padding (held, no useful work);
    tenant_slots: useful slots per tenant (a request's last step, once it has left the scheduler's
    table, is not counted)."""

    step_index: int
    end_time: float
    duration_s: float
    max_num_seqs: int
    cells: tuple[tuple[int, str, str], ...]
    num_prefill_tokens: int
    num_decode_tokens: int
    num_padding_tokens: int
    num_preemptions: int
    num_useful: int
    num_held_idle: int
    num_empty: int
    tenant_slots: tuple[tuple[str, int], ...]


def read_step(stats: StepStats | None, step_index: int, started: float,
              finished: float) -> StepRecord | None:
    """The record of a step from its ``StepStats`` (None when it computed nothing: a static batch
    waiting to launch)."""
    if stats is None or (stats.num_scheduled_tokens == 0 and stats.num_padding_tokens == 0):
        return None
    useful, decodes = set(stats.useful_request_ids), set(stats.decode_request_ids)
    cells = [(slot, rid, (DECODE if rid in decodes else PREFILL) if rid in useful else PADDING)
             for rid, slot in stats.slot_of.items()]
    num_useful, num_held_idle, num_empty = slot_counts(stats.max_num_seqs, stats.slot_of, useful)
    return StepRecord(step_index, finished, max(0.0, finished - started), stats.max_num_seqs,
                      tuple(cells), stats.num_prefill_tokens, stats.num_decode_tokens,
                      stats.num_padding_tokens, stats.num_preemptions, num_useful, num_held_idle,
                      num_empty, tuple(sorted(stats.tenant_slots.items())))


@dataclass(slots=True)
class BatchTotals:
    """Sums over steps: since the server started (``BeltFeed.totals``), or over one second of
    steps (the buckets the one-minute aggregates add up)."""

    num_steps: int = 0
    num_slots: int = 0                   # sum of max_num_seqs: slot-steps in all
    slot_steps: dict = field(default_factory=lambda: dict.fromkeys(SLOT_STATES, 0))
    prefill_tokens: int = 0
    decode_tokens: int = 0
    padding_tokens: int = 0
    preemptions: int = 0
    step_seconds: float = 0.0
    tenant_slots: dict = field(default_factory=dict)     # tenant -> useful slot-steps

    @property
    def computed_tokens(self) -> int:
        """Real tokens (prefill + decode)."""
        return self.prefill_tokens + self.decode_tokens

    def add(self, r: StepRecord) -> None:
        self.num_steps += 1
        self.num_slots += r.max_num_seqs
        for state, n in zip(SLOT_STATES, (r.num_useful, r.num_held_idle, r.num_empty)):
            self.slot_steps[state] += n
        self.prefill_tokens += r.num_prefill_tokens
        self.decode_tokens += r.num_decode_tokens
        self.padding_tokens += r.num_padding_tokens
        self.preemptions += r.num_preemptions
        self.step_seconds += r.duration_s
        for tenant, n in r.tenant_slots:
            self.tenant_slots[tenant] = self.tenant_slots.get(tenant, 0) + n

    def merge(self, other: "BatchTotals") -> None:
        for name in ("num_steps", "num_slots", "prefill_tokens", "decode_tokens",
                     "padding_tokens", "preemptions", "step_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for state in SLOT_STATES:
            self.slot_steps[state] += other.slot_steps[state]
        for tenant, n in other.tenant_slots.items():
            self.tenant_slots[tenant] = self.tenant_slots.get(tenant, 0) + n


class BeltFeed:
    """Step records of a running engine; see the module docstring. The one-minute aggregates
    are kept in one-second buckets, so reading them is O(60) whatever the step rate."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.started = clock()
        self.totals = BatchTotals()
        self.num_slots = 0                  # the engine's max_num_seqs, once a step ran
        self._belt: deque[StepRecord] = deque(maxlen=BELT_STEPS)
        self._buckets: deque[tuple[int, BatchTotals]] = deque(maxlen=int(MINUTE_S) + 1)
        self._lock = threading.Lock()

    def on_step(self, engine: Any, started: float, finished: float) -> None:
        """Record the step ``engine`` just finished (engine thread)."""
        record = read_step(engine.last_step_stats, self.totals.num_steps, started, finished)
        if record is not None:
            self.add(record)

    def add(self, record: StepRecord) -> None:
        second = int(record.end_time)
        with self._lock:
            self.totals.add(record)
            if not self._buckets or self._buckets[-1][0] != second:
                self._buckets.append((second, BatchTotals()))
            self._buckets[-1][1].add(record)
            self._belt.append(record)
            self.num_slots = record.max_num_seqs

    def belt(self, after_step: int = -1) -> list[StepRecord]:
        """The belt's records (oldest first), only those after step ``after_step`` if given."""
        with self._lock:
            return [r for r in self._belt if r.step_index > after_step]

    def window(self, now: float, span_s: float = MINUTE_S) -> tuple[BatchTotals, float]:
        """Sums over the steps of about the last ``span_s`` seconds (whole seconds: from the
        start of the second ``span_s - 1`` before ``now``), and the seconds that covers."""
        first = int(now) - max(1, int(span_s)) + 1
        sums = BatchTotals()
        with self._lock:
            for second, bucket in self._buckets:
                if second >= first:
                    sums.merge(bucket)
        return sums, max(1e-9, now - first)


def usage_of(t: BatchTotals) -> dict[str, float | int | None]:
    """Slot utilization, padding waste (padding / (real + padding) tokens), held-idle and
    empty slot-steps, prefill tokens, preemptions and the mean step time of ``t``."""
    real_and_padding = t.computed_tokens + t.padding_tokens
    return {"num_steps": t.num_steps,
            "slot_utilization": t.slot_steps["useful"] / t.num_slots if t.num_slots else None,
            "padding_waste": t.padding_tokens / real_and_padding if real_and_padding else None,
            "held_idle_slot_steps": t.slot_steps["held_idle"],
            "empty_slot_steps": t.slot_steps["empty"],
            "prefill_tokens": t.prefill_tokens,
            "preemptions": t.preemptions,
            "mean_step_ms": 1000.0 * t.step_seconds / t.num_steps if t.num_steps else None}


def tenant_shares(t: BatchTotals) -> list[dict]:
    """Each tenant's share of the useful slot-steps in ``t``, largest first."""
    total = sum(t.tenant_slots.values())
    return [{"tenant": tenant or "default", "share": n / total, "slot_steps": n}
            for tenant, n in sorted(t.tenant_slots.items(), key=lambda kv: (-kv[1], kv[0]))]
