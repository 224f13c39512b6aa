"""The headline numbers of each ``conveyor bench scenario``, computed from its runs' records.

Owns the names and definitions of the findings (flat ``{name: number or None}`` dicts, so the
console can print them as they are and a script can read them without knowing the scenario):

- fairness: each tenant's TTFT p50/p99 in each run, and ``B_ttft_p99_vs_alone.fcfs`` /
  ``.fair`` = B's TTFT p99 with A there / B's TTFT p99 alone.
- priority: each class's TTFT p50/p99 per run, and ``<class>_ttft_p99_priority_vs_fcfs``.
- prefix: request throughput with the prefix cache on / off, its token hit rate, the share of
  prompt tokens served from the cache, TTFT p50 on / off.
- preemption: throughput and preemptions by mode per run, throughput relative to the first mode.

Latencies in milliseconds; a ratio is None where either side is missing or zero.
"""

from __future__ import annotations

from typing import Callable

from conveyor.bench.metrics import Distribution, ratio, summarize
from conveyor.bench.offline import RunResult
from conveyor.bench.records import RequestRecord
from conveyor.bench.scenarios.workloads import HIGH, LOW, TENANT_A, TENANT_B


def ttft_of(run: RunResult, keep: Callable[[RequestRecord], bool]) -> Distribution:
    """TTFT distribution (ms) of the run's completed requests that ``keep`` selects."""
    return Distribution.of([r.ttft for r in run.records if keep(r) and r.success and r.ttft is not None])


def _ttft_findings(runs: list[RunResult], classes: dict[str, Callable]) -> dict:
    out = {}
    for run in runs:
        for name, keep in classes.items():
            dist = ttft_of(run, keep)
            if dist.p50 is not None:
                out[f"{run.label}.{name}.ttft_p50_ms"] = dist.p50
                out[f"{run.label}.{name}.ttft_p99_ms"] = dist.p99
    return out


def _load(rate: float, capacity: float | None) -> dict:
    return {"offered_rate_req_s": rate, "measured_capacity_req_s": capacity}


def fairness_findings(runs: list[RunResult], rate: float, capacity: float | None) -> dict:
    """Runs labelled ``B-alone``, ``A+B-fcfs``, ``A+B-fair`` (as ``run_fairness`` makes them)."""
    out = _load(rate, capacity)
    out.update(_ttft_findings(runs, {t: (lambda r, t=t: r.tenant == t) for t in (TENANT_A, TENANT_B)}))
    alone = out.get("B-alone.B.ttft_p99_ms")
    for policy in ("fcfs", "fair"):
        out[f"B_ttft_p99_vs_alone.{policy}"] = ratio(out.get(f"A+B-{policy}.B.ttft_p99_ms"), alone)
    return out


def priority_findings(runs: list[RunResult], rate: float, capacity: float | None) -> dict:
    """Runs labelled ``fcfs`` and ``priority``; classes ``high`` (priority 0) and ``low`` (1)."""
    classes = {"high": lambda r: r.priority == HIGH, "low": lambda r: r.priority == LOW}
    out = _load(rate, capacity)
    out.update(_ttft_findings(runs, classes))
    for name in classes:
        out[f"{name}_ttft_p99_priority_vs_fcfs"] = ratio(out.get(f"priority.{name}.ttft_p99_ms"),
                                                         out.get(f"fcfs.{name}.ttft_p99_ms"))
    return out


def prefix_findings(runs: list[RunResult]) -> dict:
    """Runs labelled ``prefix-cache-off`` and ``prefix-cache-on``."""
    by = {run.label: run for run in runs}
    off, on = summarize(by["prefix-cache-off"].records), summarize(by["prefix-cache-on"].records)
    cache = (by["prefix-cache-on"].engine_stats or {}).get("prefix_cache") or {}
    cached = sum(r.cached_tokens or 0 for r in by["prefix-cache-on"].records if r.success)
    return {"request_throughput.off": off.request_throughput,
            "request_throughput.on": on.request_throughput,
            "request_throughput_on_vs_off": ratio(on.request_throughput, off.request_throughput),
            "prefix_hit_rate": cache.get("hit_rate"),
            "cached_prompt_token_share": ratio(cached, on.total_input_tokens),
            "ttft_p50_ms.off": off.ttft_ms.p50, "ttft_p50_ms.on": on.ttft_ms.p50,
            "ttft_p50_on_vs_off": ratio(on.ttft_ms.p50, off.ttft_ms.p50)}


def preemption_findings(runs: list[RunResult]) -> dict:
    """One run per preemption mode, labelled by the mode."""
    out = {}
    first = summarize(runs[0].records).output_throughput if runs else None
    for run in runs:
        s = summarize(run.records)
        out[f"{run.label}.output_throughput"] = s.output_throughput
        out[f"{run.label}.request_throughput"] = s.request_throughput
        for mode, n in ((run.engine_stats or {}).get("preemptions_by_mode") or {}).items():
            out[f"{run.label}.preemptions.{mode}"] = n
        out[f"{run.label}.output_throughput_vs_{runs[0].label}"] = ratio(s.output_throughput, first)
    return out
