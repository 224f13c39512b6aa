"""Sliding time windows over what the engine did, and what a token costs.

Owns ``TimeWindow`` (timestamped samples, the last ``span_s`` seconds of them), ``RecentOutputs``
(TTFT, ITL and token counts of the last minute, fed by ``ServingMetrics`` with each output batch)
and the one cost rule, ``cost_per_million``. Invariants:

- a window never holds a sample older than ``span_s`` before the newest read, nor more than
  ``max_samples`` samples (the oldest go first), so memory stays bounded under any load;
- every method is safe to call from the engine thread and the event loop at once (one lock per
  window; a sample is appended in O(1)).
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

MINUTE_S = 60.0


def cost_per_million(price_per_hour: float | None, seconds: float, tokens: int) -> float | None:
    """Dollars per 1M tokens when a machine costing ``price_per_hour`` USD ran ``seconds`` and
    produced ``tokens``; None without a price or without tokens."""
    if price_per_hour is None or tokens <= 0 or seconds <= 0:
        return None
    return price_per_hour * seconds / 3600.0 / tokens * 1e6


class TimeWindow:
    """``(time, value)`` samples of the last ``span_s`` seconds."""

    def __init__(self, span_s: float = MINUTE_S, max_samples: int = 100_000):
        self.span_s = span_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._lock = threading.Lock()

    def add(self, t: float, value: float) -> None:
        """Append a sample and drop those older than the span (so a window nobody reads holds
        only its span's samples, never ``max_samples`` stale ones)."""
        with self._lock:
            self._samples.append((t, value))
            self._prune(t)

    def values(self, now: float, span_s: float | None = None) -> list[float]:
        """The values of samples at most ``span_s`` (default: the window's span) before ``now``."""
        cutoff = now - (self.span_s if span_s is None else span_s)
        with self._lock:
            self._prune(now)
            return [v for t, v in self._samples if t >= cutoff]

    def _prune(self, now: float) -> None:
        while self._samples and self._samples[0][0] < now - self.span_s:
            self._samples.popleft()

    def total(self, now: float, span_s: float | None = None) -> float:
        return float(sum(self.values(now, span_s)))


def percentiles_ms(seconds: list[float]) -> dict[str, float | None]:
    """p50/p99 in milliseconds (None when there are no values)."""
    if not seconds:
        return {"p50": None, "p99": None}
    p50, p99 = np.percentile(np.asarray(seconds) * 1000.0, [50, 99]).tolist()
    return {"p50": p50, "p99": p99}


class RecentOutputs:
    """The last minute of outputs as clients saw them: first-token and inter-token latencies,
    prompt tokens (counted when a request's first token comes) and generated tokens; plus both
    token counts since the start (written by one thread, the engine's)."""

    def __init__(self):
        self.ttft = TimeWindow()
        self.itl = TimeWindow()
        self.prompt_tokens = TimeWindow()
        self.generated_tokens = TimeWindow()
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0

    def first_token(self, now: float, ttft_s: float, num_prompt_tokens: int) -> None:
        self.ttft.add(now, ttft_s)
        self.prompt_tokens.add(now, num_prompt_tokens)
        self.num_prompt_tokens += num_prompt_tokens

    def next_token(self, now: float, itl_s: float) -> None:
        self.itl.add(now, itl_s)

    def generated(self, now: float, num_tokens: int) -> None:
        self.generated_tokens.add(now, num_tokens)
        self.num_generated_tokens += num_tokens
