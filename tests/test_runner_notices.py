"""The runner is told of every finished request it ever saw, whatever state it finished in, so its
per-request state and seeded generators never leak (fake runner, then the real one)."""

from __future__ import annotations

import pytest

from conveyor.config import SchedulerConfig
from conveyor.core.engine_core import EngineCore
from conveyor.core.request import Request, RequestStatus
from conveyor.core.swap import PreemptionCosts, SwapManager
from conveyor.sampling_params import SamplingParams

from kv_checking_runner import KVCheckingRunner


def req(rid, prompt_len, max_tokens, base=0, arrival=1.0):
    return Request(str(rid), [base + 1 + i for i in range(prompt_len)],
                   SamplingParams(max_tokens=max_tokens, seed=7, temperature=1.0, ignore_eos=True),
                   max_tokens, frozenset(), arrival_time=arrival)


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_aborting_a_preempted_request_tells_the_runner(preemption):
    runner = KVCheckingRunner(4)
    swap = None if preemption == "recompute" else SwapManager(8, "swap", PreemptionCosts(1, 1e-9))
    core = EngineCore(runner, SchedulerConfig(64, 3, True, "continuous", 0.0), 6, 4, 24, swap=swap)
    reqs = [req(i, 4, 8, base=100 * i, arrival=1.0 + i) for i in range(3)]
    for r in reqs:
        core.add_request(r)
    while not any(r.status == RequestStatus.PREEMPTED for r in reqs):
        core.step()
    victim = next(r for r in reqs if r.status == RequestStatus.PREEMPTED)
    assert victim.request_id in runner.held             # it keeps a generator while preempted
    core.abort_requests([victim.request_id])
    core.step()
    assert victim.request_id not in runner.held
    others = [r.request_id for r in reqs if r is not victim]
    core.abort_requests(others)                         # the last aborts leave the engine idle
    assert runner.held == set() and not core.has_unfinished_requests()
    core.check_invariants()


def test_the_last_finish_before_going_idle_reaches_the_runner_without_another_step():
    runner = KVCheckingRunner(4)
    core = EngineCore(runner, SchedulerConfig(64, 2, True, "continuous", 0.0), 16, 4, 64)
    core.add_request(req("a", 4, 2))
    while core.has_unfinished_requests():
        core.step()
    assert runner.held == set()


def test_real_runner_drops_the_generator_of_a_request_aborted_while_preempted(tiny_llama_dir):
    from conveyor.engine.llm_engine import LLMEngine
    engine = LLMEngine.from_kwargs(model=tiny_llama_dir, dtype="float32", max_num_seqs=4,
                                   max_num_batched_tokens=64, num_blocks=6, block_size=8,
                                   max_model_len=48, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=3, ignore_eos=True)
    ids = [engine.add_request([10 + i] * 8, params) for i in range(4)]
    sched = engine.core.scheduler
    for _ in range(200):
        preempted = [rid for rid in ids
                     if rid in sched.requests and sched.requests[rid].status == RequestStatus.PREEMPTED]
        if preempted:
            break
        engine.step()
    assert preempted and preempted[0] in engine.runner.generators
    engine.abort_request(preempted[0])
    engine.step()
    assert preempted[0] not in engine.runner.generators
    for rid in ids:
        engine.abort_request(rid)
    assert engine.runner.generators == {} and engine.runner.states == {}
    engine.check_invariants()
