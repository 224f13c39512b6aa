"""Nothing can wait at the queue head forever: a request that could never be scheduled is refused
at entry, and one that grew past the budget while preempted is still scheduled (fake runner)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from conveyor.config import SchedulerConfig
from conveyor.core.engine_core import EngineCore
from conveyor.core.request import Request
from conveyor.errors import CapacityError, InvalidRequestError
from conveyor.sampling_params import SamplingParams

from kv_checking_runner import KVCheckingRunner


def make_core(budget=8, num_blocks=64, block_size=4, max_seqs=4, chunked=False,
              batching="continuous", max_len=256):
    runner = KVCheckingRunner(block_size)
    cfg = SchedulerConfig(budget, max_seqs, chunked, batching, 0.0)
    return EngineCore(runner, cfg, num_blocks, block_size, max_len), runner


def req(rid, prompt_len, max_tokens, base=0, arrival=1.0):
    return Request(str(rid), [base + 1 + i for i in range(prompt_len)],
                   SamplingParams(max_tokens=max_tokens, ignore_eos=True), max_tokens, frozenset(),
                   arrival_time=arrival)


def run_all(core, max_steps=2_000):
    for _ in range(max_steps):
        if not core.has_unfinished_requests():
            return
        core.step()
    raise AssertionError("the queue head never got scheduled")


def test_a_prompt_longer_than_the_budget_without_chunking_is_refused_at_entry():
    core, runner = make_core(budget=8)
    with pytest.raises(InvalidRequestError, match="--max-num-batched-tokens") as err:
        core.add_request(req("long", 9, 2))
    assert "--no-chunked-prefill" in str(err.value) and err.value.param == "prompt"
    with pytest.raises(InvalidRequestError, match="--no-chunked-prefill"):
        core.check_request_fits(9, 1)
    core.add_request(req("fits", 8, 2))        # exactly the budget: one step
    core.add_request(req("short", 3, 2, base=50))
    run_all(core)
    assert runner.steps[0].num_scheduled_tokens == {"fits": 8}
    core.check_invariants()
    assert runner.held == set()


@pytest.mark.parametrize("batching,chunked", [("continuous", True), ("static", False),
                                               ("dynamic", False)])
def test_chunked_prefill_and_the_baselines_take_a_prompt_longer_than_the_budget(batching,
                                                                                chunked):
    core, runner = make_core(budget=8, chunked=chunked, batching=batching)
    core.add_request(req("long", 30, 2))       # a batch prefills whole prompts, padded
    run_all(core)
    core.check_invariants()
    assert runner.held == set()


def test_a_request_that_can_never_fit_the_kv_pool_is_refused_not_queued():
    core, _ = make_core(budget=64, num_blocks=4, block_size=4)
    with pytest.raises(CapacityError, match="KV blocks"):
        core.add_request(req("big", 10, 10))   # 20 tokens = 5 blocks > 4
    with pytest.raises(CapacityError):
        core.check_request_fits(10, 10)
    assert not core.has_unfinished_requests()


def test_a_preempted_request_that_grew_past_the_budget_resumes_in_chunks():
    # Prompt 6 fits the 8-token budget whole; after 6 outputs a preempted request must recompute
    # 12 tokens, more than any step's budget. Before: it waited at the queue head forever.
    core, runner = make_core(budget=8, num_blocks=7, block_size=4, max_seqs=2, max_len=20)
    reqs = [req("a", 6, 14), req("b", 6, 14, base=100, arrival=2.0)]
    for r in reqs:
        core.add_request(r)
    run_all(core)
    assert sum(r.num_preemptions for r in reqs) > 0
    resumed = [n for s in runner.steps for n in s.new_requests if n.output_token_ids]
    assert any(len(n.prompt_token_ids) + len(n.output_token_ids) > 8 for n in resumed)
    assert all(len(r.output_token_ids) == 14 for r in reqs)
    for s in runner.steps:
        assert s.total_num_scheduled_tokens <= 8
    core.check_invariants()
    assert core.kv_manager.pool.num_free_blocks == 7 and runner.held == set()


def test_the_http_edge_answers_400_naming_the_flag(tiny_llama_dir):
    from conveyor.engine.llm_engine import LLMEngine
    from conveyor.server.app import ServerConfig, build_app
    engine = LLMEngine.from_kwargs(model=tiny_llama_dir, dtype="float32", max_num_seqs=2,
                                   max_num_batched_tokens=16, enable_chunked_prefill=False,
                                   num_blocks=32, max_model_len=256)
    app = build_app(ServerConfig(), lambda: engine)

    async def scenario():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                for _ in range(200):
                    if (await client.get("/health")).status_code == 200:
                        break
                    await asyncio.sleep(0.05)
                body = {"max_tokens": 2}
                long = await asyncio.wait_for(   # before: queued, and waited forever
                    client.post("/v1/completions", json=body | {"prompt": [5] * 17}), 120)
                ok = await client.post("/v1/completions", json=body | {"prompt": [5] * 16})
                return long, ok

    long, ok = asyncio.run(scenario())
    assert long.status_code == 400, long.text
    error = long.json()["error"]
    assert "--max-num-batched-tokens" in error["message"] and "--no-chunked-prefill" in error["message"]
    assert ok.status_code == 200, ok.text
    engine.check_invariants()
    assert engine.core.kv_manager.pool.num_free_blocks == 32
