"""Metric arithmetic on hand-made timelines and step logs, and the report / plot plumbing."""

from __future__ import annotations

import json
import math

import pytest

from conveyor.bench.console import format_table
from conveyor.bench.metrics import meets_slos, parse_slos, summarize, summarize_steps
from conveyor.bench.offline import RunResult
from conveyor.bench.plots import timeline_segments
from conveyor.bench.records import RequestRecord, StepSample, assign_slots, samples_from_step_log
from conveyor.bench.report import add_ratios, build_report, report_meta, run_entry
from conveyor.bench.suite import compare_variants, kv_budget_blocks, write_outputs
from conveyor.bench.workloads import BenchRequest, Workload, WorkloadError


def _records() -> list[RequestRecord]:
    return [
        RequestRecord("r1", 10, 4, arrival=0.0, first_token=1.0, finish=3.0, output_len=4,
                      chunk_times=[1.0, 1.5, 2.0, 3.0]),
        RequestRecord("r2", 20, 2, arrival=1.0, first_token=1.5, finish=2.5, output_len=2,
                      chunk_times=[1.5, 2.5]),
        RequestRecord("r3", 30, 1, arrival=2.0, first_token=6.0, finish=6.0, output_len=1,
                      chunk_times=[6.0]),
        RequestRecord("r4", 40, 8, arrival=0.5, error="HTTP 500: boom"),
    ]


def test_per_request_latencies():
    r1, r2, r3, r4 = _records()
    assert (r1.ttft, r1.e2e, r1.itls) == (1.0, 3.0, [0.5, 0.5, 1.0])
    assert r1.tpot == pytest.approx(2.0 / 3)
    assert (r2.ttft, r2.tpot, r2.e2e) == (0.5, 1.0, 1.5)
    assert (r3.ttft, r3.tpot, r3.itls) == (4.0, None, [])
    assert not r4.success and r4.ttft is None and r4.e2e is None


def test_summary_throughput_and_percentiles():
    s = summarize(_records())
    assert (s.num_requests, s.completed, s.failed, s.duration_s) == (4, 3, 1, 6.0)
    assert (s.total_input_tokens, s.total_output_tokens) == (60, 7)
    assert s.request_throughput == pytest.approx(0.5)
    assert s.output_throughput == pytest.approx(7 / 6)
    assert s.total_token_throughput == pytest.approx(67 / 6)
    # TTFT [500, 1000, 4000] ms, linear interpolation between order statistics
    assert s.ttft_ms.mean == pytest.approx(5500 / 3)
    assert (s.ttft_ms.p50, s.ttft_ms.p90, s.ttft_ms.p99) == pytest.approx((1000, 3400, 3940))
    # ITL pooled over requests: [500, 500, 1000, 1000] ms
    assert (s.itl_ms.mean, s.itl_ms.p50, s.itl_ms.p90, s.itl_ms.p99) == pytest.approx((750, 750, 1000, 1000))
    # TPOT of requests with >= 2 tokens: [666.7, 1000] ms
    assert s.tpot_ms.mean == pytest.approx(2500 / 3)
    assert s.tpot_ms.p90 == pytest.approx(2000 / 3 + 0.9 * 1000 / 3)
    assert (s.e2e_ms.mean, s.e2e_ms.p50, s.e2e_ms.p90) == pytest.approx((8500 / 3, 3000, 3800))
    assert s.goodput is None and s.slos_ms is None


def test_goodput():
    s = summarize(_records(), parse_slos(["ttft:1000", "tpot:800"]))
    assert s.goodput == pytest.approx(1 / 6)           # only r1 meets both
    assert s.goodput_fraction == pytest.approx(1 / 4)   # the failed request counts against it
    s = summarize(_records(), parse_slos(["e2e:4000"]))
    assert s.goodput == pytest.approx(3 / 6)           # limits are inclusive
    r3 = _records()[2]
    assert meets_slos(r3, {"tpot": 1.0})                # undefined TPOT (1 token) counts as met
    assert not meets_slos(_records()[3], {"e2e": 1e9})  # failed never meets


def test_summary_explicit_duration_and_empty():
    s = summarize(_records(), duration_s=12.0)
    assert s.request_throughput == pytest.approx(0.25)
    empty = summarize([])
    assert (empty.completed, empty.request_throughput, empty.ttft_ms.p50) == (0, 0.0, None)


def test_itl_goodput_is_the_longest_gap_of_each_stream():
    r1, r2, r3, _ = _records()           # longest gaps: r1 1000 ms, r2 1000 ms, r3 none
    assert meets_slos(r1, {"itl": 1000.0}) and not meets_slos(r1, {"itl": 999.0})
    assert meets_slos(r3, {"itl": 1.0})  # one token: no gap, met
    s = summarize(_records(), parse_slos(["itl:999", "ttft:5000"]))
    assert s.goodput == pytest.approx(1 / 6)            # r3 only
    assert parse_slos(["itl:250"]) == {"itl": 250.0}


def test_slo_parsing():
    assert parse_slos(["ttft:500", "tpot:50", "e2el:9000"]) == {"ttft": 500.0, "tpot": 50.0, "e2e": 9000.0}
    assert parse_slos(None) is None
    for bad in (["ttft"], ["ttft:0"], ["latency:5"], ["tpot:fast"]):
        with pytest.raises(WorkloadError, match="KEY:MILLISECONDS"):
            parse_slos(bad)


def _static_batch_log() -> list[StepSample]:
    held = {"a": 0, "b": 1, "c": 2}
    rows = [  # useful, scheduled tokens, padding, waiting, kv, admissions, preemptions
        (["a", "b", "c"], 30, 5, 2, 0.5, 3, 0),
        (["a", "b", "c"], 3, 0, 2, 0.6, 0, 0),
        (["c"], 1, 2, 3, 0.6, 0, 0),
        (["c"], 1, 2, 3, 0.7, 0, 1),
    ]
    return [StepSample(i, num_waiting=w, num_scheduled_tokens=t, num_padding_tokens=p,
                       num_new_admissions=adm, num_preemptions=pre, kv_usage=kv, max_num_seqs=4,
                       slot_of=dict(held), useful_ids=u)
            for i, (u, t, p, w, kv, adm, pre) in enumerate(rows)]


def test_batch_summary_on_a_static_batch():
    b = summarize_steps(_static_batch_log())
    assert b.num_steps == 4
    assert b.slot_utilization == pytest.approx(0.5)       # mean(3/4, 3/4, 1/4, 1/4)
    assert (b.padding_tokens, b.straggler_slot_steps, b.empty_slot_steps) == (9, 4, 4)
    assert b.useful_token_fraction == pytest.approx(35 / 44)
    assert b.mean_kv_usage == pytest.approx(0.6)
    assert (b.mean_queue_depth, b.max_queue_depth) == (2.5, 3)
    assert (b.admissions_per_step, b.preemptions) == (0.75, 1)
    assert summarize_steps([]) is None


def test_timeline_segments_show_idle_holders():
    segs = timeline_segments(_static_batch_log())
    assert segs == [("a", 0, 0, 2, True), ("b", 1, 0, 2, True), ("c", 2, 0, 4, True),
                    ("a", 0, 2, 2, False), ("b", 1, 2, 2, False)]


def test_assign_slots_reuses_freed_slots():
    steps = [StepSample(i, max_num_seqs=2, useful_ids=u)
             for i, u in enumerate([["x", "y"], ["x", "y"], ["y", "z"], ["z"]])]
    assign_slots(steps)
    assert [s.slot_of for s in steps] == [{"x": 0, "y": 1}, {"x": 0, "y": 1}, {"y": 1, "z": 0}, {"z": 0}]


def test_samples_from_engine_step_log():
    from conveyor.core.outputs import StepStats
    log = [StepStats(step_index=7, start_time=100.5, end_time=100.75, max_num_seqs=8, num_running=2,
                     num_waiting=1, num_scheduled_tokens=5, num_new_admissions=2, kv_usage=0.25,
                     slot_of={"a": 0, "b": 1}, useful_request_ids=["a"])]
    (s,) = samples_from_step_log(log, t0=100.0, max_num_seqs=99)
    assert (s.index, s.start, s.end, s.max_num_seqs) == (0, 0.5, 0.75, 8)
    assert (s.slot_of, s.useful_ids, s.num_scheduled_tokens, s.kv_usage) == ({"a": 0, "b": 1}, ["a"], 5, 0.25)


def _run(label, rate, records, steps=()):
    return RunResult(label, records, list(steps), {"batching": label}, 1.0, rate, 1.0)


def test_report_ratios_table_and_json(tmp_path):
    fast = [RequestRecord("x", 4, 2, 0.0, 0.5, 1.0, 2, [0.5, 1.0])]
    slow = [RequestRecord("x", 4, 2, 0.0, 1.0, 2.0, 2, [1.0, 2.0])]
    runs = [_run("static", math.inf, slow, _static_batch_log()), _run("continuous", math.inf, fast),
            _run("static", 2.0, slow), _run("continuous", 2.0, fast)]
    meta = report_meta("compare", {"kind": "test"}, argv=["conveyor", "bench", "compare", "--x", "a b"])
    report = write_outputs(meta, runs, str(tmp_path), {"ttft": 800.0})
    assert meta["command"] == "conveyor bench compare --x 'a b'"
    assert meta["platform"] and meta["conveyor_version"] and meta["date"]
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert on_disk["schema"] == "conveyor.bench.report/1"
    cont_inf = on_disk["runs"][1]
    assert cont_inf["request_rate"] == "inf" and cont_inf["summary"]["completed"] == 1
    assert cont_inf["vs_static"]["output_throughput"] == pytest.approx(2.0)
    assert cont_inf["vs_static"]["ttft_p50"] == pytest.approx(0.5)
    assert on_disk["runs"][3]["vs_static"]["request_throughput"] == pytest.approx(2.0)
    assert on_disk["runs"][0]["batch"]["straggler_slot_steps"] == 4
    assert on_disk["runs"][1]["batch"] is None
    names = {p.rsplit("/", 1)[-1] for p in on_disk["plots"]}
    assert names == {"latency_cdf.png", "throughput_vs_rate.png", "timeline_static_inf.png"}
    for p in on_disk["plots"]:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    table = format_table(report)
    assert "command:  conveyor bench compare" in table and "platform:" in table
    assert "continuous" in table and "2.00" in table


def test_ratios_need_a_static_run_at_the_same_rate():
    entries = [run_entry(_run("continuous", 1.0, _records()))]
    add_ratios(entries)
    assert "vs_static" not in entries[0]
    report = build_report({"mode": "x", "date": "d", "conveyor_version": "v", "command": "c",
                           "platform": "p"}, entries)
    assert "-" in format_table(report)


def test_kv_budget_and_compare_matrix():
    reqs = [BenchRequest("0", [1] * 10, 10, 20), BenchRequest("1", [1] * 40, 40, 9)]
    w = Workload("t", reqs)
    assert w.max_request_tokens == 49
    assert kv_budget_blocks(w, 8, 16) == 8 * 4
    with pytest.raises(WorkloadError):
        kv_budget_blocks(w, 0, 16)
    variants = {v.label: v.overrides for v in compare_variants(8, 32, 100, batch_timeout_s=0.5)}
    assert list(variants) == ["no-batching", "static", "dynamic", "continuous",
                              "continuous+reservation", "continuous+paged"]
    assert variants["no-batching"]["max_num_seqs"] == 1
    assert variants["static"] == {"max_num_seqs": 8, "num_blocks": 100, "kv_cache_bytes": None,
                                  "batch_timeout_s": 0.5, "batching": "static"}
    assert variants["continuous+reservation"]["num_blocks"] == 32
    assert variants["continuous+reservation"]["kv_allocation"] == "reservation"
    assert variants["continuous+paged"]["kv_allocation"] == "paged"
    assert "num_blocks" not in compare_variants(8, 32, None)[3].overrides
    assert [v.label for v in compare_variants(8, 32, None, only=["static", "continuous"])] == ["static", "continuous"]
    with pytest.raises(WorkloadError, match="unknown policy"):
        compare_variants(8, 32, None, only=["orca"])
