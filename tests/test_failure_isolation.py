"""Whatever belongs to one request fails that request alone: a non-finite logit row, a seed the
generator refuses, a sampler or detokenizer/stop-string error. It finishes with "error" and an
error message, its blocks are freed (and never kept in the prefix cache), and every other request
goes on token-identically to a run without it; the engine keeps running."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch

import conveyor.runner.model_runner as model_runner_module
import conveyor.sampling.metadata as metadata_module
from conveyor.attention import cpu_kernel
from conftest import run_engine
from conveyor.sampling_params import SamplingParams
from conveyor.engine.llm_engine import LLMEngine
from conveyor.server.app import ServerConfig, build_app
from conveyor.tokenizer import IncrementalDetokenizer

PROMPT_A = [(7 * j) % 40000 + 20 for j in range(12)]        # one full block of 8 + 4
PROMPT_B = [(11 * j) % 40000 + 30 for j in range(9)]


def bad_prompt(seed: int) -> list[int]:
    """40 tokens, prefilled over 3 steps of 16; a new prompt per test (no cache hits)."""
    return [(13 * j + 101 * seed) % 40000 + 40 for j in range(40)]


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    """One engine for the module: every test leaves it clean (``assert_clean``)."""
    return LLMEngine.from_kwargs(model=tiny_llama_dir, dtype="float32", max_num_seqs=4,
                                 max_num_batched_tokens=16, num_blocks=64, block_size=8)


def good_requests(engine) -> dict[str, str]:
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True,
                            logprobs=2)
    return {"a": engine.add_request(PROMPT_A, greedy), "b": engine.add_request(PROMPT_B, seeded)}


def tokens_of(finals, ids: dict[str, str]) -> dict[str, list[int]]:
    return {k: finals[rid].outputs[0].token_ids for k, rid in ids.items()}


@pytest.fixture(scope="module")
def baseline(engine):
    """The good requests' tokens in a run without the bad one."""
    ids = good_requests(engine)
    finals = run_engine(engine)
    assert all(finals[r].outputs[0].finish_reason == "length" for r in ids.values())
    return tokens_of(finals, ids)


def assert_clean(engine) -> None:
    engine.check_invariants()
    assert engine.core.kv_manager.pool.num_free_blocks == engine.num_kv_blocks
    assert not engine.has_unfinished_requests() and not engine.output_processor.parents


def poison_logits(monkeypatch, engine, bad_ids: set[str], from_sample: int = 0) -> None:
    """NaN in the logits row of every request in ``bad_ids`` (from its ``from_sample``-th
    sampling step on), as broken weights or a NaN in the KV cache would give."""
    batch_ids: list[list[str]] = []
    samples: dict[str, int] = {}
    original_build, original_logits = model_runner_module.build_flat_batch, \
        engine.model.compute_logits

    def build(*args, **kw):
        batch = original_build(*args, **kw)
        batch_ids.append(batch.sample_request_ids)
        return batch

    def compute_logits(hidden):
        logits = original_logits(hidden)                      # [N + P, V]
        for row, rid in enumerate(batch_ids[-1]):
            samples[rid] = samples.get(rid, -1) + 1
            if rid in bad_ids and samples[rid] >= from_sample:
                logits[row, 123] = float("nan")
        return logits

    monkeypatch.setattr(model_runner_module, "build_flat_batch", build)
    monkeypatch.setattr(engine.model, "compute_logits", compute_logits)


@pytest.mark.parametrize("from_sample", [0, 3])
def test_nan_row_fails_its_request_alone_and_its_blocks_are_never_cached(
        engine, baseline, monkeypatch, from_sample):
    ids = good_requests(engine)
    bad = engine.add_request(bad_prompt(from_sample), SamplingParams(temperature=0, max_tokens=10,
                                                        ignore_eos=True))
    poison_logits(monkeypatch, engine, {bad}, from_sample)
    finals = run_engine(engine)
    out = finals[bad]
    assert out.outputs[0].finish_reason == "error" and "non-finite" in out.error
    assert len(out.outputs[0].token_ids) == from_sample
    assert tokens_of(finals, ids) == baseline
    assert all(finals[r].error is None for r in ids.values())
    assert_clean(engine)
    monkeypatch.undo()
    # The bad request's blocks (cached while it prefilled, 4 full ones) were dropped from the
    # cache; the good ones' were kept.
    again = run_engine_for(engine, bad_prompt(from_sample))
    control = run_engine_for(engine, PROMPT_A)
    assert again.num_cached_tokens == 0 and again.outputs[0].finish_reason == "length"
    assert control.num_cached_tokens == 8
    assert_clean(engine)


def run_engine_for(engine, prompt):
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    return run_engine(engine)[rid]


def test_one_failing_child_fails_its_whole_request_now(engine, monkeypatch):
    other = engine.add_request(PROMPT_A, SamplingParams(temperature=0, max_tokens=6,
                                                        ignore_eos=True))
    parent = engine.add_request(PROMPT_B, SamplingParams(n=3, seed=1, max_tokens=20,
                                                         ignore_eos=True))
    poison_logits(monkeypatch, engine, {f"{parent}#1"}, from_sample=2)
    finals = run_engine(engine)
    out = finals[parent]
    assert [c.finish_reason for c in out.outputs] == ["error"] * 3 and "non-finite" in out.error
    # child 1 got no token in its third step; its siblings stopped in that same step
    lengths = [len(c.token_ids) for c in out.outputs]
    assert lengths[1] == 2 and all(2 <= n <= 3 for n in lengths), lengths
    assert finals[other].outputs[0].finish_reason == "length"
    assert_clean(engine)


def test_seed_that_slipped_past_validation_fails_its_request_alone(engine, baseline):
    ids = good_requests(engine)
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=4)
    object.__setattr__(params, "seed", 2**64)          # what the old validation let through
    bad = engine.add_request(bad_prompt(10), params)
    finals = run_engine(engine)
    assert finals[bad].outputs[0].finish_reason == "error" and "seed" in finals[bad].error
    assert tokens_of(finals, ids) == baseline
    assert_clean(engine)


def test_sampler_error_in_one_row_fails_that_row_alone(engine, baseline, monkeypatch):
    original = metadata_module._banned_ids

    def banned_ids(p, output, eos, vocab):
        if p.min_tokens == 3:                          # the marked request's row
            raise ValueError("simulated per-row sampling bug")
        return original(p, output, eos, vocab)
    monkeypatch.setattr(metadata_module, "_banned_ids", banned_ids)
    ids = good_requests(engine)
    bad = engine.add_request(PROMPT_B, SamplingParams(seed=5, min_tokens=3, max_tokens=8))
    finals = run_engine(engine)
    assert finals[bad].outputs[0].finish_reason == "error"
    assert "simulated per-row sampling bug" in finals[bad].error
    assert tokens_of(finals, ids) == baseline              # the seeded row too
    assert_clean(engine)


def boom_on_stop_check(monkeypatch) -> None:
    """Detokenizing raises for requests whose stop strings include "BOOM" (from their second
    token on)."""
    original = IncrementalDetokenizer.add_tokens

    def add_tokens(self, new_token_ids):
        if "BOOM" in self.stop and self.output_text + self._pending:
            raise RuntimeError("simulated stop-string bug")
        return original(self, new_token_ids)
    monkeypatch.setattr(IncrementalDetokenizer, "add_tokens", add_tokens)


def test_output_processing_error_fails_its_request_alone(engine, baseline, monkeypatch):
    boom_on_stop_check(monkeypatch)
    ids = good_requests(engine)
    bad = engine.add_request(bad_prompt(11), SamplingParams(temperature=0, max_tokens=8,
                                                        stop=["BOOM"]))
    finals = run_engine(engine)
    assert finals[bad].outputs[0].finish_reason == "error"
    assert "simulated stop-string bug" in finals[bad].error
    assert tokens_of(finals, ids) == baseline
    assert_clean(engine)


def test_a_failing_request_over_http_gets_an_error_and_the_server_goes_on(engine, monkeypatch):
    boom_on_stop_check(monkeypatch)
    bad = {"prompt": bad_prompt(12), "max_tokens": 8, "stop": ["BOOM"]}
    good = {"prompt": PROMPT_A, "max_tokens": 12, "ignore_eos": True}

    async def scenario(client):
        while (await client.get("/health")).status_code != 200:
            await asyncio.sleep(0.02)
        results = await asyncio.gather(
            client.post("/v1/completions", json=bad),
            client.post("/v1/completions", json={**bad, "stream": True}),
            client.post("/v1/completions", json=good))
        return (*results, await client.get("/health"),
                await client.post("/v1/completions", json={**good, "max_tokens": 2}))

    async def serve():
        app = build_app(ServerConfig(), lambda: engine)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                return await scenario(client)

    plain, streamed, ok, health, after = asyncio.run(serve())
    assert plain.status_code == 500 and "simulated stop-string bug" in plain.json()["error"]["message"]
    events = [e for e in streamed.text.split("\n\n") if e]
    assert streamed.status_code == 200 and events[-1] == "data: [DONE]"
    assert "simulated stop-string bug" in json.loads(events[-2][6:])["error"]["message"]
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
    assert ok.json()["usage"]["completion_tokens"] == 12
    assert health.status_code == 200 and after.status_code == 200
    assert_clean(engine)


def test_nan_detection_is_per_row_and_leaves_the_caller_logits_alone():
    from conveyor.runner.row_sampling import finite_rows
    logits = torch.zeros(4, 10)
    logits[1, 3], logits[2, 9], logits[3, 0] = float("nan"), float("inf"), float("-inf")
    before = logits.clone()
    assert finite_rows(logits) == [True, False, False, False]
    assert torch.equal(logits.isnan(), before.isnan())
    if cpu_kernel.is_available():       # the C++ pass the runner takes with the fused ops
        assert finite_rows(logits, fused=True) == [True, False, False, False]
        assert torch.equal(logits.isnan(), before.isnan())
