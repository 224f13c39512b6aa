"""Benchmark metrics from records: throughput, latency percentiles, goodput, batch efficiency.

Owns the arithmetic only (no I/O). Definitions, as in vLLM's ``bench serve``:

- duration: from the first arrival (t = 0) to the last successful finish.
- TTFT: first output - arrival. E2E: finish - arrival. TPOT (per request): (finish - first output)
  / (output tokens - 1). ITL: every gap between consecutive output chunks, pooled over requests.
- Percentiles use linear interpolation (numpy's default); latencies are reported in milliseconds.
- Goodput: requests per second that completed and met every SLO given (ttft, tpot, e2e, itl in
  ms); the itl SLO is the inter-token promise: every gap of the request's stream is at most it.
- Groups (per tenant, per priority): the same summary over the group's requests, with throughputs
  over the whole run's duration, so the groups' throughputs add up to the run's.

Batch metrics come from the engine's step log (in-process runs only):

- slot utilization: mean over steps of (requests computing real tokens) / max_num_seqs
  (``conveyor.metrics.batch_usage``, the rule the server's /metrics uses too).
- padding tokens: compute the policy spent on padding (static/dynamic batches), as the engine counts it.
- straggler slot-steps: steps x slots held by a request doing no useful work (a finished member
  waiting for the batch's longest request); empty slot-steps: slots nobody held.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from conveyor.bench.records import RequestRecord, StepSample
from conveyor.bench.workloads import WorkloadError
from conveyor.metrics.batch_usage import slot_counts

SLO_KEYS = ("ttft", "tpot", "e2e", "itl")
GROUP_KEYS = ("tenant", "priority")     # RequestRecord fields a run is broken down by


@dataclass(slots=True)
class Distribution:
    """mean / p50 / p90 / p99 of a latency in milliseconds (None when there are no values)."""

    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None

    @classmethod
    def of(cls, seconds: list[float]) -> "Distribution":
        if not seconds:
            return cls()
        ms = np.asarray(seconds, dtype=float) * 1000.0
        p50, p90, p99 = np.percentile(ms, [50, 90, 99]).tolist()
        return cls(float(ms.mean()), p50, p90, p99)


@dataclass(slots=True)
class RunSummary:
    num_requests: int
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft_ms: Distribution
    itl_ms: Distribution
    tpot_ms: Distribution
    e2e_ms: Distribution
    goodput: float | None = None            # requests/s meeting every SLO; None without SLOs
    goodput_fraction: float | None = None   # share of all requests meeting every SLO
    slos_ms: dict[str, float] | None = None


@dataclass(slots=True)
class BatchSummary:
    num_steps: int
    slot_utilization: float
    padding_tokens: int
    straggler_slot_steps: int
    empty_slot_steps: int
    useful_token_fraction: float           # real tokens / (real + padding tokens)
    mean_kv_usage: float
    mean_queue_depth: float
    max_queue_depth: int
    admissions_per_step: float
    preemptions: int


def parse_slos(items: list[str] | None) -> dict[str, float] | None:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    if not items:
        return None
    slos = {}
    for item in items:
        key, _, value = item.partition(":")
        key = "e2e" if key == "e2el" else key
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if key not in SLO_KEYS or not ms > 0:
            raise WorkloadError(f"not an SLO: {item!r}; use KEY:MILLISECONDS with KEY one of "
                                f"{', '.join(SLO_KEYS)} (e.g. ttft:500 itl:100)")
        slos[key] = ms
    return slos


def meets_slos(rec: RequestRecord, slos: dict[str, float]) -> bool:
    """A completed request meets an SLO when its latency is at most the limit (itl: its longest
    inter-token gap; TPOT and ITL of a one-token request are undefined and count as met)."""
    if not rec.success:
        return False
    values = {"ttft": rec.ttft, "tpot": rec.tpot, "e2e": rec.e2e,
              "itl": max(rec.itls) if rec.itls else None}
    return all(values[k] is None or values[k] * 1000.0 <= limit for k, limit in slos.items())


def summarize(records: list[RequestRecord], slos: dict[str, float] | None = None,
              duration_s: float | None = None) -> RunSummary:
    """Aggregate request records; ``duration_s`` defaults to the last successful finish."""
    ok = [r for r in records if r.success]
    if duration_s is None:
        duration_s = max((r.finish for r in ok), default=0.0)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    tokens_in = sum(r.prompt_len for r in ok)
    tokens_out = sum(r.output_len for r in ok)
    summary = RunSummary(
        num_requests=len(records), completed=len(ok), failed=len(records) - len(ok),
        duration_s=duration_s, total_input_tokens=tokens_in, total_output_tokens=tokens_out,
        request_throughput=per_s(len(ok)), output_throughput=per_s(tokens_out),
        total_token_throughput=per_s(tokens_in + tokens_out),
        ttft_ms=Distribution.of([r.ttft for r in ok if r.ttft is not None]),
        itl_ms=Distribution.of([gap for r in ok for gap in r.itls]),
        tpot_ms=Distribution.of([r.tpot for r in ok if r.tpot is not None]),
        e2e_ms=Distribution.of([r.e2e for r in ok]))
    if slos:
        good = sum(meets_slos(r, slos) for r in records)
        summary.goodput, summary.slos_ms = per_s(good), dict(slos)
        summary.goodput_fraction = good / len(records) if records else 0.0
    return summary


def summarize_groups(records: list[RequestRecord], slos: dict[str, float] | None = None,
                     duration_s: float | None = None) -> dict[str, dict[str, RunSummary]]:
    """Per-group summaries: ``{"tenant": {"A": ..., "B": ...}, "priority": {"0": ..., "1": ...}}``.

    A key appears only when the records hold more than one distinct value of it (keys are
    strings, sorted; priorities numerically). Throughputs divide by ``duration_s`` (default: the
    whole run's, as ``summarize`` computes it), not by the group's own span.
    """
    if duration_s is None:
        duration_s = summarize(records).duration_s
    groups: dict[str, dict[str, RunSummary]] = {}
    for key in GROUP_KEYS:
        values = sorted({getattr(r, key) for r in records})
        if len(values) < 2:
            continue
        groups[key] = {str(v): summarize([r for r in records if getattr(r, key) == v], slos, duration_s)
                       for v in values}
    return groups


def summarize_steps(steps: list[StepSample]) -> BatchSummary | None:
    """Batch efficiency from a step log; None when there are no steps."""
    if not steps:
        return None
    util, straggler, empty = [], 0, 0
    for s in steps:
        num_useful, num_held_idle, num_empty = slot_counts(s.max_num_seqs, s.slot_of,
                                                           set(s.useful_ids))
        util.append(num_useful / s.max_num_seqs)
        straggler += num_held_idle
        empty += num_empty
    real = sum(s.num_scheduled_tokens for s in steps)
    padding = sum(s.num_padding_tokens for s in steps)
    waiting = [s.num_waiting for s in steps]
    return BatchSummary(
        num_steps=len(steps), slot_utilization=float(np.mean(util)), padding_tokens=padding,
        straggler_slot_steps=straggler, empty_slot_steps=empty,
        useful_token_fraction=real / (real + padding) if real + padding else 1.0,
        mean_kv_usage=float(np.mean([s.kv_usage for s in steps])),
        mean_queue_depth=float(np.mean(waiting)), max_queue_depth=max(waiting),
        admissions_per_step=float(np.mean([s.num_new_admissions for s in steps])),
        preemptions=sum(s.num_preemptions for s in steps))


def ratio(value: float | None, base: float | None) -> float | None:
    """value / base, or None when either is missing or base is 0."""
    if value is None or base is None or base == 0 or not math.isfinite(base):
        return None
    return value / base
