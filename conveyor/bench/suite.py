"""Benchmark suites: which engine variants to run, at which rates, and where the results go.

Owns ``conveyor bench compare``'s policy matrix (``compare_variants``), the KV budget arithmetic
(``kv_budget_blocks``), running variants x request rates in-process (one engine per variant,
loaded, warmed up, then freed), and writing a report directory: ``report.json``, ``report.html``
(the same tables and plots, self-contained), latency CDFs,
throughput versus rate (sweeps), and one batch timeline per run that has a step log.
"""

from __future__ import annotations

import gc
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable

from conveyor.bench.arrivals import ArrivalProcess, with_arrivals
from conveyor.bench.html_report import write_html
from conveyor.bench.offline import RunResult, run_offline, warm_up
from conveyor.bench.plots import plot_latency_cdfs, plot_throughput_vs_rate, plot_timeline
from conveyor.bench.report import add_ratios, build_report, run_entry, write_json
from conveyor.bench.workloads import Workload, WorkloadError

POLICY_LABELS = ("no-batching", "static", "dynamic", "continuous",
                 "continuous+reservation", "continuous+paged")


@dataclass(frozen=True, slots=True)
class Variant:
    """A labelled set of engine keyword arguments laid over the shared ones."""

    label: str
    overrides: dict = field(default_factory=dict)


def kv_budget_blocks(workload: Workload, num_requests: int, block_size: int) -> int:
    """Blocks holding exactly ``num_requests`` worst-case requests of ``workload``, where the
    worst case is the largest prompt + max_tokens (each request rounded up to whole blocks)."""
    if num_requests < 1:
        raise WorkloadError(f"--kv-budget-requests must be at least 1, got {num_requests}")
    return num_requests * -(-workload.max_request_tokens // block_size)


PAIR_MAX_NUM_SEQS = 64


def compare_variants(max_num_seqs: int, budget_blocks: int, roomy_blocks: int | None,
                     batch_timeout_s: float | None = None,
                     only: list[str] | None = None) -> list[Variant]:
    """The compare matrix at one max batch size.

    no-batching = continuous with one slot; static / dynamic / continuous with ``roomy_blocks``
    (None: the engine's default sizing) so KV memory does not limit them; then continuous with
    reservation-style versus paged KV allocation in the same ``budget_blocks``, with slots to
    spare (``PAIR_MAX_NUM_SEQS``) so that memory, not the slot count, limits how many run.
    """
    seqs = {"max_num_seqs": max_num_seqs}
    roomy = {} if roomy_blocks is None else {"num_blocks": roomy_blocks, "kv_cache_bytes": None}
    timeout = {} if batch_timeout_s is None else {"batch_timeout_s": batch_timeout_s}
    budget = {"max_num_seqs": max(PAIR_MAX_NUM_SEQS, max_num_seqs), "batching": "continuous",
              "num_blocks": budget_blocks, "kv_cache_bytes": None}
    variants = [
        Variant("no-batching", {**roomy, "batching": "continuous", "max_num_seqs": 1}),
        Variant("static", {**seqs, **roomy, **timeout, "batching": "static"}),
        Variant("dynamic", {**seqs, **roomy, **timeout, "batching": "dynamic"}),
        Variant("continuous", {**seqs, **roomy, "batching": "continuous"}),
        Variant("continuous+reservation", {**budget, "kv_allocation": "reservation"}),
        Variant("continuous+paged", {**budget, "kv_allocation": "paged"}),
    ]
    if only:
        unknown = sorted(set(only) - set(POLICY_LABELS))
        if unknown:
            raise WorkloadError(f"unknown policy {unknown[0]!r}; choose from {', '.join(POLICY_LABELS)}")
        variants = [v for v in variants if v.label in only]
    return variants


def workload_at(workload: Workload, rate: float | None, burstiness: float, seed: int) -> Workload:
    """The workload with generated arrivals, or as is when ``rate`` is None (arrivals from a file)."""
    if rate is None:
        return workload
    return with_arrivals(workload, ArrivalProcess(rate, burstiness), seed)


def run_rates(engine, label: str, config: dict, workload: Workload, rates: list[float | None],
              burstiness: float = 1.0, seed: int = 0, progress: bool = True) -> list[RunResult]:
    """Warm ``engine`` up, then run ``workload`` once per rate (None: the workload's own arrivals)."""
    warm_up(engine)
    runs = []
    for i, rate in enumerate(rates):
        run = run_offline(engine, workload_at(workload, rate, burstiness, seed), label,
                          config=jsonable(config), progress=progress, id_prefix=f"{label}#{i}")
        run.request_rate, run.burstiness = rate, None if rate is None else burstiness
        runs.append(run)
    return runs


def run_variants(make_engine: Callable[[dict], object], base_kwargs: dict, variants: list[Variant],
                 workload: Workload, rates: list[float | None], burstiness: float = 1.0,
                 seed: int = 0, progress: bool = True) -> list[RunResult]:
    """For each variant: build an engine from base_kwargs + overrides, run every rate
    (``run_rates``), free the engine. Runs come back in (variant, rate) order."""
    runs = []
    for variant in variants:
        kwargs = {**base_kwargs, **variant.overrides}
        engine = make_engine(kwargs)
        runs += run_rates(engine, variant.label, kwargs, workload, rates, burstiness, seed, progress)
        del engine
        gc.collect()
    return runs


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def jsonable(kwargs: dict) -> dict:
    """The keyword arguments a report can hold: scalars, and dicts of scalars (tenant weights)."""
    return {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()
            if _is_scalar(v) or (isinstance(v, dict) and all(map(_is_scalar, v.values())))}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text)


def run_name(run: RunResult, many_rates: bool) -> str:
    """``label`` or ``label@rate`` when a sweep has several rates."""
    if not many_rates or run.request_rate is None:
        return run.label
    return f"{run.label}@{'inf' if math.isinf(run.request_rate) else f'{run.request_rate:g}'}"


def write_outputs(meta: dict, runs: list[RunResult], out_dir: str, slos: dict | None = None,
                  plots: bool = True, scenario: dict | None = None,
                  price_per_hour: float | None = None) -> dict:
    """Build the report (with ratios to static when a static run exists, a scenario's
    findings when given, each run's cost with ``price_per_hour``), draw the plots into
    ``out_dir``, write ``out_dir/report.json`` and ``out_dir/report.html``; returns the report.
    A scenario's runs are side by side, never a rate sweep."""
    os.makedirs(out_dir, exist_ok=True)
    entries = [run_entry(run, slos, price_per_hour) for run in runs]
    add_ratios(entries)
    paths = _draw(runs, entries, out_dir, sweep=scenario is None) if plots else []
    report = build_report(meta, entries, paths, scenario)
    write_json(report, os.path.join(out_dir, "report.json"))
    write_html(report, os.path.join(out_dir, "report.html"))
    return report


def _draw(runs: list[RunResult], entries: list[dict], out_dir: str, sweep: bool = True) -> list[str]:
    many_rates = sweep and len({r.request_rate for r in runs}) > 1
    title = f"{entries[0]['label']}" if len(runs) == 1 else ""
    paths = [plot_latency_cdfs([(run_name(r, many_rates), r.records) for r in runs],
                               os.path.join(out_dir, "latency_cdf.png"), title)]
    if many_rates:
        paths.append(plot_throughput_vs_rate(entries, os.path.join(out_dir, "throughput_vs_rate.png")))
    for run in runs:
        if run.steps:
            name = run_name(run, many_rates)
            paths.append(plot_timeline(run.steps, os.path.join(out_dir, f"timeline_{_slug(name)}.png"),
                                       f"batch timeline: {name}"))
    return paths
