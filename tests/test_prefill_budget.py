"""The time-based prefill budget (--target-itl-ms) and partial prefills, on a fake clock with a
fake runner whose step cost is known (tests/timed_fake_runner.py): the fit converges to the
fake's coefficients, the budget follows the target, decodes are never starved, prompts always
progress, and the partial-prefill caps hold under priorities and fair scheduling."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings, strategies as st

from conveyor.config import SchedulerConfig
from conveyor.core.engine_core import EngineCore
from conveyor.core.prefill_budget import MIN_PREFILL_TOKENS
from conveyor.core.request import Request
from conveyor.core.step_cost import StepCostModel, StepFeatures
from conveyor.errors import ConfigError
from conveyor.sampling_params import SamplingParams

from fake_runner import fake_token
from timed_fake_runner import FakeClock, StepCost, TimedFakeRunner

COST = StepCost()
BLOCK = 16


def make_core(target_ms=None, budget=2048, max_seqs=32, partial=1, long_partial=1, threshold=0,
              fair=False, num_blocks=4096, cost=COST):
    clock = FakeClock()
    runner = TimedFakeRunner(BLOCK, clock, cost)
    cfg = SchedulerConfig(budget, max_seqs, True, "continuous", None, fair, {},
                          target_itl_ms=target_ms, max_num_partial_prefills=partial,
                          max_long_partial_prefills=long_partial,
                          long_prefill_token_threshold=threshold)
    core = EngineCore(runner, cfg, num_blocks, BLOCK, 8192, clock=clock, record_steps=True)
    return core, runner, clock


def req(rid, prompt_len, max_tokens, arrival, tenant="", priority=0):
    return Request(str(rid), [(7 * i + len(str(rid))) % 900 + 1 for i in range(prompt_len)],
                   SamplingParams(max_tokens=max_tokens, ignore_eos=True), max_tokens, frozenset(),
                   arrival_time=arrival, priority=priority, tenant=tenant)


def burst(num_long=8, num_short=8, long_len=1600, short_len=40, out=24, **kw):
    """Long documents and short chats arriving together, interleaved."""
    reqs = []
    for i in range(max(num_long, num_short)):
        if i < num_long:
            reqs.append(req(f"L{i}", long_len, out, 1.0 + i / 100, **kw))
        if i < num_short:
            reqs.append(req(f"S{i}", short_len, out, 1.005 + i / 100, **kw))
    return reqs


def expected_output(r: Request) -> list[int]:
    tokens = list(r.prompt_token_ids)
    for _ in range(r.max_tokens):
        tokens.append(fake_token(tokens, 1000))
    return tokens[r.num_prompt_tokens:]


class StepWatch:
    """Runs the engine step by step, checking what each step did against the state before it."""

    def __init__(self, core):
        self.core = core
        self.sched = core.scheduler
        self.violations: list[str] = []
        self.pool_had_room = True

    def run(self, max_steps=20_000):
        for _ in range(max_steps):
            if not self.core.has_unfinished_requests():
                return
            before = {r.request_id: (r.num_tokens - r.num_computed_tokens, r.num_output_tokens)
                      for r in self.sched.running}
            waiting = len(self.sched.waiting)
            free_slot = len(self.sched.running) < self.sched.config.max_num_seqs
            self.pool_had_room = self._pool_has_room()
            num_seen = len(self.core.executor.steps)
            self.core.step()
            # steps[num_seen] is this step; an idle notice of the finished ones may follow it
            if len(self.core.executor.steps) == num_seen:
                self.violations.append(f"step {self.core.num_steps} scheduled nothing")
                return
            self.check(self.core.executor.steps[num_seen], before, waiting, free_slot)
            self.core.check_invariants()
        raise AssertionError("the workload did not finish")

    def check(self, sched, before, waiting, free_slot):
        cfg = self.sched.config
        done = sched.num_scheduled_tokens
        for rid, (left, num_out) in before.items():
            if left == 1 and num_out > 0 and rid not in done and rid not in sched.preempted_request_ids:
                self.violations.append(f"decode {rid} starved")
        prefill_left = {rid: left for rid, (left, num_out) in before.items()
                        if left > 1 or num_out == 0}
        prefilled = sum(n for rid, n in done.items() if rid in prefill_left or rid not in before)
        if (prefill_left or waiting and free_slot) and not prefilled \
                and not sched.preempted_request_ids and self.pool_had_room:
            self.violations.append("no prompt advanced")
        partial = long_partial = 0
        for rid, n in done.items():
            left = prefill_left.get(rid) or self._left_when_new(sched, rid)
            if left is None or n >= left:
                continue
            partial += 1
            is_long = 0 < cfg.long_prefill_token_threshold < left
            long_partial += is_long
            if is_long and n > cfg.long_prefill_token_threshold and len(prefill_left) + waiting > 1:
                self.violations.append(f"long chunk {rid} of {n} over the threshold")
        if partial > cfg.max_num_partial_prefills or long_partial > cfg.max_long_partial_prefills:
            self.violations.append(f"{partial} partial / {long_partial} long prefills")

    def _pool_has_room(self):
        # Without room for a whole budget's chunk a prompt may rightly wait (the pool, not the
        # budget, holds it back: that is preemption's business).
        cfg = self.sched.config
        need = cfg.max_num_batched_tokens // BLOCK + cfg.max_num_seqs + 1
        return self.core.kv_manager.pool.num_free_blocks >= need

    def _left_when_new(self, sched, rid):
        new = next((r for r in sched.new_requests if r.request_id == rid), None)
        if new is None:
            return None
        return len(new.prompt_token_ids) + len(new.output_token_ids) - new.num_computed_tokens


def run_clean(core, reqs):
    for r in reqs:
        core.add_request(r)
    watch = StepWatch(core)
    watch.run()
    assert watch.violations == []
    for r in reqs:
        assert r.output_token_ids == expected_output(r), r.request_id
    core.check_invariants()
    assert core.kv_manager.pool.num_free_blocks == core.kv_manager.pool.num_blocks
    return watch


# ---------------------------------------------------------------------------- the fit
def test_the_fit_converges_to_the_fake_runners_coefficients():
    core, runner, _ = make_core(target_ms=40.0, partial=4, threshold=256)
    run_clean(core, burst())
    fitted = core.scheduler.prefill.model.coefficients
    for name in ("intercept", "per_token", "per_row", "per_context_token"):
        assert fitted[name] == pytest.approx(getattr(COST, name), rel=0.02), name
    model = core.scheduler.prefill.model
    assert model.last_measured_s == pytest.approx(runner.step_seconds[-1])
    assert model.last_predicted_s == pytest.approx(model.last_measured_s, rel=0.01)


def test_the_online_fit_recovers_random_coefficients_and_keeps_them_nonnegative():
    rng = random.Random(3)
    for _ in range(20):
        truth = [rng.uniform(0, 5e-3), rng.uniform(0, 1e-4), rng.choice([0.0, 1e-3]),
                 rng.uniform(0, 1e-7)]
        model = StepCostModel()
        for _ in range(60):
            chunks = [(rng.choice([1, 1, rng.randint(2, 900)]), rng.randint(0, 2000))
                      for _ in range(rng.randint(1, 8))]
            f = StepFeatures.of(chunks)
            model.observe(f, truth[0] + truth[1] * f.num_tokens + truth[2] * f.num_rows
                          + truth[3] * f.num_context_pairs)
        fitted = list(model.coefficients.values())
        assert all(c >= 0 for c in fitted)
        for c, t in zip(fitted, truth):
            assert c == pytest.approx(t, rel=1e-3, abs=1e-9)
        assert model.is_ready


def test_the_fit_follows_a_machine_that_slows_down():
    model = StepCostModel()
    rng = random.Random(0)
    for per_token in (50e-6, 100e-6):
        for _ in range(1500):          # 0.995 ** 1500: the old machine's weight is gone
            f = StepFeatures.of([(rng.randint(1, 512), rng.randint(0, 512))])
            model.observe(f, 1e-3 + per_token * f.num_tokens)
        assert model.coefficients["per_token"] == pytest.approx(per_token, rel=0.01)


# ---------------------------------------------------------------------------- the budget
@pytest.mark.parametrize("target_ms", [25.0, 60.0])
def test_the_budget_follows_the_target(target_ms):
    core, runner, _ = make_core(target_ms=target_ms)     # time is the only limit on a chunk
    run_clean(core, burst(num_long=16, num_short=16))
    # The first steps explore upwards (16, 32, 64, ... tokens) until the fit is ready.
    warm, seconds = core.step_log[12:], runner.step_seconds[12:]
    over = [s for s, t in zip(warm, seconds) if t > target_ms / 1000 * 1.02]
    # Only a step whose decodes alone (plus the progress floor) exceed the target may be late.
    assert all(s.num_prefill_tokens <= MIN_PREFILL_TOKENS for s in over)
    full = [t for s, t in zip(warm, seconds) if s.num_waiting and
            s.num_scheduled_tokens < 2048]
    assert full and min(full) >= 0.8 * target_ms / 1000    # and the budget is used, not wasted
    assert all(s.target_step_s == target_ms / 1000 for s in core.step_log)


def test_without_a_target_the_fixed_budget_is_unchanged_and_the_model_still_fits():
    core, runner, _ = make_core(target_ms=None)
    run_clean(core, burst(num_long=4, num_short=4))
    assert max(s.num_scheduled_tokens for s in core.step_log) == 2048
    assert core.scheduler.prefill.model.coefficients["per_token"] == pytest.approx(
        COST.per_token, rel=0.02)
    assert all(s.target_step_s is None for s in core.step_log)


def test_a_target_below_the_decode_cost_still_finishes_every_prompt():
    core, _, _ = make_core(target_ms=1.0, partial=2, threshold=64)
    reqs = burst(num_long=3, num_short=3, long_len=300, out=8)
    run_clean(core, reqs)       # StepWatch: decodes ran and a prompt advanced in every step
    assert all(r.first_token_time for r in reqs)


def test_a_tighter_target_trades_throughput_for_inter_token_latency():
    results = {}
    for target, partial, threshold in ((None, 1, 0), (30.0, 4, 256)):
        core, runner, clock = make_core(target, partial=partial, threshold=threshold)
        run_clean(core, burst())
        gaps = sorted(runner.step_seconds)
        results[target] = (gaps[int(len(gaps) * 0.99) - 1], clock.now)
    assert results[30.0][0] <= 0.030 * 1.05 < results[None][0]
    assert results[30.0][1] <= results[None][1] * 1.5        # the work still gets done


# ---------------------------------------------------------------------------- partial prefills
def test_short_prompts_share_the_step_with_a_long_one():
    core, runner, _ = make_core(target_ms=None, budget=512, partial=4, threshold=128)
    reqs = [req("L", 2000, 4, 1.0)] + [req(f"S{i}", 30, 4, 1.1 + i) for i in range(6)]
    run_clean(core, reqs)
    first = runner.steps[0].num_scheduled_tokens
    assert first["L"] == 128 and all(first[f"S{i}"] == 30 for i in range(6))


def test_one_partial_prefill_by_default_keeps_the_old_schedule():
    core, runner, _ = make_core(target_ms=None, budget=512)
    reqs = [req("L", 2000, 4, 1.0)] + [req(f"S{i}", 30, 4, 1.1 + i) for i in range(2)]
    run_clean(core, reqs)
    assert runner.steps[0].num_scheduled_tokens == {"L": 512}


def test_config_rejects_a_target_it_cannot_honour():
    with pytest.raises(ConfigError, match="target_itl_ms"):
        SchedulerConfig(enable_chunked_prefill=False, target_itl_ms=50.0)
    with pytest.raises(ConfigError, match="target_itl_ms"):
        SchedulerConfig(target_itl_ms=0.0)
    with pytest.raises(ConfigError, match="max_long_partial_prefills"):
        SchedulerConfig(max_num_partial_prefills=2, max_long_partial_prefills=3)


# ---------------------------------------------------------------------------- property
mixes = st.lists(st.tuples(st.integers(1, 700), st.integers(1, 12), st.integers(0, 2),
                           st.sampled_from("AB")), min_size=1, max_size=14)


@settings(max_examples=60, deadline=None)
@given(mix=mixes, target=st.sampled_from([None, 2.0, 10.0, 40.0]), partial=st.integers(1, 3),
       long_partial=st.integers(1, 3), threshold=st.sampled_from([0, 32, 200]),
       fair=st.booleans(), max_seqs=st.integers(1, 6), budget=st.sampled_from([32, 256]),
       num_blocks=st.sampled_from([60, 400]))
def test_property_every_mix_finishes_with_caps_held_and_nobody_starved(
        mix, target, partial, long_partial, threshold, fair, max_seqs, budget, num_blocks):
    long_partial = min(long_partial, partial)
    core, _, _ = make_core(target, budget, max_seqs, partial, long_partial, threshold, fair,
                           num_blocks)
    reqs = [req(i, p, o, 1.0 + i / 10, tenant, priority)
            for i, (p, o, priority, tenant) in enumerate(mix)]
    fits = [r for r in reqs if core.kv_manager.num_blocks_for(r.num_prompt_tokens + r.max_tokens)
            <= num_blocks]
    run_clean(core, fits)


# ---------------------------------------------------------------------------- observable
def test_metrics_show_the_fit_the_prediction_and_the_budget():
    import re

    from conveyor.metrics.prometheus import ServingMetrics
    from conveyor.core.stats import EngineStats as EngineSnapshot
    core, runner, _ = make_core(target_ms=40.0)
    run_clean(core, burst(num_long=2, num_short=2))
    snap = EngineSnapshot(step_cost=core.scheduler.prefill.snapshot())
    text = ServingMetrics(lambda: snap).render().decode()

    def gauge(name, labels=""):
        m = re.search(rf"^conveyor:{re.escape(name + labels)} (\S+)$", text, re.M)
        assert m, name
        return float(m.group(1))
    assert gauge("step_time_target_seconds") == 0.04
    assert gauge("step_time_measured_seconds") == pytest.approx(runner.step_seconds[-1])
    assert gauge("step_time_predicted_seconds") == pytest.approx(runner.step_seconds[-1], rel=0.02)
    assert gauge("step_cost_coefficient_seconds", '{term="per_token"}') == pytest.approx(
        COST.per_token, rel=0.02)
    assert gauge("step_cost_fitted_steps") == len(runner.step_seconds)
    assert gauge("step_cost_model_ready") == 1
    assert gauge("prefill_budget_tokens") == core.step_log[-1].prefill_budget_tokens > 0
    assert all(s.predicted_step_s > 0 for s in core.step_log[1:])


def test_the_flags_reach_the_scheduler_config():
    import argparse

    from conveyor.cli.args import add_engine_args, engine_kwargs
    from conveyor.config import engine_config_from_kwargs
    p = argparse.ArgumentParser()
    add_engine_args(p)
    args = p.parse_args(["--target-itl-ms", "80", "--max-num-partial-prefills", "4",
                         "--max-long-partial-prefills", "2", "--long-prefill-token-threshold",
                         "256"])
    cfg = engine_config_from_kwargs(**engine_kwargs(args)).scheduler
    assert (cfg.target_itl_ms, cfg.max_num_partial_prefills, cfg.max_long_partial_prefills,
            cfg.long_prefill_token_threshold) == (80.0, 4, 2, 256)
    bad = p.parse_args(["--target-itl-ms", "80", "--no-chunked-prefill"])
    with pytest.raises(ConfigError, match="chunked prefill"):
        engine_config_from_kwargs(**engine_kwargs(bad))
