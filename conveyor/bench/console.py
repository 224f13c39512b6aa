"""The console rendering of a benchmark report (``report.build_report``'s document).

Owns what ``conveyor bench`` prints: a header (command, platform), one row per run, then, only
where the report has them, one row per (run, group) for per-tenant / per-priority breakdowns, one
line per run of engine counters (prefix cache, preemptions by mode, cached prompt tokens), and a
scenario's findings. Reads plain JSON values only, so it renders a report loaded from disk too.
"""

from __future__ import annotations

from conveyor.bench.report import BASELINE


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pair(dist: dict) -> str:
    return f"{_fmt(dist['p50'], 0)}/{_fmt(dist['p99'], 0)}"


_COLUMNS = (
    ("run", lambda e: e["label"]),
    ("rate", lambda e: _fmt(e["request_rate"], 2)),
    ("ok/n", lambda e: f"{e['summary']['completed']}/{e['summary']['num_requests']}"),
    ("req/s", lambda e: _fmt(e["summary"]["request_throughput"], 2)),
    ("out tok/s", lambda e: _fmt(e["summary"]["output_throughput"])),
    ("TTFT p50/p99 ms", lambda e: _pair(e["summary"]["ttft_ms"])),
    ("ITL p50 ms", lambda e: _fmt(e["summary"]["itl_ms"]["p50"])),
    ("TPOT p50 ms", lambda e: _fmt(e["summary"]["tpot_ms"]["p50"])),
    ("E2E p50/p99 ms", lambda e: _pair(e["summary"]["e2e_ms"])),
    ("goodput", lambda e: _fmt(e["summary"]["goodput"], 2)),
    ("slot util", lambda e: _fmt((e["batch"] or {}).get("slot_utilization"), 2)),
    ("pad tok", lambda e: _fmt((e["batch"] or {}).get("padding_tokens"))),
    ("idle slot-steps", lambda e: _fmt((e["batch"] or {}).get("straggler_slot_steps"))),
    ("KV", lambda e: _fmt((e["batch"] or {}).get("mean_kv_usage"), 2)),
    ("x static", lambda e: _fmt((e.get(f"vs_{BASELINE}") or {}).get("output_throughput"), 2)),
)
# With --price-per-hour: what each run's tokens cost on that machine.
_COST_COLUMNS = (
    ("$ run", lambda e: _fmt(e["cost"]["usd"], 4)),
    ("$/1M out", lambda e: _fmt(e["cost"]["usd_per_million_output_tokens"], 2)),
    ("$/1M tok", lambda e: _fmt(e["cost"]["usd_per_million_total_tokens"], 2)),
)


def run_columns(report: dict) -> tuple:
    """The columns of the run table: the cost ones only when the report has a price."""
    priced = any(e.get("cost") for e in report["runs"])
    return _COLUMNS + _COST_COLUMNS if priced else _COLUMNS

# Rows of the group table are {"label", "group", "summary"}.
GROUP_TITLE = "per group (out tok/s over the whole run):"
GROUP_COLUMNS = (
    ("run", lambda g: g["label"]),
    ("group", lambda g: g["group"]),
    ("ok/n", lambda g: f"{g['summary']['completed']}/{g['summary']['num_requests']}"),
    ("out tok/s", lambda g: _fmt(g["summary"]["output_throughput"])),
    ("TTFT p50/p99 ms", lambda g: _pair(g["summary"]["ttft_ms"])),
    ("TPOT p50 ms", lambda g: _fmt(g["summary"]["tpot_ms"]["p50"])),
    ("E2E p50/p99 ms", lambda g: _pair(g["summary"]["e2e_ms"])),
)


def render_table(columns, rows: list) -> list[str]:
    """Aligned text lines: a header, a rule, one line per row (first column left-aligned)."""
    cells = [[name for name, _ in columns]] + [[get(r) for _, get in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def group_rows(entries: list[dict]) -> list[dict]:
    """One row per (run, group key, group value), e.g. group ``tenant=B`` or ``priority=0``."""
    return [{"label": e["label"], "group": f"{key}={value or '-'}", "summary": summary}
            for e in entries for key, by_value in (e.get("groups") or {}).items()
            for value, summary in by_value.items()]


def engine_line(entry: dict) -> str | None:
    """``label: prefix cache 640/1200 tok hit (53.3%); cached prompt tok 600; preemptions
    recompute 3, swap 1; load generator CPU 0.30 s (1.2% of one core over the run)``; parts
    that are zero or unknown are left out (None when all are)."""
    parts = []
    cache = entry.get("prefix_cache")
    if cache and cache["queries"]:
        parts.append(f"prefix cache {cache['hits']}/{cache['queries']} tok hit "
                     f"({100 * cache['hit_rate']:.1f}%)")
    if entry.get("cached_tokens"):
        parts.append(f"cached prompt tok {entry['cached_tokens']}")
    modes = entry.get("preemptions_by_mode") or {}
    if any(modes.values()):
        parts.append("preemptions " + ", ".join(f"{m} {n}" for m, n in modes.items()))
    spec = entry.get("spec_decode")
    if spec and spec["num_drafts"]:
        parts.append(f"spec decode {spec['num_accepted_tokens']}/{spec['num_draft_tokens']} draft "
                     f"tok accepted ({100 * spec['acceptance_rate']:.1f}%), mean accepted length "
                     f"{spec['mean_accepted_length']:.2f}")
    client_cpu, wall = (entry.get("config") or {}).get("client_cpu_s"), entry.get("wall_s")
    if client_cpu is not None and wall:
        parts.append(f"load generator CPU {client_cpu:.2f} s ({100 * client_cpu / wall:.1f}% of "
                     f"one core over the run)")
    return f"{entry['label']}: " + "; ".join(parts) if parts else None


def scenario_lines(scenario: dict | None) -> list[str]:
    if not scenario:
        return []
    lines = [f"scenario {scenario['name']}:"]
    for key, value in scenario.get("findings", {}).items():
        lines.append(f"  {key} = {_fmt(value, 3)}")
    return lines


def format_table(report: dict) -> str:
    """The console summary: a header block, one row per run (``x static`` = output tok/s ratio),
    then per-group rows, engine counters and scenario findings where present; with a price, the
    run table ends with each run's dollars and dollars per 1M output / total tokens."""
    meta = report["meta"]
    head = [f"conveyor bench {meta['mode']}  ({meta['date']}, conveyor {meta['conveyor_version']})",
            f"command:  {meta['command']}", f"platform: {meta['platform']}"]
    lines = head + [""] + render_table(run_columns(report), report["runs"])
    groups = group_rows(report["runs"])
    if groups:
        lines += ["", GROUP_TITLE] + render_table(GROUP_COLUMNS, groups)
    engine = [line for line in map(engine_line, report["runs"]) if line]
    lines += [""] + engine if engine else []
    scenario = scenario_lines(report.get("scenario"))
    lines += [""] + scenario if scenario else []
    slos = next((e["summary"]["slos_ms"] for e in report["runs"] if e["summary"]["slos_ms"]), None)
    tail = [f"goodput SLOs (ms): {slos}"] if slos else []
    tail += [f"plot: {p}" for p in report["plots"]]
    return "\n".join(lines + ([""] + tail if tail else []))
