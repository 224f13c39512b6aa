"""Speculative decoding end to end (tiny random-weight models, float32): greedy outputs are
token-identical with and without drafts under chunked prefill, prefix caching, preemption (both
modes), priorities, structured outputs and the static/dynamic baselines; seeded sampled outputs
too; the block pool is whole after each run. A 32-token vocabulary makes the random model repeat
itself, so drafts are both accepted and rejected."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_engine

from conveyor.errors import ConfigError
from conveyor.sampling_params import SamplingParams
from conveyor.engine.llm_engine import LLMEngine
from conveyor.structured import StructuredOutputsParams

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
         "prompt_lookup_min": 1, "adaptive": False}
SUFFIX = {**NGRAM, "method": "suffix"}


def prompts(n: int = 4) -> list[list[int]]:
    head = [5, 9, 14, 3, 22, 7, 11, 30, 4, 17, 25, 8, 19, 6, 28, 12]   # shared: prefix-cache hits
    return [head + [(7 * i + 3 * j) % 20 + 3 for j in range(12)] * 2 for i in range(n)]


def generate(path, spec, params, priorities=None, **kw):
    args = dict(model=path, dtype="float32", max_num_seqs=4, max_num_batched_tokens=64,
                block_size=8, num_blocks=80, speculative_config=spec)
    args.update(kw)
    engine = LLMEngine.from_kwargs(**args)
    ids = [engine.add_request(p, params(i), priority=(priorities or [0] * 4)[i])
           for i, p in enumerate(prompts())]
    finals = run_engine(engine)
    engine.check_invariants()
    assert engine.core.kv_manager.pool.num_free_blocks == engine.num_kv_blocks
    outs = [finals[i].outputs[0] for i in ids]
    return [o.token_ids for o in outs], engine.core.scheduler, outs


def greedy(i: int) -> SamplingParams:
    return SamplingParams(max_tokens=30 + 3 * i, temperature=0.0, ignore_eos=True)


SCENARIOS = {
    "plain": {},
    "chunked_prefill": {"max_num_batched_tokens": 7},
    "no_prefix_cache": {"enable_prefix_caching": False},
    "no_chunked_prefill": {"enable_chunked_prefill": False},
    "recompute": {"num_blocks": 16},
    "swap": {"num_blocks": 16, "preemption_mode": "swap", "swap_space_bytes": 1 << 22},
    "priorities": {"num_blocks": 16, "priorities": [3, 2, 1, 0]},
    "static": {"batching": "static"},
    "dynamic": {"batching": "dynamic"},
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_greedy_outputs_identical_with_ngram_drafts(vocab32_dir, name):
    kw = dict(SCENARIOS[name])
    priorities = kw.pop("priorities", None)
    reference, ref_sched, _ = generate(vocab32_dir, None, greedy, priorities, **kw)
    got, sched, _ = generate(vocab32_dir, json.dumps(NGRAM), greedy, priorities, **kw)
    assert got == reference
    stats = sched.spec_stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert sum(stats.accepted_per_position) == stats.num_accepted_tokens
    if "num_blocks" in kw:
        assert ref_sched.num_preemptions_total > 0 and sched.num_preemptions_total > 0


def test_suffix_drafts_greedy_identical_and_logprobs_match(vocab32_dir):
    params = lambda i: SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True,  # noqa: E731
                                      logprobs=2)
    reference, _, ref_outs = generate(vocab32_dir, None, params)
    got, sched, outs = generate(vocab32_dir, SUFFIX, params)
    assert got == reference
    assert 0 < sched.spec_stats.num_accepted_tokens < sched.spec_stats.num_draft_tokens
    for a, b in zip(ref_outs, outs):
        assert [lp.token_id for lp in a.logprobs] == [lp.token_id for lp in b.logprobs]
        assert [lp.logprob for lp in a.logprobs] == pytest.approx([lp.logprob for lp in b.logprobs],
                                                                  abs=1e-4)
        assert [[t for t, _ in lp.top] for lp in a.logprobs] == \
            [[t for t, _ in lp.top] for lp in b.logprobs]


def test_seeded_sampling_identical_with_and_without_drafts(vocab32_dir):
    params = lambda i: SamplingParams(max_tokens=30, temperature=0.7, seed=100 + i,  # noqa: E731
                                      ignore_eos=True, repetition_penalty=1.1)
    reference, _, _ = generate(vocab32_dir, None, params)
    got, sched, _ = generate(vocab32_dir, NGRAM, params)
    again, _, _ = generate(vocab32_dir, NGRAM, params)
    assert got == reference == again
    assert sched.spec_stats.num_accepted_tokens > 0


def test_adaptive_policy_runs_and_matches(vocab32_dir):
    reference, _, _ = generate(vocab32_dir, None, greedy)
    got, sched, _ = generate(vocab32_dir, {**NGRAM, "adaptive": True}, greedy)
    assert got == reference
    assert sched.spec_stats.num_drafts > 0


def test_structured_outputs_mask_every_draft_position(tiny_llama_dir):
    spec = StructuredOutputsParams(regex=r"(ab c){6}")
    params = lambda i: SamplingParams(max_tokens=40, temperature=0.0,  # noqa: E731
                                      structured_outputs=spec)
    reference, _, outs = generate(tiny_llama_dir, None, params, max_num_batched_tokens=16)
    got, sched, _ = generate(tiny_llama_dir, NGRAM, params, max_num_batched_tokens=16)
    assert got == reference
    assert all(o.text == "ab c" * 6 for o in outs)
    assert sched.spec_stats.num_accepted_tokens > 0


def test_draft_model_greedy_identical(vocab32_dir, vocab32_draft_dir):
    reference, _, _ = generate(vocab32_dir, None, greedy)
    spec = {"method": "draft_model", "num_speculative_tokens": 3, "adaptive": False}
    got, sched, _ = generate(vocab32_dir, {**spec, "model": vocab32_draft_dir}, greedy,
                             num_blocks=16)
    assert got == reference
    assert 0 < sched.spec_stats.num_accepted_tokens < sched.spec_stats.num_draft_tokens
    assert sched.num_preemptions_total > 0
    # the target as its own draft: every draft is accepted
    got, sched, _ = generate(vocab32_dir, {**spec, "model": vocab32_dir}, greedy)
    assert got == reference
    assert sched.spec_stats.num_accepted_tokens == sched.spec_stats.num_draft_tokens > 0


def test_draft_model_with_another_vocabulary_is_refused(vocab32_dir, tiny_llama_dir):
    with pytest.raises(ConfigError, match="vocabulary"):
        LLMEngine.from_kwargs(model=vocab32_dir, dtype="float32", num_blocks=8, speculative_config={
            "method": "draft_model", "model": tiny_llama_dir})


def test_llm_kwarg_metrics_and_bench_counters(vocab32_dir):
    from conveyor.bench.offline import counters_delta, engine_counters
    from conveyor.metrics.prometheus import ServingMetrics
    from conveyor.engine.llm import LLM

    llm = LLM(vocab32_dir, dtype="float32", num_blocks=40, block_size=8, speculative_config=NGRAM)
    before = engine_counters(llm.engine)
    out = llm.generate([prompts(1)[0]], greedy(0))
    assert len(out[0].outputs[0].token_ids) == 30
    llm.engine.check_invariants()
    stats = llm.engine.core.scheduler.spec_stats
    delta = counters_delta(before, engine_counters(llm.engine))["spec_decode"]
    assert delta["num_draft_tokens"] == stats.num_draft_tokens > 0
    assert delta["num_accepted_tokens"] == stats.num_accepted_tokens
    assert delta["mean_accepted_length"] == pytest.approx(stats.mean_accepted_length)
    snap = llm.engine.stats()
    text = ServingMetrics(lambda: snap).render().decode()
    assert f"conveyor:spec_decode_num_draft_tokens_total {float(stats.num_draft_tokens)}" in text
    assert f"conveyor:spec_decode_num_accepted_tokens_total {float(stats.num_accepted_tokens)}" \
        in text
    first = stats.accepted_per_position[0]
    assert f'conveyor:spec_decode_num_accepted_tokens_per_pos_total{{position="0"}} ' \
           f'{float(first)}' in text


def test_bad_speculative_config_is_a_one_line_cli_error():
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "conveyor.cli", "generate", "hi",
                           "--speculative-config", '{"method":"medusa"}'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "speculative method must be one of" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("scope", ["tenant", "global"])
def test_suffix_history_is_kept_per_tenant_unless_the_prefix_cache_is_global(vocab32_dir, scope):
    """The runner's suffix proposer files each finished output under its request's scope."""
    from conveyor.core.request import Request
    from conveyor.core.speculation import history_scope
    engine = LLMEngine.from_kwargs(model=vocab32_dir, dtype="float32", block_size=8, num_blocks=40,
                                   speculative_config=SUFFIX, prefix_cache_scope=scope)
    for i, tenant in enumerate(["alice", "bob", "alice"]):
        engine.add_request(prompts(3)[i], greedy(0), tenant=tenant)
    run_engine(engine)
    engine.check_invariants()
    isolate = scope == "tenant"
    want = {history_scope(Request("x", [1], greedy(0), 1, tenant=t), isolate)
            for t in ("alice", "bob")}
    proposer = engine.runner.proposer
    assert set(proposer.shared) == want and len(want) == (2 if isolate else 1)
    assert sorted(s for s, _ in proposer.finished) == sorted(
        history_scope(Request("x", [1], greedy(0), 1, tenant=t), isolate)
        for t in ("alice", "bob", "alice"))
