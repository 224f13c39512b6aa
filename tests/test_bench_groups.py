"""Per-tenant / per-priority breakdowns on hand-made records, engine counter deltas, and how both
appear in the report and the console table."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from conveyor.bench.console import engine_line, format_table, group_rows
from conveyor.bench.metrics import summarize, summarize_groups
from conveyor.bench.offline import RunResult, counters_delta, engine_counters
from conveyor.bench.records import RequestRecord
from conveyor.bench.report import build_report, run_entry
from conveyor.core.stats import EngineStats


def _records() -> list[RequestRecord]:
    return [
        RequestRecord("a1", 10, 4, arrival=0.0, first_token=1.0, finish=3.0, output_len=4,
                      chunk_times=[1.0, 1.5, 2.0, 3.0], tenant="A", priority=0, cached_tokens=8),
        RequestRecord("a2", 20, 2, arrival=1.0, first_token=1.5, finish=2.5, output_len=2,
                      chunk_times=[1.5, 2.5], tenant="A", priority=1, cached_tokens=0),
        RequestRecord("b1", 30, 1, arrival=2.0, first_token=6.0, finish=6.0, output_len=1,
                      chunk_times=[6.0], tenant="B", priority=1),
        RequestRecord("b2", 40, 8, arrival=0.5, error="HTTP 500: boom", tenant="B", priority=1),
    ]


def test_groups_summarize_each_tenant_and_priority_over_the_run_duration():
    records = _records()
    groups = summarize_groups(records)
    assert list(groups) == ["tenant", "priority"] and list(groups["tenant"]) == ["A", "B"]
    a, b = groups["tenant"]["A"], groups["tenant"]["B"]
    assert (a.num_requests, a.completed, a.failed) == (2, 2, 0)
    assert (b.num_requests, b.completed, b.failed) == (2, 1, 1)
    assert a.ttft_ms.mean == pytest.approx(750.0) and a.ttft_ms.p50 == pytest.approx(750.0)
    assert a.ttft_ms.p99 == pytest.approx(995.0)               # 500 + 0.99 x 500, interpolated
    assert a.itl_ms.p50 == pytest.approx(750.0)                # gaps 0.5, 0.5, 1.0 and 1.0
    assert a.e2e_ms.p90 == pytest.approx(1500 + 0.9 * 1500)
    assert b.ttft_ms.p99 == pytest.approx(4000.0) and b.tpot_ms.p50 is None
    # Throughputs divide by the whole run's 6 s, so the groups add up to the run.
    assert a.duration_s == b.duration_s == 6.0
    assert (a.output_throughput, b.output_throughput) == (pytest.approx(1.0), pytest.approx(1 / 6))
    total = summarize(records)
    assert a.output_throughput + b.output_throughput == pytest.approx(total.output_throughput)
    by_priority = groups["priority"]
    assert [s.completed for s in by_priority.values()] == [1, 2]
    assert by_priority["0"].ttft_ms.p50 == pytest.approx(1000.0)


def test_a_single_value_makes_no_group_and_priorities_sort_numerically():
    records = [RequestRecord(str(p), 1, 1, 0.0, 1.0, 1.0, 1, [1.0], tenant="t", priority=p)
               for p in (10, -1, 2)]
    groups = summarize_groups(records)
    assert list(groups) == ["priority"] and list(groups["priority"]) == ["-1", "2", "10"]
    assert summarize_groups(records[:1]) == {}


def test_engine_counters_and_their_delta():
    kv = SimpleNamespace(num_prefix_queries=100, num_prefix_hits=40)
    sched = SimpleNamespace(num_preemptions_by_mode={"recompute": 1, "swap": 0})
    engine = SimpleNamespace(stats=lambda: EngineStats(
        prefix_cache_queries=kv.num_prefix_queries, prefix_cache_hits=kv.num_prefix_hits,
        preemptions_by_mode=tuple(sorted(sched.num_preemptions_by_mode.items()))))
    before = engine_counters(engine)
    kv.num_prefix_queries, kv.num_prefix_hits = 300, 100
    sched.num_preemptions_by_mode["swap"] = 2
    delta = counters_delta(before, engine_counters(engine))
    assert delta == {"prefix_cache": {"queries": 200, "hits": 60, "hit_rate": pytest.approx(0.3)},
                     "preemptions_by_mode": {"recompute": 0, "swap": 2}, "spec_decode": None}
    assert before["by_mode"] == {"recompute": 1, "swap": 0}        # a copy, not the live dict
    assert engine_counters(SimpleNamespace()) is None
    assert counters_delta(None, before) is None
    idle = counters_delta(before, before)
    assert idle["prefix_cache"]["hit_rate"] is None


def test_report_entry_and_console_show_groups_and_engine_counters():
    stats = {"prefix_cache": {"queries": 100, "hits": 30, "hit_rate": 0.3},
             "preemptions_by_mode": {"recompute": 2, "swap": 1}}
    run = RunResult("fcfs", _records(), engine_stats=stats)
    entry = run_entry(run)
    assert entry["groups"]["tenant"]["B"]["failed"] == 1
    assert entry["groups"]["priority"]["1"]["ttft_ms"]["p50"] == pytest.approx(2250.0)
    assert entry["prefix_cache"] == stats["prefix_cache"] and entry["cached_tokens"] == 8
    assert entry["preemptions_by_mode"] == {"recompute": 2, "swap": 1}
    row = entry["requests"][0]
    assert (row["tenant"], row["priority"], row["cached_tokens"]) == ("A", 0, 8)
    assert [g["group"] for g in group_rows([entry])] == ["tenant=A", "tenant=B", "priority=0", "priority=1"]
    assert engine_line(entry) == ("fcfs: prefix cache 30/100 tok hit (30.0%); cached prompt tok 8; "
                                  "preemptions recompute 2, swap 1")
    meta = {"mode": "scenario", "date": "d", "conveyor_version": "v", "command": "c", "platform": "p"}
    scenario = {"name": "fairness", "params": {}, "findings": {"B_ttft_p99_vs_alone.fair": 1.25,
                                                              "missing": None}}
    table = format_table(build_report(meta, [entry], scenario=scenario))
    assert "tenant=B" in table and "1/2" in table and "priority=0" in table
    assert "prefix cache 30/100 tok hit (30.0%)" in table
    assert "B_ttft_p99_vs_alone.fair = 1.250" in table and "missing = -" in table


def test_plain_runs_have_no_group_rows_or_engine_lines():
    plain = [RequestRecord("x", 1, 1, 0.0, 1.0, 1.0, 1, [1.0])]
    entry = run_entry(RunResult("continuous", plain))
    assert entry["groups"] == {} and entry["prefix_cache"] is None and entry["cached_tokens"] is None
    assert engine_line(entry) is None
    entry["config"], entry["wall_s"] = {"client_cpu_s": 0.25}, 10.0     # an HTTP run's
    assert engine_line(entry) == "continuous: load generator CPU 0.25 s (2.5% of one core over the run)"
    entry["config"] = {}
    zero = {"prefix_cache": {"queries": 0, "hits": 0, "hit_rate": None},
            "preemptions_by_mode": {"recompute": 0, "swap": 0}}
    assert engine_line(run_entry(RunResult("off", plain, engine_stats=zero))) is None
    meta = {"mode": "offline", "date": "d", "conveyor_version": "v", "command": "c", "platform": "p"}
    assert "per group" not in format_table(build_report(meta, [entry]))
