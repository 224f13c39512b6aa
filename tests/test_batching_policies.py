"""Admission rules of the three batching policies and the two KV allocation modes (fake runner)."""

from __future__ import annotations

from conveyor.config import SchedulerConfig
from conveyor.core.engine_core import EngineCore

from fake_runner import FakeRunner
from test_scheduler import req, run_all


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def make(batching, max_seqs=3, timeout=None, num_blocks=256, block_size=4, kv_allocation="paged",
         budget=64, clock=None):
    runner = FakeRunner(block_size)
    cfg = SchedulerConfig(budget, max_seqs, True, batching, timeout)
    core = EngineCore(runner, cfg, num_blocks, block_size, 512, clock=clock or Clock(),
                      kv_allocation=kv_allocation, record_steps=True)
    return core, runner


def test_static_never_admits_mid_batch_and_pays_for_stragglers():
    core, runner = make("static", max_seqs=3, timeout=0.0)
    core.add_request(req("a", 4, 1, arrival=100.0))
    core.add_request(req("b", 2, 5, arrival=100.0))
    core.add_request(req("c", 3, 2, arrival=100.0))
    core.add_request(req("late", 3, 2, arrival=100.0))
    outs = run_all(core)
    steps = runner.steps
    first = steps[0]
    assert set(first.num_scheduled_tokens) == {"a", "b", "c"}
    assert first.padding_seq_lens == [2, 1]                 # b and c padded to a's 4 tokens
    batch_steps = [s for s in steps if "b" in s.num_scheduled_tokens]
    for s in batch_steps:
        assert "late" not in s.num_scheduled_tokens         # nobody joins mid-batch
    late_first = next(i for i, s in enumerate(steps) if "late" in s.num_scheduled_tokens)
    assert late_first > max(i for i, s in enumerate(steps) if "b" in s.num_scheduled_tokens)
    # after a finishes (1 token) and c (2 tokens), their slots keep computing padding
    assert steps[1].padding_seq_lens == [1]                 # a finished at step 0
    assert steps[2].padding_seq_lens == [1, 1]              # a and c
    log = core.step_log
    assert set(log[2].slot_of) == {"a", "b", "c"} and log[2].useful_request_ids == ["b"]
    assert len(outs["b"]) == 5
    core.check_invariants()
    assert core.kv_manager.pool.num_free_blocks == 256


def test_static_waits_for_full_batch_until_timeout():
    clock = Clock()
    core, runner = make("static", max_seqs=3, timeout=5.0, clock=clock)
    core.add_request(req("a", 4, 2, arrival=100.0))
    assert core.step() == [] and not runner.steps          # 1 of 3: wait
    clock.t = 104.9
    assert core.step() == []
    clock.t = 105.0
    core.step()
    assert set(runner.steps[0].num_scheduled_tokens) == {"a"}


def test_dynamic_launches_after_window_with_fixed_membership():
    clock = Clock()
    core, runner = make("dynamic", max_seqs=4, timeout=0.05, clock=clock)
    core.add_request(req("a", 4, 3, arrival=100.0))
    core.add_request(req("b", 4, 1, arrival=100.0))
    clock.t = 100.06
    core.step()
    assert set(runner.steps[0].num_scheduled_tokens) == {"a", "b"}
    core.add_request(req("c", 4, 1, arrival=100.06))
    clock.t = 101.0
    core.step()
    assert "c" not in runner.steps[1].num_scheduled_tokens  # slot free, but membership is fixed
    run_all(core)
    core.check_invariants()


def test_continuous_admits_on_the_step_after_a_slot_frees():
    core, runner = make("continuous", max_seqs=2)
    core.add_request(req("a", 4, 1, arrival=100.0))
    core.add_request(req("b", 4, 4, arrival=100.0))
    core.add_request(req("c", 4, 2, arrival=100.0))
    core.step()
    assert set(runner.steps[0].num_scheduled_tokens) == {"a", "b"}
    core.step()
    assert "c" in runner.steps[1].num_scheduled_tokens
    assert core.step_log[1].slot_of["c"] == core.step_log[0].slot_of["a"]   # c took a's slot
    assert all(not s.padding_seq_lens for s in runner.steps)
    run_all(core)
    core.check_invariants()


def test_reservation_reserves_prompt_plus_max_tokens_and_admits_fewer():
    def peak_running(kv_allocation):
        core, runner = make("continuous", max_seqs=8, num_blocks=16, block_size=4,
                            kv_allocation=kv_allocation)
        for i in range(8):
            core.add_request(req(i, 4, 12, arrival=100.0))   # worst case 16 tokens = 4 blocks
        run_all(core)
        core.check_invariants()
        return max(s.num_running for s in core.step_log)

    assert peak_running("reservation") == 4                  # 16 blocks / 4 per request
    assert peak_running("paged") > 4
