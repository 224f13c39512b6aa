"""Benchmark reports: one JSON document per invocation, and where the plots went.

Owns the report's schema (``SCHEMA``; documented in docs/bench.md); ``console`` renders it. Every report
carries the exact command line, ``conveyor.platform.describe()``, the conveyor version and the date,
because numbers are only comparable with numbers from the same machine and code.
Reports hold plain JSON values only: an infinite request rate is written as the string "inf".
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import shlex
import sys

from conveyor.bench.metrics import ratio, summarize, summarize_groups, summarize_steps
from conveyor.bench.offline import RunResult
from conveyor.metrics.windows import cost_per_million

SCHEMA = "conveyor.bench.report/1"
BASELINE = "static"
# ratio name -> path into a run entry, for the "vs_static" ratios.
RATIO_KEYS = (
    ("request_throughput", ("summary", "request_throughput")),
    ("output_throughput", ("summary", "output_throughput")),
    ("goodput", ("summary", "goodput")),
    ("ttft_p50", ("summary", "ttft_ms", "p50")),
    ("ttft_p99", ("summary", "ttft_ms", "p99")),
    ("tpot_p50", ("summary", "tpot_ms", "p50")),
    ("e2e_p50", ("summary", "e2e_ms", "p50")),
    ("e2e_p99", ("summary", "e2e_ms", "p99")),
    ("slot_utilization", ("batch", "slot_utilization")),
    ("usd_per_million_output_tokens", ("cost", "usd_per_million_output_tokens")),
)


def json_rate(rate: float | None) -> float | str | None:
    return "inf" if rate is not None and math.isinf(rate) else rate


def report_meta(mode: str, workload_spec: dict, argv: list[str] | None = None, **extra) -> dict:
    """Who/what/where: command line, platform line, version, UTC date, workload description."""
    import conveyor
    from conveyor import platform
    argv = sys.argv if argv is None else argv
    prog = os.path.basename(argv[0]) if argv else "conveyor"
    prog = "conveyor" if prog in ("__main__.py", "conveyor") else prog
    command = shlex.join([prog, *argv[1:]])
    return {"mode": mode, "command": command, "platform": platform.describe(),
            "conveyor_version": conveyor.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "workload": workload_spec, **extra}


def cost_entry(summary, price_per_hour: float | None) -> dict | None:
    """What the run cost on a machine at ``price_per_hour`` USD (None without a price): the
    machine's dollars over the run's duration, and per 1M output / total tokens."""
    if price_per_hour is None:
        return None
    tokens_out = summary.total_output_tokens
    tokens_all = tokens_out + summary.total_input_tokens
    return {"price_per_hour": price_per_hour,
            "usd": price_per_hour * summary.duration_s / 3600.0,
            "usd_per_million_output_tokens": cost_per_million(price_per_hour, summary.duration_s,
                                                              tokens_out),
            "usd_per_million_total_tokens": cost_per_million(price_per_hour, summary.duration_s,
                                                             tokens_all)}


def run_entry(run: RunResult, slos: dict[str, float] | None = None,
              price_per_hour: float | None = None) -> dict:
    """One run's section of the report: summary, per-group summaries, batch metrics (or None),
    engine counters (in-process; else None), cached prompt tokens, the cost (with a price;
    else None), and per-request rows."""
    batch = summarize_steps(run.steps)
    summary = summarize(run.records, slos)
    groups = summarize_groups(run.records, slos, summary.duration_s)
    stats = run.engine_stats or {}
    cached = [r.cached_tokens for r in run.records if r.cached_tokens is not None]
    return {
        "label": run.label, "request_rate": json_rate(run.request_rate), "burstiness": run.burstiness,
        "config": run.config, "wall_s": run.wall_s,
        "summary": dataclasses.asdict(summary),
        "groups": {key: {value: dataclasses.asdict(s) for value, s in by_value.items()}
                   for key, by_value in groups.items()},
        "batch": dataclasses.asdict(batch) if batch is not None else None,
        "prefix_cache": stats.get("prefix_cache"),
        "preemptions_by_mode": stats.get("preemptions_by_mode"),
        "spec_decode": stats.get("spec_decode"),
        "cached_tokens": sum(cached) if cached else None,
        "cost": cost_entry(summary, price_per_hour),
        "requests": [_request_row(r) for r in run.records],
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _request_row(r) -> dict:
    return {"id": r.request_id, "prompt_len": r.prompt_len, "max_tokens": r.max_tokens,
            "output_len": r.output_len, "arrival_s": r.arrival, "ttft_ms": _ms(r.ttft),
            "tpot_ms": _ms(r.tpot), "e2e_ms": _ms(r.e2e), "num_chunks": len(r.chunk_times),
            "max_itl_ms": _ms(max(r.itls)) if r.itls else None,
            "num_preemptions": r.num_preemptions, "tenant": r.tenant, "priority": r.priority,
            "cached_tokens": r.cached_tokens, "error": r.error or None}


def _lookup(entry: dict, path: tuple[str, ...]):
    value = entry
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def add_ratios(entries: list[dict], baseline: str = BASELINE) -> None:
    """Give every entry a ``vs_<baseline>`` dict: its metric / the baseline run's at the same rate."""
    base_at = {e["request_rate"]: e for e in entries if e["label"] == baseline}
    for entry in entries:
        base = base_at.get(entry["request_rate"])
        if base is not None:
            entry[f"vs_{baseline}"] = {k: ratio(_lookup(entry, p), _lookup(base, p))
                                       for k, p in RATIO_KEYS}


def build_report(meta: dict, entries: list[dict], plots: list[str] | None = None,
                 scenario: dict | None = None) -> dict:
    """The whole document; ``scenario`` (``conveyor bench scenario`` only) holds its findings."""
    report = {"schema": SCHEMA, "meta": meta, "runs": entries, "plots": list(plots or [])}
    if scenario is not None:
        report["scenario"] = scenario
    return report


def write_json(report: dict, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2, allow_nan=False)
        f.write("\n")
    return path
