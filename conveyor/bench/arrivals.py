"""Arrival processes: when each benchmark request is sent.

Owns the mapping from (request rate, burstiness, seed) to arrival offsets in seconds. Inter-arrival
gaps are gamma distributed with shape ``burstiness`` and mean ``1 / rate``: burstiness 1 is a
Poisson process, below 1 is burstier (the squared coefficient of variation of the gaps is
``1 / burstiness``), above 1 is more regular. An infinite rate sends everything at time 0.
The first request always arrives at 0, so a run never starts with idle time.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from conveyor.bench.workloads import Workload, WorkloadError, stream_rng

ARRIVAL_STREAM = 2


@dataclass(frozen=True, slots=True)
class ArrivalProcess:
    """``rate`` requests per second (``inf``: all at once) with gamma-shaped gaps."""

    rate: float = math.inf
    burstiness: float = 1.0

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise WorkloadError(f"the request rate must be positive (or inf), got {self.rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise WorkloadError(f"burstiness must be a positive number, got {self.burstiness}")

    def offsets(self, n: int, rng: np.random.Generator) -> list[float]:
        """n non-decreasing arrival times in seconds, the first at 0."""
        if n <= 0:
            return []
        if math.isinf(self.rate):
            return [0.0] * n
        scale = 1.0 / (self.rate * self.burstiness)
        gaps = rng.gamma(self.burstiness, scale, size=n - 1)
        return np.concatenate([[0.0], np.cumsum(gaps)]).tolist()

    def describe(self) -> str:
        rate = "inf" if math.isinf(self.rate) else f"{self.rate:g}/s"
        return rate if self.burstiness == 1.0 or math.isinf(self.rate) else f"{rate} b={self.burstiness:g}"


def parse_rates(text: str) -> list[float]:
    """'inf' -> [inf]; '1,2,4' -> [1, 2, 4] (a sweep); each positive."""
    rates = []
    for item in str(text).split(","):
        try:
            rate = float(item)
        except ValueError:
            rate = -1.0
        if not rate > 0:
            raise WorkloadError(f"not a request rate: {item!r}; use a positive number or inf, "
                                "or a comma-separated list for a sweep (1,2,4,inf)")
        rates.append(rate)
    return rates


def with_arrivals(workload: Workload, process: ArrivalProcess, seed: int = 0) -> Workload:
    """A copy of ``workload`` whose requests arrive as ``process`` says (request order kept)."""
    times = process.offsets(len(workload.requests), stream_rng(seed, ARRIVAL_STREAM))
    reqs = [dataclasses.replace(r, arrival_s=t) for r, t in zip(workload.requests, times)]
    spec = dict(workload.spec, arrivals={"rate": process.rate if math.isfinite(process.rate) else "inf",
                                         "burstiness": process.burstiness, "seed": seed})
    return Workload(workload.name, reqs, spec)
