"""Batch usage and cost of a running server on /metrics, from the belt feed and recent outputs.

Exposes, under the ``conveyor:`` prefix:

- ``batch_steps`` and ``batch_slot_steps{state=useful|held_idle|empty}`` (counters): slot
  utilization is ``useful / (useful + held_idle + empty)`` (``metrics.batch_usage``);
- ``padding_tokens`` and ``computed_tokens`` (counters): padding waste is
  ``padding / (padding + computed)``; non-zero only under static/dynamic batching;
- ``slot_utilization``, ``padding_waste_ratio``, ``idle_slot_steps`` (gauges, last minute);
- with ``--price-per-hour``: ``price_per_hour_usd`` and
  ``cost_per_million_tokens_usd{tokens=output|total, window=1m|since_start}`` — what the machine
  cost over the window divided by the tokens it produced (output: generated tokens; total:
  prompt + generated). A window without tokens has no sample (the cost is unbounded).
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from conveyor.metrics.belt import SLOT_STATES, BeltFeed, usage_of
from conveyor.metrics.windows import MINUTE_S, RecentOutputs, cost_per_million

PREFIX = "conveyor:"


def cost_summary(recent: RecentOutputs, started: float, price_per_hour: float | None,
                 now: float) -> dict:
    """``{"price_per_hour", "1m": {"output", "total"}, "since_start": {...}}`` in USD per 1M
    tokens (None where there is no price or no tokens)."""
    span = min(MINUTE_S, now - started)
    out_1m = recent.generated_tokens.total(now)
    in_1m = recent.prompt_tokens.total(now)
    uptime = now - started
    out_all, in_all = recent.num_generated_tokens, recent.num_prompt_tokens
    return {"price_per_hour": price_per_hour,
            "1m": {"output": cost_per_million(price_per_hour, span, int(out_1m)),
                   "total": cost_per_million(price_per_hour, span, int(out_1m + in_1m))},
            "since_start": {"output": cost_per_million(price_per_hour, uptime, out_all),
                            "total": cost_per_million(price_per_hour, uptime, out_all + in_all)}}


class BeltCollector(Collector):
    """Reads the feed and the recent outputs at scrape time (see the module docstring)."""

    def __init__(self, feed: BeltFeed, recent: RecentOutputs, price_per_hour: float | None):
        self.feed, self.recent, self.price_per_hour = feed, recent, price_per_hour

    def collect(self):
        now = self.feed.clock()
        t = self.feed.totals
        yield CounterMetricFamily(PREFIX + "batch_steps", "Engine steps that computed tokens.",
                                  value=t.num_steps)
        slots = CounterMetricFamily(PREFIX + "batch_slot_steps",
                                    "Batch slots x steps: useful (computed real tokens), "
                                    "held_idle (held, no work: padding), empty.", labels=["state"])
        for state in SLOT_STATES:
            slots.add_metric([state], t.slot_steps[state])
        yield slots
        yield CounterMetricFamily(PREFIX + "padding_tokens",
                                  "Tokens computed as padding (static/dynamic batching).",
                                  value=t.padding_tokens)
        yield CounterMetricFamily(PREFIX + "computed_tokens",
                                  "Real tokens computed (prefill + decode).",
                                  value=t.computed_tokens)
        yield from self._last_minute(now)
        if self.price_per_hour is not None:
            yield from self._cost(now)

    def _last_minute(self, now: float):
        usage = usage_of(self.feed.window(now)[0])
        gauges = (("slot_utilization", "Useful share of batch slot-steps, last minute.",
                   usage["slot_utilization"]),
                  ("padding_waste_ratio", "Padding share of computed tokens, last minute.",
                   usage["padding_waste"]),
                  ("idle_slot_steps", "Slot-steps held without work or empty, last minute.",
                   usage["held_idle_slot_steps"] + usage["empty_slot_steps"]))
        for name, doc, value in gauges:
            if value is not None:
                yield GaugeMetricFamily(PREFIX + name, doc, value=value)

    def _cost(self, now: float):
        yield GaugeMetricFamily(PREFIX + "price_per_hour_usd", "The machine's price (USD/hour).",
                                value=self.price_per_hour)
        cost = cost_summary(self.recent, self.feed.started, self.price_per_hour, now)
        family = GaugeMetricFamily(PREFIX + "cost_per_million_tokens_usd",
                                   "Machine cost per 1M tokens produced (USD).",
                                   labels=["tokens", "window"])
        for window in ("1m", "since_start"):
            for tokens in ("output", "total"):
                if cost[window][tokens] is not None:
                    family.add_metric([tokens, window], cost[window][tokens])
        yield family
