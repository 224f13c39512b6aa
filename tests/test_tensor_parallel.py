"""Tensor parallelism (conveyor/distributed, models/parallel.py): 2 ranks on CPU, fp32, against 1.

Greedy tokens must be identical and logprobs equal to rounding: the all-reduce sums the shards'
partial products in another order than one GEMM, so logits differ by ~1e-6; with the tiny
model's top-2 gaps far above that, tokens cannot flip (the gap is asserted, so a test that could
pass only by luck fails instead). Also: the clear error when N does not divide the heads, no
orphan worker after shutdown, a killed worker fails the engine with its rank named.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from conftest import save_tiny_llama
from conveyor import LLM, SamplingParams
from conveyor.errors import ConfigError, TensorParallelError

PROMPTS = [[(7 * i + 13 * j) % 49000 + 3 for j in range(n)] for i, n in enumerate([5, 40, 17, 90])]


def _llm(path, tp, **kw):
    return LLM(path, dtype="float32", tensor_parallel_size=tp, num_blocks=64, block_size=8,
               max_num_batched_tokens=24, max_num_seqs=4, **kw)


def _run(llm):
    sp = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=2)
    prompts = PROMPTS + [PROMPTS[3][:64] + [5, 6]]          # a prefix-cache hit on the last
    return [o.outputs[0] for o in llm.generate(prompts, sp, use_tqdm=False)]


def _assert_same_as_one_rank(ref, got):
    """Tokens identical, top logprobs equal to rounding, and no near-tie that could flip."""
    for a, b in zip(ref, got):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs):
            top = sorted((lp for _, lp in la.top), reverse=True)
            assert top[0] - top[1] > 1e-3                       # no near-tie to flip
            assert [t for t, _ in la.top] == [t for t, _ in lb.top]
            for (_, x), (_, y) in zip(la.top, lb.top):
                assert abs(x - y) < 1e-4


def test_two_ranks_match_one_rank_and_leave_no_process(tiny_llama_dir):
    ref = _run(_llm(tiny_llama_dir, 1))
    llm = _llm(tiny_llama_dir, 2)
    pids = llm.engine.runner.workers.pids
    assert len(pids) == 1 and all(os.path.exists(f"/proc/{p}") for p in pids)
    _assert_same_as_one_rank(ref, _run(llm))
    assert llm.engine.core.stats().prefix_cache_hits > 0
    llm.engine.check_invariants()
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    llm.engine.shutdown()
    for p in pids:
        assert not os.path.exists(f"/proc/{p}") or _is_zombie_gone(p)
    with pytest.raises(TensorParallelError):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)


def test_fewer_kv_heads_than_ranks_replicate_them(tmp_path, smollm2_path):
    """4 query heads, 1 KV head (multi-query), 2 ranks: each rank keeps a copy of the KV head
    and half the query heads; tokens as one rank's, logprobs to rounding."""
    path = save_tiny_llama(tmp_path, smollm2_path, seed=1, num_key_value_heads=1)
    ref = _run(_llm(path, 1))
    llm = _llm(path, 2)
    assert llm.engine.model.config.num_kv_heads == 1 and llm.engine.model.config.num_heads == 2
    _assert_same_as_one_rank(ref, _run(llm))
    llm.engine.check_invariants()
    llm.engine.shutdown()


def _is_zombie_gone(pid):
    time.sleep(0.5)
    return not os.path.exists(f"/proc/{pid}")


def test_a_killed_worker_fails_the_engine_naming_its_rank(tiny_llama_dir):
    llm = _llm(tiny_llama_dir, 2)
    (pid,) = llm.engine.runner.workers.pids
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.3)
    with pytest.raises(TensorParallelError, match="rank 1 was killed by signal 9"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
    llm.engine.shutdown()


def test_sizes_that_do_not_divide_the_heads_are_refused(smollm2_path):
    # SmolLM2-135M: 9 heads, 3 KV heads -> 2 does not divide, 3 would
    with pytest.raises(ConfigError, match=r"num_attention_heads=9, num_key_value_heads=3.*\[3\]"):
        LLM(smollm2_path, tensor_parallel_size=2, num_blocks=16)
    with pytest.raises(ConfigError):
        LLM(smollm2_path, tensor_parallel_size=0)
