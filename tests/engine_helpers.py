"""A small engine shared by the in-process serving tests (loaded once per test session)."""

from __future__ import annotations

import functools

from conveyor import SamplingParams

# 24 blocks x 16 tokens (small enough to force preemption); a 32-token budget prefills a
# 100-token prompt over four steps.
NUM_BLOCKS = 24


@functools.cache
def small_engine():
    from conveyor.engine.llm_engine import LLMEngine
    return LLMEngine.from_kwargs(dtype="float32", max_num_seqs=4, max_num_batched_tokens=32,
                                 num_blocks=NUM_BLOCKS, max_model_len=384)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def prompt(n: int, seed: int = 0) -> list[int]:
    return [(seed * 7919 + i * 104729) % 40000 + 100 for i in range(n)]


def assert_all_blocks_free(engine) -> None:
    engine.check_invariants()
    assert engine.core.kv_manager.pool.num_free_blocks == NUM_BLOCKS
    assert not engine.has_unfinished_requests()
