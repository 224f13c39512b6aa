"""Workloads of ``conveyor bench scenario``: tenants at a rate ratio, priority classes.

Pure functions of their arguments and seed, like ``workloads``: they take a base workload (whose
prompts and lengths are already drawn) and add who sends each request and when. Invariants:

- ``two_tenant_workload``: tenant A's and tenant B's arrivals are two independent gamma
  processes (Poisson at burstiness 1) whose rates are ``rate_ratio : 1`` and add up to the total
  rate; request counts follow the same ratio, so both streams span about the same time.
  Requests are ordered by arrival; A's and B's arrival times do not depend on each other, so
  ``tenant_subset(w, "B")`` is exactly what B sends when A is there.
- ``priority_workload``: exactly ``round(high_share * n)`` requests (at least one when the share
  is positive) get priority 0, the rest priority 1, at seeded random positions.
"""

from __future__ import annotations

import dataclasses
import math

from conveyor.bench.arrivals import ARRIVAL_STREAM, ArrivalProcess
from conveyor.bench.workloads import Workload, WorkloadError, stream_rng

TENANT_A, TENANT_B = "A", "B"
HIGH, LOW = 0, 1
_B_ARRIVAL_STREAM = ARRIVAL_STREAM + 1
_PRIORITY_STREAM = ARRIVAL_STREAM + 2


def count_for(num_prompts: int | None, duration_s: float, rate: float) -> int:
    """--num-prompts when given, else the requests ``rate`` offers in ``duration_s`` (at least 1)."""
    if num_prompts is not None:
        return num_prompts
    if not (duration_s > 0 and math.isfinite(rate)):
        raise WorkloadError("give --num-prompts, or a positive --duration with a finite rate")
    return max(1, round(rate * duration_s))


def tenant_counts(num_requests: int, rate_ratio: float) -> tuple[int, int]:
    """(A's, B's) share of ``num_requests`` at A:B = ``rate_ratio``:1, each at least 1."""
    if num_requests < 2 or not rate_ratio > 0:
        raise WorkloadError(f"two tenants need at least 2 requests and a positive rate ratio, "
                            f"got {num_requests} and {rate_ratio}")
    num_b = min(num_requests - 1, max(1, round(num_requests / (rate_ratio + 1))))
    return num_requests - num_b, num_b


def two_tenant_workload(base: Workload, total_rate: float, rate_ratio: float,
                        burstiness: float = 1.0, seed: int = 0) -> Workload:
    """``base``'s requests sent by tenants A (the first ones) and B (the last ``tenant_counts``)
    at ``total_rate`` requests/s in all, A at ``rate_ratio`` times B's rate."""
    num_a, num_b = tenant_counts(len(base.requests), rate_ratio)
    rate_b = total_rate / (rate_ratio + 1)
    times_a = ArrivalProcess(rate_b * rate_ratio, burstiness).offsets(num_a, stream_rng(seed, ARRIVAL_STREAM))
    times_b = ArrivalProcess(rate_b, burstiness).offsets(num_b, stream_rng(seed, _B_ARRIVAL_STREAM))
    tenants = [TENANT_A] * num_a + [TENANT_B] * num_b
    reqs = [dataclasses.replace(r, tenant=t, arrival_s=a)
            for r, t, a in zip(base.requests, tenants, times_a + times_b)]
    reqs.sort(key=lambda r: r.arrival_s)
    spec = dict(base.spec, tenants={TENANT_A: num_a, TENANT_B: num_b}, rate_ratio=rate_ratio,
                arrivals={"rate": _json_rate(total_rate), "burstiness": burstiness, "seed": seed,
                          "per_tenant": True})
    return Workload(base.name, reqs, spec)


def tenant_subset(workload: Workload, tenant: str) -> Workload:
    """Only ``tenant``'s requests, with their arrival times unchanged."""
    reqs = [r for r in workload.requests if r.tenant == tenant]
    if not reqs:
        raise WorkloadError(f"the workload has no request from tenant {tenant!r}")
    return Workload(workload.name, reqs, dict(workload.spec, only_tenant=tenant))


def priority_workload(base: Workload, high_share: float, seed: int = 0) -> Workload:
    """``base`` with ``high_share`` of its requests at priority 0 (high), the rest at 1 (low)."""
    if not 0 <= high_share <= 1:
        raise WorkloadError(f"the high-priority share must be in [0, 1], got {high_share}")
    n = len(base.requests)
    num_high = min(n, max(1, round(high_share * n))) if high_share > 0 else 0
    high = set(stream_rng(seed, _PRIORITY_STREAM).permutation(n)[:num_high].tolist())
    reqs = [dataclasses.replace(r, priority=HIGH if i in high else LOW)
            for i, r in enumerate(base.requests)]
    return Workload(base.name, reqs, dict(base.spec, high_priority_share=high_share,
                                          num_high_priority=num_high))


def _json_rate(rate: float) -> float | str:
    return rate if math.isfinite(rate) else "inf"
