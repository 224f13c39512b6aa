"""The belt feed: what every engine step did with its batch slots, kept for the dashboard and
/metrics of a running server.

``read_step`` is the one function that reads engine internals (the scheduler's last
``StepStats`` and its request table); everything else here works on the ``StepRecord`` it
returns. ``BeltFeed.on_step`` runs on the engine thread after every step that computed tokens:
it is O(batch slots), a few microseconds at 64 running (see docs/serving.md, "Dashboard"), and
the heavier work (JSON frames) happens on the event loop, at most a few times a second.
Invariants:

- every step is recorded once; the cumulative counters (steps, slot-steps by state, padding and
  computed tokens) only grow;
- the feed holds at most ``BELT_STEPS`` belt columns and the last minute of step records (and
  never more than ``MAX_RECORDS``), so memory is bounded under any load;
- reads from the event loop see whole records only (one lock around the deques).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from conveyor.metrics.batch_usage import slot_counts
from conveyor.metrics.windows import MINUTE_S

BELT_STEPS = 120          # columns of the belt: the most recent steps
MAX_RECORDS = 20_000      # step records kept for the one-minute aggregates, at most
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


def read_step(engine: Any, step_index: int, started: float, finished: float) -> StepRecord | None:
    """The record of the step ``engine`` just ran (None when it computed nothing: a static batch
    waiting to launch). The only reader of engine internals in the feed."""
    scheduler = engine.core.scheduler
    stats = scheduler.last_stats
    if stats.num_scheduled_tokens == 0 and stats.num_padding_tokens == 0:
        return None
    useful, decodes = set(stats.useful_request_ids), set(stats.decode_request_ids)
    cells, tenants = [], {}
    for rid, slot in stats.slot_of.items():
        if rid not in useful:
            cells.append((slot, rid, PADDING))
            continue
        cells.append((slot, rid, DECODE if rid in decodes else PREFILL))
        req = scheduler.requests.get(rid)      # None: it finished in this step (not counted)
        if req is not None:
            tenants[req.tenant] = tenants.get(req.tenant, 0) + 1
    num_useful, num_held_idle, num_empty = slot_counts(stats.max_num_seqs, stats.slot_of, useful)
    return StepRecord(step_index, finished, max(0.0, finished - started), stats.max_num_seqs,
                      tuple(cells), stats.num_prefill_tokens, stats.num_decode_tokens,
                      stats.num_padding_tokens, stats.num_preemptions, num_useful, num_held_idle,
                      num_empty, tuple(sorted(tenants.items())))


@dataclass(slots=True)
class BatchTotals:
    """Cumulative counters since the server started."""

    num_steps: int = 0
    slot_steps: dict | None = None       # SLOT_STATES -> slot-steps
    padding_tokens: int = 0
    computed_tokens: int = 0             # real tokens (prefill + decode)
    step_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.slot_steps = dict.fromkeys(SLOT_STATES, 0)


class BeltFeed:
    """Step records of a running engine; see the module docstring."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.started = clock()
        self.totals = BatchTotals()
        self._belt: deque[StepRecord] = deque(maxlen=BELT_STEPS)
        self._recent: deque[StepRecord] = deque(maxlen=MAX_RECORDS)
        self._lock = threading.Lock()

    def on_step(self, engine: Any, started: float, finished: float) -> None:
        """Record the step ``engine`` just finished (engine thread)."""
        record = read_step(engine, self.totals.num_steps, started, finished)
        if record is not None:
            self.add(record)

    def add(self, record: StepRecord) -> None:
        with self._lock:
            t = self.totals
            t.num_steps += 1
            for state, n in zip(SLOT_STATES, (record.num_useful, record.num_held_idle,
                                              record.num_empty)):
                t.slot_steps[state] += n
            t.padding_tokens += record.num_padding_tokens
            t.computed_tokens += record.num_prefill_tokens + record.num_decode_tokens
            t.step_seconds += record.duration_s
            self._belt.append(record)
            self._recent.append(record)

    def belt(self) -> list[StepRecord]:
        with self._lock:
            return list(self._belt)

    def recent(self, now: float, span_s: float = MINUTE_S) -> list[StepRecord]:
        """The records of steps that ended at most ``span_s`` seconds before ``now``."""
        with self._lock:
            while self._recent and self._recent[0].end_time < now - MINUTE_S:
                self._recent.popleft()
            return [r for r in self._recent if r.end_time >= now - span_s]


def usage_of(records: list[StepRecord]) -> dict[str, float | int | None]:
    """Slot utilization, padding waste (padding / (real + padding) tokens), idle slot-steps
    (held without work + empty) and preemptions over ``records``."""
    slots = sum(r.max_num_seqs for r in records)
    real = sum(r.num_prefill_tokens + r.num_decode_tokens for r in records)
    padding = sum(r.num_padding_tokens for r in records)
    return {"num_steps": len(records),
            "slot_utilization": sum(r.num_useful for r in records) / slots if slots else None,
            "padding_waste": padding / (real + padding) if real + padding else None,
            "held_idle_slot_steps": sum(r.num_held_idle for r in records),
            "empty_slot_steps": sum(r.num_empty for r in records),
            "prefill_tokens": sum(r.num_prefill_tokens for r in records),
            "preemptions": sum(r.num_preemptions for r in records),
            "mean_step_ms": 1000.0 * sum(r.duration_s for r in records) / len(records)
            if records else None}


def tenant_shares(records: list[StepRecord]) -> list[dict]:
    """Each tenant's share of the useful slot-steps of ``records``, largest first."""
    counts: dict[str, int] = {}
    for r in records:
        for tenant, n in r.tenant_slots:
            counts[tenant] = counts.get(tenant, 0) + n
    total = sum(counts.values())
    return [{"tenant": tenant or "default", "share": n / total, "slot_steps": n}
            for tenant, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
