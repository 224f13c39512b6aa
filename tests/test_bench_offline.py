"""The in-process load generator: arrival handling on a fake engine with a fake clock, and one
smoke run of ``conveyor bench offline`` on the real default model."""

from __future__ import annotations

import json

import pytest

from conveyor.bench.offline import run_offline
from conveyor.bench.workloads import BenchRequest, Workload
from conveyor.core.outputs import StepStats
from conveyor.errors import InvalidRequestError
from conveyor.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput


class FakeClock:
    def __init__(self):
        self.now = 1000.0
        self.slept = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class FakeEngine:
    """Every step costs ``step_s`` of fake time and gives each running request one token."""

    def __init__(self, clock: FakeClock, step_s: float = 0.1, launch_at: float = 0.0):
        self.clock, self.step_s, self.launch_at = clock, step_s, launch_at
        self.running: dict[str, list] = {}
        self.added: list[tuple[str, float, float]] = []     # (id, fake time added, arrival_time)
        self.groups: dict[str, tuple[int, str]] = {}         # id -> (priority, tenant) as sent
        self.step_log = [StepStats(), StepStats()]                         # earlier steps (warm-up)

    def add_request(self, prompt, params, *, request_id, arrival_time, priority=0, tenant=""):
        if params.max_tokens > 100:
            raise InvalidRequestError("prompt + max_tokens exceeds the context length")
        assert params.ignore_eos and params.temperature == 0.0
        self.added.append((request_id, self.clock.now, arrival_time))
        self.groups[request_id] = (priority, tenant)
        self.running[request_id] = [params.max_tokens, []]

    def has_unfinished_requests(self) -> bool:
        return bool(self.running)

    def step(self) -> list[RequestOutput]:
        if self.clock.now < self.launch_at:
            return []                       # holding its requests, like a static batch filling up
        start = self.clock.now
        self.clock.now += self.step_s
        outs, slots = [], {rid: i for i, rid in enumerate(self.running)}
        for rid, (max_tokens, tokens) in list(self.running.items()):
            tokens.append(7)
            done = len(tokens) == max_tokens
            comp = CompletionOutput(0, "", list(tokens), "length" if done else None, delta_token_ids=[7])
            outs.append(RequestOutput(rid, None, [1], [comp], done, RequestMetrics(0.0)))
            if done:
                del self.running[rid]
        self.step_log.append(StepStats(start_time=start, end_time=self.clock.now, max_num_seqs=4,
                                            slot_of=slots, useful_request_ids=list(slots)))
        return outs


def _req(i, arrival, max_tokens=3):
    return BenchRequest(str(i), [1, 2, 3], 3, max_tokens, arrival_s=arrival)


def test_arrivals_are_honoured_in_wall_clock_time():
    clock = FakeClock()
    engine = FakeEngine(clock)
    workload = Workload("t", [_req(0, 0.0), _req(1, 0.0), _req(2, 0.15), _req(3, 1.0), _req(4, 5.0, 2)])
    run = run_offline(engine, workload, "fake", progress=False, clock=clock, sleep=clock.sleep)
    t0 = 1000.0
    for rid, added_at, arrival_time in engine.added:
        req = workload.requests[int(rid.split("/")[1])]
        assert arrival_time == t0 + req.arrival_s           # the arrival time, not the add time
        assert added_at >= arrival_time                      # never sent early
    r0, r1, r2, r3, r4 = run.records
    assert r0.chunk_times == pytest.approx([0.1, 0.2, 0.3]) and r0.ttft == pytest.approx(0.1)
    assert r2.arrival == 0.15 and r2.first_token == pytest.approx(0.3)   # waited for the running step
    assert r2.ttft == pytest.approx(0.15)
    assert r3.first_token == pytest.approx(1.1) and r4.e2e == pytest.approx(0.2)
    assert sum(clock.slept) == pytest.approx(0.5 + 3.7)  # slept only while idle
    assert all(r.output_len == r.max_tokens and r.success for r in run.records)
    assert len(run.steps) == 5 + 3 + 2                   # the run's own steps, not the warm-up's
    assert run.steps[0].start == pytest.approx(0.0) and run.steps[0].slot_of == {"fake/0": 0, "fake/1": 1}


def test_a_holding_engine_is_polled_not_spun():
    clock = FakeClock()
    engine = FakeEngine(clock, launch_at=1000.05)
    run = run_offline(engine, Workload("t", [_req(0, 0.0, 2)]), "x", progress=False,
                      clock=clock, sleep=clock.sleep)
    assert 40 <= len(clock.slept) <= 60 and max(clock.slept) <= 0.001
    assert run.records[0].first_token == pytest.approx(0.15, abs=0.002)


def test_rejected_requests_are_recorded_and_the_run_goes_on():
    clock = FakeClock()
    engine = FakeEngine(clock)
    run = run_offline(engine, Workload("t", [_req(0, 0.0, 500), _req(1, 0.0, 2)]), "x",
                      progress=False, clock=clock, sleep=clock.sleep)
    bad, good = run.records
    assert "context length" in bad.error and not bad.success
    assert good.success and good.output_len == 2


def test_groups_are_recorded_and_priorities_can_be_withheld():
    clock = FakeClock()
    reqs = [BenchRequest(str(i), [1, 2], 2, 2, priority=p, tenant=t)
            for i, (p, t) in enumerate([(0, "a"), (1, "b")])]
    for send, sent in ((True, [0, 1]), (False, [0, 0])):
        engine = FakeEngine(clock)
        run = run_offline(engine, Workload("t", reqs), "x", progress=False, clock=clock,
                          sleep=clock.sleep, send_priority=send)
        assert [engine.groups[f"x/{i}"] for i in "01"] == list(zip(sent, ["a", "b"]))
        assert [(r.priority, r.tenant) for r in run.records] == [(0, "a"), (1, "b")]   # the class
        assert run.engine_stats is None and run.records[0].cached_tokens == 0


def test_prefix_cache_counters_on_the_real_engine():
    """The engine's counters are read where the engine keeps them: a second request sharing a
    prefix with the first (admitted a step later) hits the cache, and the run's delta says so."""
    from engine_helpers import prompt, small_engine
    engine = small_engine()
    shared = prompt(48, seed=5)
    reqs = [BenchRequest(str(i), shared + prompt(8, seed=i), 56, 2) for i in range(2)]
    run = run_offline(engine, Workload("t", reqs), "prefix", progress=False)
    assert all(r.success for r in run.records)
    stats = run.engine_stats
    assert set(stats["preemptions_by_mode"]) >= {"recompute", "swap"}
    assert stats["prefix_cache"]["queries"] >= 2 * 56
    cached = sum(r.cached_tokens for r in run.records)
    assert cached > 0 and stats["prefix_cache"]["hits"] >= cached


def test_offline_smoke_on_the_real_engine(tmp_path):
    """CLI -> engine kwargs (policy passed through, record_steps) -> run -> report + plots."""
    from conveyor.cli import main
    out = tmp_path / "out"
    rc = main(["bench", "offline", "--num-prompts", "5", "--prompt-len", "8,16", "--output-len",
               "uniform:2:4", "--dtype", "float32", "--max-num-seqs", "4", "--max-model-len", "128",
               "--batching", "continuous", "--kv-allocation", "paged", "--goodput", "e2e:600000",
               "--output-dir", str(out), "--no-progress", "--log-level", "warning"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    (run,) = report["runs"]
    assert run["config"]["batching"] == "continuous" and run["config"]["record_steps"] is True
    s, b = run["summary"], run["batch"]
    assert (s["completed"], s["failed"]) == (5, 0)
    assert s["total_output_tokens"] == sum(r["max_tokens"] for r in run["requests"])
    assert all(r["output_len"] == r["max_tokens"] == r["num_chunks"] for r in run["requests"])
    assert sorted(r["prompt_len"] for r in run["requests"]) == [8, 8, 8, 16, 16]   # mix quota
    assert s["goodput"] == pytest.approx(s["request_throughput"])
    assert b["num_steps"] >= 4 and 0 < b["slot_utilization"] <= 1
    assert b["padding_tokens"] == 0 and b["straggler_slot_steps"] == 0   # continuous: no waste
    assert report["meta"]["platform"] and report["meta"]["workload"]["kind"] == "synthetic"
    assert {p.rsplit("/", 1)[-1] for p in report["plots"]} == {"latency_cdf.png", "timeline_continuous.png"}
