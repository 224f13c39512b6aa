"""``conveyor bench scenario``: workload construction (rate ratio, priority share, shared prefix),
run plans and findings on a model-free fake engine, and the CLI end to end on that fake."""

from __future__ import annotations

import json
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest

from conveyor.bench.scenarios import plan as scenarios
from conveyor.bench.scenarios.params import (SCENARIO_PARAMS, FairnessParams, PreemptionParams,
                                            PrefixParams, PriorityParams, params_from)
from conveyor.bench.scenarios.workloads import (count_for, priority_workload, tenant_counts,
                                               tenant_subset, two_tenant_workload)
from conveyor.bench.workloads import LengthDist, WorkloadError, synthetic_workload
from conveyor.core.stats import EngineStats
from conveyor.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput


def _base(n: int, seed: int = 0):
    return synthetic_workload(n, LengthDist.parse("8"), LengthDist.parse("2"), seed=seed)


def test_two_tenants_at_a_ten_to_one_rate_ratio():
    w = two_tenant_workload(_base(2200), total_rate=11.0, rate_ratio=10.0, seed=3)
    arrivals = [r.arrival_s for r in w.requests]
    assert arrivals == sorted(arrivals)
    a = np.array([r.arrival_s for r in w.requests if r.tenant == "A"])
    b = np.array([r.arrival_s for r in w.requests if r.tenant == "B"])
    assert (len(a), len(b)) == (2000, 200) and a[0] == b[0] == 0.0
    rate_a, rate_b = (len(a) - 1) / a[-1], (len(b) - 1) / b[-1]
    assert rate_a == pytest.approx(10.0, rel=0.1) and rate_b == pytest.approx(1.0, rel=0.25)
    assert w.spec["tenants"] == {"A": 2000, "B": 200} and w.spec["arrivals"]["rate"] == 11.0
    alone = tenant_subset(w, "B")
    assert [r.arrival_s for r in alone.requests] == b.tolist()      # the same B, without A
    again = two_tenant_workload(_base(2200), 11.0, 10.0, seed=3)
    assert [(r.request_id, r.arrival_s) for r in again.requests] == [
        (r.request_id, r.arrival_s) for r in w.requests]


def test_tenant_counts_and_request_counts():
    assert tenant_counts(11, 10.0) == (10, 1)
    assert tenant_counts(6, 10.0) == (5, 1) and tenant_counts(2, 10.0) == (1, 1)
    assert tenant_counts(10, 1.0) == (5, 5)
    with pytest.raises(WorkloadError):
        tenant_counts(1, 10.0)
    with pytest.raises(WorkloadError):
        tenant_subset(_base(3), "B")
    assert count_for(7, 60.0, 2.0) == 7 and count_for(None, 60.0, 2.5) == 150
    with pytest.raises(WorkloadError, match="--num-prompts"):
        count_for(None, 60.0, math.inf)
    inf = two_tenant_workload(_base(6), math.inf, 10.0)
    assert all(r.arrival_s == 0.0 for r in inf.requests)


def test_priority_share_is_exact_and_seeded():
    base = _base(100)
    w = priority_workload(base, 0.2, seed=1)
    assert sum(r.priority == 0 for r in w.requests) == 20
    assert sum(r.priority == 1 for r in w.requests) == 80
    assert [r.prompt for r in w.requests] == [r.prompt for r in base.requests]
    assert [r.priority for r in priority_workload(base, 0.2, seed=1).requests] == [
        r.priority for r in w.requests]
    assert [r.priority for r in priority_workload(base, 0.2, seed=2).requests] != [
        r.priority for r in w.requests]
    assert sum(r.priority == 0 for r in priority_workload(_base(3), 0.2).requests) == 1
    assert all(r.priority == 1 for r in priority_workload(base, 0.0).requests)
    with pytest.raises(WorkloadError):
        priority_workload(base, 1.5)


class TinyEngine:
    """A model-free engine: each step (1 ms) gives every running request one token. Counts half
    of each prompt as prefix hits when prefix caching is on, one preemption per run by mode."""

    def __init__(self, kwargs: dict, built: list):
        self.kwargs, self.sent, self.running = kwargs, [], {}
        self.step_log = None
        self.kv = SimpleNamespace(num_prefix_queries=0, num_prefix_hits=0)
        self.preemptions = {"recompute": 0, "swap": 0}
        built.append(self)

    def add_request(self, prompt, params, *, request_id, arrival_time=None, priority=0, tenant=""):
        self.sent.append((request_id, priority, tenant, len(prompt)))
        kv = self.kv
        cached = len(prompt) // 2 if self.kwargs.get("enable_prefix_caching", True) else 0
        kv.num_prefix_queries += len(prompt)
        kv.num_prefix_hits += cached
        self.running[request_id] = [params.max_tokens, [], cached]
        mode = self.kwargs.get("preemption_mode")
        if mode in ("recompute", "swap") and request_id.endswith("/0"):
            self.preemptions[mode] += 1

    def has_unfinished_requests(self) -> bool:
        return bool(self.running)

    def stats(self) -> EngineStats:
        return EngineStats(prefix_cache_queries=self.kv.num_prefix_queries,
                           prefix_cache_hits=self.kv.num_prefix_hits,
                           preemptions_by_mode=tuple(sorted(self.preemptions.items())))

    def step(self) -> list[RequestOutput]:
        time.sleep(0.001)
        outs = []
        for rid, (max_tokens, tokens, cached) in list(self.running.items()):
            tokens.append(5)
            done = len(tokens) == max_tokens
            comp = CompletionOutput(0, "", list(tokens), "length" if done else None, delta_token_ids=[5])
            outs.append(RequestOutput(rid, None, [1], [comp], done, RequestMetrics(0.0), cached))
            if done:
                del self.running[rid]
        return outs


def _measured(engine: TinyEngine) -> list[tuple]:
    """(request id, priority, tenant, prompt length) of what was sent, warm-up left out."""
    return [sent for sent in engine.sent if not sent[0].startswith("warmup")]


def _context(built: list, **base) -> scenarios.ScenarioContext:
    kwargs = {"max_num_seqs": 4, "block_size": 16, **base}
    return scenarios.ScenarioContext(lambda kw: TinyEngine(kw, built), kwargs, None, 0, False)


def test_fairness_plan_and_findings_on_a_fake_engine():
    built = []
    result = scenarios.run_scenario("fairness", _context(built), FairnessParams(
        num_prompts=12, request_rate=math.inf, prompt_len="8", output_len="3"))
    assert [r.label for r in result.runs] == ["B-alone", "A+B-fcfs", "A+B-fair"]
    assert [e.kwargs["fair_scheduling"] for e in built] == [False, False, True]
    alone, fcfs, _ = built
    assert [t for _, _, t, _ in _measured(alone)] == ["B"]
    assert sorted(t for _, _, t, _ in _measured(fcfs)) == ["A"] * 11 + ["B"]
    f = result.findings
    assert f["offered_rate_req_s"] == "inf" and f["measured_capacity_req_s"] is None
    assert f["B-alone.B.ttft_p99_ms"] > 0 and "B-alone.A.ttft_p99_ms" not in f
    assert f["B_ttft_p99_vs_alone.fcfs"] == pytest.approx(
        f["A+B-fcfs.B.ttft_p99_ms"] / f["B-alone.B.ttft_p99_ms"])
    assert result.params["num_prompts"] == 12 and result.params["request_rate"] == "inf"
    assert result.params["seed"] == 0 and result.workload_spec["tenants"] == {"A": 11, "B": 1}


def test_priority_plan_calibrates_and_strips_priorities_for_fcfs():
    built = []
    result = scenarios.run_scenario("priority", _context(built), PriorityParams(
        num_prompts=10, load=1000.0, prompt_len="8", output_len="2"))
    calibration, fcfs, prio = built                     # one calibration engine, then two runs
    assert len(calibration.sent) == 2 + 4               # warm-up + one full batch of max_num_seqs
    assert {p for _, p, _, _ in fcfs.sent} == {0}
    assert sorted(p for _, p, _, _ in _measured(prio)) == [0, 0] + [1] * 8
    assert result.runs[0].config["priorities_sent"] is False
    assert [r.priority for r in result.runs[0].records] == [r.priority for r in result.runs[1].records]
    f = result.findings
    assert f["measured_capacity_req_s"] > 0
    assert f["offered_rate_req_s"] == pytest.approx(1000.0 * f["measured_capacity_req_s"])
    assert {"fcfs.high.ttft_p99_ms", "priority.low.ttft_p50_ms", "high_ttft_p99_priority_vs_fcfs"} <= set(f)


def test_prefix_and_preemption_plans_on_a_fake_engine():
    built = []
    result = scenarios.run_scenario("prefix", _context(built), PrefixParams(
        num_prompts=4, prefix_len=20, question_len=4, output_len=2))
    assert [e.kwargs["enable_prefix_caching"] for e in built] == [False, True]
    assert {n for _, _, _, n in _measured(built[1])} == {24}
    f = result.findings
    assert f["prefix_hit_rate"] == pytest.approx(0.5) and f["cached_prompt_token_share"] == pytest.approx(0.5)
    assert f["request_throughput_on_vs_off"] > 0
    built.clear()
    result = scenarios.run_scenario("preemption", _context(built), PreemptionParams(
        num_prompts=3, prompt_len=20, output_len=12, kv_budget_requests=2))
    assert [e.kwargs["preemption_mode"] for e in built] == ["recompute", "swap"]
    assert {e.kwargs["num_blocks"] for e in built} == {2 * 2} and result.workload_spec["num_kv_blocks"] == 4
    f = result.findings
    assert f["recompute.preemptions.recompute"] == 1 and f["swap.preemptions.swap"] == 1
    assert f["swap.preemptions.recompute"] == 0 and f["recompute.output_throughput_vs_recompute"] == 1.0
    with pytest.raises(WorkloadError, match="--modes"):
        scenarios.run_scenario("preemption", _context([]), PreemptionParams(modes="lazy"))


def test_params_and_the_cli_end_to_end_on_the_fake(monkeypatch, tmp_path):
    assert set(SCENARIO_PARAMS) == set(scenarios.SCENARIOS)
    assert params_from("fairness", {"request_rate": "auto", "load": None}) == FairnessParams()
    assert params_from("priority", {"high_share": 0.5}).high_share == 0.5
    from conveyor.cli import bench as cli_bench
    from conveyor.cli import main
    built = []
    monkeypatch.setattr(cli_bench, "_engine_factory", lambda args: lambda kw: TinyEngine(kw, built))
    monkeypatch.setattr(cli_bench, "_load_tokenizer", lambda model: None)
    rc = main(["bench", "scenario", "fairness", "--num-prompts", "6", "--request-rate", "inf",
               "--output-len", "2", "--output-dir", str(tmp_path), "--no-progress", "--no-plots",
               "--log-level", "warning"])
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["meta"]["mode"] == "scenario" and report["meta"]["scenario"] == "fairness"
    assert report["meta"]["command"].startswith("conveyor") and report["meta"]["platform"]
    assert built[0].kwargs["max_num_seqs"] == 16 and built[0].kwargs["max_model_len"] == 1024
    assert [r["label"] for r in report["runs"]] == ["B-alone", "A+B-fcfs", "A+B-fair"]
    assert set(report["runs"][1]["groups"]["tenant"]) == {"A", "B"}
    assert report["runs"][1]["prefix_cache"]["hit_rate"] == pytest.approx(0.5)
    assert report["scenario"]["name"] == "fairness"
    assert "B_ttft_p99_vs_alone.fair" in report["scenario"]["findings"]
