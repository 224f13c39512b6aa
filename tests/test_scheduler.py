"""Scheduler and block pool behaviour, with a fake runner (no model, no torch)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from conveyor.config import SchedulerConfig
from conveyor.core.block_pool import BlockPool
from conveyor.core.engine_core import EngineCore
from conveyor.core.request import FinishReason, Request
from conveyor.core.swap import PreemptionCosts, SwapManager
from conveyor.errors import CapacityError, InvalidRequestError
from conveyor.sampling_params import SamplingParams

from fake_runner import FakeRunner


def make_core(num_blocks=64, block_size=4, budget=32, max_seqs=4, max_len=256, chunked=True,
              batching="continuous", kv_allocation="paged", preemption="recompute",
              prefix_caching=False):
    runner = FakeRunner(block_size)
    cfg = SchedulerConfig(budget, max_seqs, chunked, batching, 0.0)
    swap = None if preemption == "recompute" else SwapManager(
        num_blocks // 2 + 1, preemption, PreemptionCosts(1e-3, 1e-5))
    core = EngineCore(runner, cfg, num_blocks, block_size, max_len, kv_allocation=kv_allocation,
                      swap=swap, enable_prefix_caching=prefix_caching)
    return core, runner


def req(rid, prompt_len, max_tokens, arrival=0.0, **kw):
    return Request(str(rid), list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, **kw),
                   max_tokens, frozenset(), arrival_time=arrival or 1.0)


def run_all(core, max_steps=10_000):
    outs = {}
    for _ in range(max_steps):
        if not core.has_unfinished_requests():
            break
        for o in core.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert not core.has_unfinished_requests()
    return outs


def test_block_pool_alloc_free_refcounts():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert pool.num_free_blocks == 1 and not pool.can_allocate(2)
    pool.free(a[:1])
    assert pool.num_free_blocks == 2 and pool.ref_count(a[0]) == 0
    with pytest.raises(RuntimeError):
        pool.free(a[:1])
    pool.free(a[1:])
    pool.check_invariant()
    assert pool.num_free_blocks == 4


def test_chunked_prefill_splits_long_prompt_and_mixes_with_decode():
    core, runner = make_core(budget=8)
    core.add_request(req("a", 3, 5))
    core.step()                                   # a: whole prompt (3), samples
    core.add_request(req("b", 20, 2))
    core.step()
    first = runner.steps[-1].num_scheduled_tokens
    assert first == {"a": 1, "b": 7}              # decode first, then a prefill chunk in the budget
    core.step()
    assert runner.steps[-1].num_scheduled_tokens == {"a": 1, "b": 7}
    run_all(core)
    core.check_invariants()


def test_no_chunking_waits_for_whole_prompt_budget():
    core, runner = make_core(budget=8, chunked=False)
    core.add_request(req("a", 6, 3))
    core.add_request(req("b", 6, 3))
    core.step()
    assert runner.steps[-1].num_scheduled_tokens == {"a": 6}
    run_all(core)
    core.check_invariants()


def test_continuous_admits_on_step_after_a_slot_frees():
    core, runner = make_core(max_seqs=2, budget=64)
    core.add_request(req("short", 4, 1))
    core.add_request(req("long", 4, 6))
    core.add_request(req("late", 4, 3))
    core.step()                                   # short + long prefill; short finishes (1 token)
    assert set(runner.steps[0].num_scheduled_tokens) == {"short", "long"}
    core.step()                                   # slot freed -> late joins now
    assert set(runner.steps[1].num_scheduled_tokens) == {"long", "late"}
    assert "short" in runner.steps[1].finished_request_ids
    run_all(core)
    core.check_invariants()


def test_preemption_by_recompute_newest_first_and_resume():
    core, runner = make_core(num_blocks=6, block_size=4, budget=64, max_seqs=4, max_len=24)
    for i in range(3):
        core.add_request(req(i, 4, 8))
    outs = run_all(core)
    assert core.scheduler.num_preemptions_total > 0
    assert any(runner.steps[i].preempted_request_ids for i in range(len(runner.steps)))
    first_victim = next(s.preempted_request_ids for s in runner.steps if s.preempted_request_ids)
    assert first_victim == {"2"}                  # the newest running request goes first
    assert all(len(v) == 8 for v in outs.values())
    core.check_invariants()


@pytest.mark.parametrize("mode", ["recompute", "swap", "auto"])
def test_preempted_output_equals_unpreempted_output(mode):
    big, _ = make_core(num_blocks=256)
    small, runner = make_core(num_blocks=6, max_len=24, preemption=mode)
    for core in (big, small):
        for i in range(4):
            core.add_request(req(i, 3 + i, 7))
    assert run_all(big) == run_all(small)
    assert small.scheduler.num_preemptions_total > 0
    swapped = small.scheduler.num_preemptions_by_mode["swap"]
    assert (swapped > 0) == (mode != "recompute")
    assert any(s.swap_in for s in runner.steps) == (mode != "recompute")
    small.check_invariants()


def test_request_that_can_never_fit_is_rejected():
    core, _ = make_core(num_blocks=2, block_size=4, max_len=256)
    with pytest.raises(CapacityError):
        core.add_request(req("x", 6, 4))           # needs 3 blocks, pool has 2
    with pytest.raises(InvalidRequestError):
        make_core(max_len=8)[0].add_request(req("y", 6, 4))
    core.check_invariants()


def test_abort_in_every_state_frees_blocks():
    core, runner = make_core(num_blocks=8, budget=4, max_seqs=2)
    for i in range(4):
        core.add_request(req(i, 10, 5))
    core.step()                                   # "0" prefilling (chunk), others waiting
    assert core.kv_manager.num_held_blocks > 0
    core.abort_requests(["0", "3"])
    core.step()
    assert "0" in runner.steps[-1].finished_request_ids
    core.abort_requests(["1", "2"])
    assert not core.has_unfinished_requests()
    core.check_invariants()
    assert core.kv_manager.pool.num_free_blocks == 8


def test_stop_token_and_eos_and_min_tokens():
    core, runner = make_core()
    r = Request("e", [5, 6], SamplingParams(max_tokens=50, min_tokens=0), 50, frozenset(), 1.0)
    core.add_request(r)
    # make the fake model's first sampled token count as EOS
    first = (sum([5, 6]) * 31 + 2) % 1000
    r.eos_token_ids = frozenset([first])
    run_all(core)
    assert r.output_token_ids == [first] and r.finish_reason == FinishReason.STOP
    r2 = Request("m", [5, 6], SamplingParams(max_tokens=50, min_tokens=3), 50, frozenset([first]), 1.0)
    core.add_request(r2)
    run_all(core)
    assert len(r2.output_token_ids) >= 3
    core.check_invariants()


@settings(max_examples=150, deadline=None)
@given(
    lens=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12), st.integers(0, 6)),
                  min_size=1, max_size=12),
    shared=st.booleans(),
    budget=st.integers(1, 48), max_seqs=st.integers(1, 6), block_size=st.sampled_from([1, 2, 4, 8]),
    spare_blocks=st.integers(0, 20), chunked=st.booleans(),
    batching=st.sampled_from(["continuous", "static", "dynamic"]),
    kv_allocation=st.sampled_from(["paged", "reservation"]),
    preemption=st.sampled_from(["recompute", "swap", "auto"]), prefix_caching=st.booleans())
def test_property_random_workloads_finish_within_limits(lens, budget, max_seqs, block_size,
                                                        spare_blocks, chunked, batching,
                                                        kv_allocation, preemption, prefix_caching,
                                                        shared):
    worst = max(p + m for p, m, _ in lens)
    num_blocks = -(-worst // block_size) + spare_blocks
    core, runner = make_core(num_blocks, block_size, budget, max_seqs, worst, chunked, batching,
                             kv_allocation, preemption if batching == "continuous" else "recompute",
                             prefix_caching and batching == "continuous")
    pending = sorted(((arr, i, p, m) for i, (p, m, arr) in enumerate(lens)), key=lambda x: x[0])
    outs, step, refused = {}, 0, set()
    while pending or core.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, i, p, m = pending.pop(0)
            r = req(i, p, m)
            if not shared:      # distinct prompts; shared ones exercise prefix-cache hits
                r.prompt_token_ids = [t + 1000 * i for t in r.prompt_token_ids]
            if not chunked and batching == "continuous" and p > budget:
                with pytest.raises(InvalidRequestError, match="--no-chunked-prefill"):
                    core.add_request(r)      # it could never be prefilled in one step
                refused.add(i)
                continue
            core.add_request(r)
        for o in core.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
        sched = core.scheduler
        assert sched.last_stats.num_scheduled_tokens <= sched.token_budget()
        assert len(sched.running) <= max_seqs and len(sched.slot_of) <= max_seqs
        if batching == "continuous":
            assert sched.token_budget() == budget
        step += 1
        assert step < 20_000, "scheduler made no progress"
    assert {int(k) for k in outs} == set(range(len(lens))) - refused
    for i, (p, m, _) in enumerate(lens):
        assert i in refused or len(outs[str(i)]) == m
    core.check_invariants()
    assert core.kv_manager.pool.num_free_blocks == num_blocks


def _req_t(rid, prompt_len, max_tokens, arrival, priority=0, tenant=""):
    return Request(str(rid), list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens),
                   max_tokens, frozenset(), arrival_time=arrival, priority=priority, tenant=tenant)


def test_waiting_queue_orders_by_priority_then_arrival():
    core, runner = make_core(max_seqs=1, budget=64)
    core.add_request(_req_t("late-low", 4, 1, 3.0, priority=5))
    core.add_request(_req_t("early-low", 4, 1, 1.0, priority=5))
    core.add_request(_req_t("high", 4, 1, 2.0, priority=0))
    run_all(core)
    order = [next(iter(s.new_requests)).request_id for s in runner.steps if s.new_requests]
    assert order == ["high", "early-low", "late-low"]


def test_high_priority_arrival_preempts_a_low_priority_running_request():
    core, runner = make_core(max_seqs=2, budget=64)
    low_b = _req_t("low-b", 4, 20, 2.0, priority=5)
    core.add_request(_req_t("low-a", 4, 20, 1.0, priority=5))
    core.add_request(low_b)
    core.step()
    core.step()
    urgent = _req_t("urgent", 4, 3, 3.0, priority=0)
    core.add_request(urgent)
    core.step()
    last = runner.steps[-1]
    assert last.preempted_request_ids == {"low-b"}            # lowest priority, newest
    assert "urgent" in last.num_scheduled_tokens
    assert "low-b" not in last.num_scheduled_tokens
    run_all(core)
    assert len(low_b.output_token_ids) == 20 and len(urgent.output_token_ids) == 3
    assert low_b.num_preemptions == 1
    assert core.scheduler.requests == {}
    core.check_invariants()


def test_equal_priority_never_preempts_for_admission():
    core, runner = make_core(max_seqs=1, budget=64)
    core.add_request(_req_t("a", 4, 5, 1.0))
    core.step()
    core.add_request(_req_t("b", 4, 5, 2.0))
    run_all(core)
    assert all(not s.preempted_request_ids for s in runner.steps)


def _admission_order(fair):
    runner = FakeRunner(4)
    cfg = SchedulerConfig(16, 2, True, "continuous", None, fair, {"B": 1.0, "A": 1.0})
    core = EngineCore(runner, cfg, 256, 4, 512)
    for i in range(20):
        core.add_request(_req_t(f"A{i}", 8, 4, 1.0 + i * 0.01, tenant="A"))
    for i in range(2):
        core.add_request(_req_t(f"B{i}", 8, 4, 2.0 + i * 0.01, tenant="B"))
    run_all(core)
    core.check_invariants()
    return [n.request_id for s in runner.steps for n in s.new_requests]


def test_fair_scheduling_serves_a_light_tenant_ahead_of_a_heavy_backlog():
    fcfs = _admission_order(False)
    fair = _admission_order(True)
    assert fcfs.index("B0") == 20                              # behind all of A's backlog
    assert fair.index("B0") <= 3 and fair.index("B1") <= 6     # interleaved by fair share
    assert set(fair) == set(fcfs)          # preempted requests come back (may repeat)


@pytest.mark.parametrize("fair", [False, True])
def test_fair_scheduling_takes_a_slot_from_a_tenant_above_its_share(fair):
    runner = FakeRunner(4)
    cfg = SchedulerConfig(64, 4, True, "continuous", None, fair)
    core = EngineCore(runner, cfg, 256, 4, 512)
    for i in range(6):
        core.add_request(_req_t(f"A{i}", 4, 30, 1.0 + i, tenant="A"))
    core.step()
    core.step()
    core.add_request(_req_t("B0", 4, 3, 10.0, tenant="B"))
    core.step()
    last = runner.steps[-1]
    if fair:
        assert last.preempted_request_ids == {"A3"}            # A's newest of its 4 slots
        assert "B0" in last.num_scheduled_tokens
    else:
        assert not last.preempted_request_ids and "B0" not in last.num_scheduled_tokens
    run_all(core)
    core.check_invariants()
    # with 2 tenants and 4 slots, B below its share of 2 never preempts beyond it
    assert sum(len(s.preempted_request_ids) for s in runner.steps) == (1 if fair else 0)
