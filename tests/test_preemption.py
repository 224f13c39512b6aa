"""Swap and recompute preemption give exactly the output of an unpreempted run (real KV copies)."""

from __future__ import annotations

import pytest

from conftest import run_engine
from conveyor.sampling_params import SamplingParams
from conveyor.engine.llm_engine import LLMEngine

PROMPTS = [[(17 * i + 5 * j) % 40000 + 30 for j in range(n)] for i, n in enumerate([20, 45, 9, 33, 60, 14])]


def _outputs(path, **kw):
    args = dict(model=path, dtype="float32", max_num_seqs=6, max_num_batched_tokens=32, block_size=8,
                enable_prefix_caching=False, swap_space_bytes=1 << 22)
    args.update(kw)
    engine = LLMEngine.from_kwargs(**args)
    ids = [engine.add_request(p, SamplingParams(temperature=0.8, seed=i, max_tokens=18, ignore_eos=True))
           for i, p in enumerate(PROMPTS)]
    finals = run_engine(engine)
    engine.check_invariants()
    assert engine.core.kv_manager.pool.num_free_blocks == engine.num_kv_blocks
    return [finals[i].outputs[0].token_ids for i in ids], engine.core.scheduler


@pytest.mark.parametrize("mode", ["recompute", "swap", "auto"])
def test_preemption_modes_match_an_unpreempted_run(tiny_llama_dir, mode):
    reference, sched = _outputs(tiny_llama_dir, num_blocks=200)
    assert sched.num_preemptions_total == 0
    got, sched = _outputs(tiny_llama_dir, num_blocks=16, preemption_mode=mode)
    assert sched.num_preemptions_total > 0
    swaps = sched.num_preemptions_by_mode["swap"]
    assert (swaps > 0) == (mode != "recompute")
    assert got == reference
