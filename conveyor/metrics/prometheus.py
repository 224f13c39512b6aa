"""Prometheus metrics for one server, named like vLLM's under a ``conveyor:`` prefix (and, with
``--metrics-names vllm|both``, under vLLM's own names and labels: ``vllm_names.NameView``).

Owns one ``CollectorRegistry`` per ``ServingMetrics`` instance (never the global registry, so two
servers can live in one process). Gauges are read from an engine snapshot at scrape time; counters
and histograms are fed by ``on_outputs`` with each batch of request outputs. Invariants:

- every token counted once: ``generation_tokens_total`` adds each output's ``delta_token_ids``;
- every finished choice is counted once in ``request_success_total{finished_reason}``;
- per-request timing state is dropped when the request finishes;
- ``engine_stalled`` is 1 exactly while the engine's watchdog says it is stalled (work pending,
  no step finished for the watchdog timeout), read at scrape time so it is current even while
  the engine thread is stuck.

Thread-safe: ``on_outputs`` runs on the engine thread while scrapes run on the event loop.
"""

from __future__ import annotations

import threading
from typing import Callable, Protocol

from prometheus_client import (CollectorRegistry, Counter, Histogram, ProcessCollector,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from conveyor.metrics.step_cost import StepCostCollector
from conveyor.metrics.belt import BeltFeed
from conveyor.metrics.belt_collector import BeltCollector
from conveyor.metrics.vllm_names import NameView, build_1_2_5_buckets
from conveyor.metrics.windows import RecentOutputs

PREFIX = "conveyor:"
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class Snapshot(Protocol):
    """What the gauges read (``conveyor.core.stats.EngineStats`` has these)."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    kv_cache_usage: float
    num_preemptions_total: int
    num_cached_free_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    preemptions_by_mode: tuple[tuple[str, int], ...]
    spec_decode: tuple[int, int, int, tuple[int, ...]] | None


class Watchdog(Protocol):
    """What the stall metrics read (``conveyor.engine.async_engine.AsyncEngine`` has these)."""

    is_stalled: bool
    num_stalls: int

    def stall_seconds(self) -> float: ...


class _WatchdogCollector(Collector):
    def __init__(self, read: Callable[[], Watchdog | None]):
        self._read = read

    def collect(self):
        watchdog = self._read()
        if watchdog is None:
            return
        yield GaugeMetricFamily(PREFIX + "engine_stalled",
                                "1 while the engine has work and finished no step for the "
                                "watchdog timeout.", value=int(watchdog.is_stalled))
        yield GaugeMetricFamily(PREFIX + "engine_stall_seconds",
                                "Seconds the engine has had work without finishing a step.",
                                value=watchdog.stall_seconds())
        yield CounterMetricFamily(PREFIX + "engine_stalls",
                                  "Times the watchdog found the engine stalled.",
                                  value=watchdog.num_stalls)


class _SnapshotCollector(Collector):
    def __init__(self, read: Callable[[], Snapshot | None]):
        self._read = read

    def collect(self):
        snap = self._read()
        if snap is None:
            return
        gauges = (("num_requests_running", "Requests running (in the batch).", snap.num_running),
                  ("num_requests_waiting", "Requests waiting to be scheduled.", snap.num_waiting),
                  ("kv_cache_usage_perc", "Share of KV-cache blocks in use (1 = full).",
                   snap.kv_cache_usage),
                  ("kv_cache_free_blocks", "KV-cache blocks free (evictable cached ones included).",
                   snap.num_free_blocks),
                  ("kv_cache_cached_free_blocks",
                   "Free KV-cache blocks still holding a reusable cached prefix (evictable).",
                   snap.num_cached_free_blocks),
                  ("kv_cache_live_blocks", "KV-cache blocks held by live requests.",
                   snap.num_total_blocks - snap.num_free_blocks),
                  ("kv_cache_total_blocks", "KV-cache blocks in all.", snap.num_total_blocks))
        for name, doc, value in gauges:
            yield GaugeMetricFamily(PREFIX + name, doc, value=value)
        yield CounterMetricFamily(PREFIX + "num_preemptions", "Preemptions since start.",
                                  value=snap.num_preemptions_total)
        by_mode = CounterMetricFamily(PREFIX + "num_preemptions_by_mode",
                                      "Preemptions since start by mode.", labels=["mode"])
        for mode, count in snap.preemptions_by_mode:
            by_mode.add_metric([mode], count)
        yield by_mode
        yield CounterMetricFamily(PREFIX + "prefix_cache_queries",
                                  "Prompt tokens looked up in the prefix cache.",
                                  value=snap.prefix_cache_queries)
        yield CounterMetricFamily(PREFIX + "prefix_cache_hits",
                                  "Prompt tokens found in the prefix cache.",
                                  value=snap.prefix_cache_hits)
        if snap.spec_decode is not None:
            yield from _spec_decode_families(*snap.spec_decode)


def _spec_decode_families(num_drafts: int, num_draft_tokens: int, num_accepted: int,
                          per_position: tuple[int, ...]):
    """vLLM's speculative-decoding counters (only while speculative decoding is on)."""
    yield CounterMetricFamily(PREFIX + "spec_decode_num_drafts", "Drafts verified.",
                              value=num_drafts)
    yield CounterMetricFamily(PREFIX + "spec_decode_num_draft_tokens", "Draft tokens verified.",
                              value=num_draft_tokens)
    yield CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens",
                              "Draft tokens accepted.", value=num_accepted)
    per_pos = CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                  "Draft tokens accepted, by draft position.", labels=["position"])
    for position, count in enumerate(per_position):
        per_pos.add_metric([str(position)], count)
    yield per_pos


class ServingMetrics:
    """Prometheus metrics of one server; ``render()`` gives the text exposition format.
    ``belt`` (every step's slots) and ``recent`` (the last minute of outputs) feed the
    dashboard and the batch-usage and cost metrics (``belt_collector``)."""

    def __init__(self, read_snapshot: Callable[[], Snapshot | None],
                 read_watchdog: Callable[[], Watchdog | None] | None = None,
                 price_per_hour: float | None = None, names: str = "conveyor",
                 model_name: Callable[[], str | None] | None = None):
        """names: "conveyor", "vllm" or "both" (``vllm_names``); model_name: the served model's
        name (vLLM's ``model_name`` label), None until it loaded."""
        r = self._source = CollectorRegistry(auto_describe=True)
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(NameView(r, names, model_name or (lambda: None)))
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.",
                                         registry=r)
        self.request_success = Counter(PREFIX + "request_success",
                                       "Finished choices by finish reason.", ["finished_reason"],
                                       registry=r)
        for reason in ("stop", "length", "abort", "error"):
            self.request_success.labels(finished_reason=reason)    # 0 until the first
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds",
                             "Time between two outputs of a request.", buckets=_ITL_BUCKETS,
                             registry=r)
        self.tpot = Histogram(PREFIX + "request_time_per_output_token_seconds",
                              "Per request: first token to finish over the tokens after the "
                              "first.", buckets=_ITL_BUCKETS, registry=r)
        self.e2e, self.queue_time, self.inference_time, self.prefill_time, self.decode_time = (
            Histogram(PREFIX + name, doc, buckets=_REQUEST_BUCKETS, registry=r) for name, doc in (
                ("e2e_request_latency_seconds", "Arrival to finish."),
                ("request_queue_time_seconds", "Arrival to first scheduled."),
                ("request_inference_time_seconds", "First scheduled to finish."),
                ("request_prefill_time_seconds", "First scheduled to first token."),
                ("request_decode_time_seconds", "First token to finish.")))
        self.request_prompt_tokens = self.request_generation_tokens = None   # engine_ready
        self._cache_info: dict[str, str] | None = None
        r.register(_SnapshotCollector(read_snapshot))
        r.register(_CacheInfoCollector(lambda: self._cache_info))
        r.register(StepCostCollector(PREFIX, lambda: getattr(read_snapshot(), "step_cost", None)))
        ProcessCollector(registry=r)     # process_resident_memory_bytes & co., as vLLM exposes
        if read_watchdog is not None:
            r.register(_WatchdogCollector(read_watchdog))
        self.belt, self.recent, self.price_per_hour = BeltFeed(), RecentOutputs(), price_per_hour
        r.register(BeltCollector(self.belt, self.recent, price_per_hour))
        self.on_step = self.belt.on_step       # the engine thread calls it after every step
        self._last_output_time: dict[str, float] = {}
        self._first_token: dict[str, tuple[float, int]] = {}   # id -> (time, tokens so far)
        self._lock = threading.Lock()

    def engine_ready(self, max_model_len: int, cache_info: dict[str, str]) -> None:
        """What is known once the engine loaded: the token histograms' buckets (vLLM's 1-2-5
        series up to the context length) and the cache config's labels (``cache_config_info``)."""
        buckets = build_1_2_5_buckets(max_model_len)
        with self._lock:
            self.request_prompt_tokens = Histogram(
                PREFIX + "request_prompt_tokens", "Prompt tokens per finished request.",
                buckets=buckets, registry=self._source)
            self.request_generation_tokens = Histogram(
                PREFIX + "request_generation_tokens", "Generated tokens per finished request.",
                buckets=buckets, registry=self._source)
            self._cache_info = dict(cache_info)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def on_outputs(self, outputs, now: float) -> None:
        """Count one batch of ``RequestOutput`` (deltas since the previous batch) seen at ``now``."""
        with self._lock:
            for out in outputs:
                self._observe(out, now)

    def _observe(self, out, now: float) -> None:
        num_new = sum(len(c.delta_token_ids) for c in out.outputs)
        rid = out.request_id
        last = self._last_output_time.get(rid)
        if num_new:
            self.generation_tokens.inc(num_new)
            self.recent.generated(now, num_new)
            if last is None:
                self.prompt_tokens.inc(len(out.prompt_token_ids))
                self.ttft.observe(max(0.0, now - out.metrics.arrival_time))
                self.recent.first_token(now, max(0.0, now - out.metrics.arrival_time),
                                        len(out.prompt_token_ids))
                self._first_token[rid] = (now, 0)
            else:
                self.itl.observe(max(0.0, now - last))
                self.recent.next_token(now, max(0.0, now - last))
            first, count = self._first_token[rid]
            self._first_token[rid] = (first, count + num_new)
            self._last_output_time[rid] = now
        if not out.finished:
            return
        self._last_output_time.pop(rid, None)
        for choice in out.outputs:
            self.request_success.labels(finished_reason=choice.finish_reason or "abort").inc()
        self._observe_finished(out, now, self._first_token.pop(rid, None))

    def _observe_finished(self, out, now: float, first: tuple[float, int] | None) -> None:
        """The per-request histograms of a request that just finished (vLLM's)."""
        m = out.metrics
        if self.request_prompt_tokens is not None:
            self.request_prompt_tokens.observe(len(out.prompt_token_ids))
            self.request_generation_tokens.observe(first[1] if first else 0)
        if not m.arrival_time:
            return
        self.e2e.observe(max(0.0, now - m.arrival_time))
        if m.first_scheduled_time:
            self.queue_time.observe(max(0.0, m.first_scheduled_time - m.arrival_time))
            self.inference_time.observe(max(0.0, now - m.first_scheduled_time))
        if first is None:
            return
        first_time, num_tokens = first
        self.decode_time.observe(max(0.0, now - first_time))
        if m.first_scheduled_time:
            self.prefill_time.observe(max(0.0, first_time - m.first_scheduled_time))
        per_choice = num_tokens // max(1, len(out.outputs))
        if per_choice > 1:
            self.tpot.observe(max(0.0, now - first_time) / (per_choice - 1))


class _CacheInfoCollector(Collector):
    """``cache_config_info``: a gauge of 1 whose labels are the KV cache's config (vLLM's)."""

    def __init__(self, read: Callable[[], dict[str, str] | None]):
        self._read = read

    def collect(self):
        info = self._read()
        if info is None:
            return
        family = GaugeMetricFamily(PREFIX + "cache_config_info",
                                   "Information of the LLMEngine CacheConfig", labels=list(info))
        family.add_metric(list(info.values()), 1)
        yield family
