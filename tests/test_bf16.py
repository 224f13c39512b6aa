"""bf16 against the fp32 reference on the real model: one-step log-prob error and greedy agreement."""

from __future__ import annotations

import pytest
import torch

from conftest import run_engine
from conveyor import platform
from conveyor.sampling_params import SamplingParams
from conveyor.engine.llm_engine import LLMEngine

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of",
           "The three primary colors are", "Once upon a time, in a small village,",
           "To make a cup of tea, first"]


def _engine(path, dtype):
    return LLMEngine.from_kwargs(model=path, dtype=dtype, max_num_seqs=8, num_blocks=128)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available() and not platform.cpu_info().has_native_bf16,
                    reason=f"bf16 is emulated here: {platform.cpu_info().missing('native_bf16')}")
def test_bf16_logprobs_close_to_fp32_and_greedy_mostly_agrees(smollm2_path):
    outs = {}
    for dtype in ("float32", "bfloat16"):
        engine = _engine(smollm2_path, dtype)
        ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=24, logprobs=5))
               for p in PROMPTS]
        finals = run_engine(engine)
        engine.check_invariants()
        outs[dtype] = [finals[i].outputs[0] for i in ids]
    first_step_err, agree, total = 0.0, 0, 0
    for ref, low in zip(outs["float32"], outs["bfloat16"]):
        ref_top = dict(ref.logprobs[0].top)
        low_top = dict(low.logprobs[0].top)
        common = set(ref_top) & set(low_top)
        assert ref.token_ids[0] == low.token_ids[0]            # first greedy token agrees
        first_step_err = max(first_step_err, max(abs(ref_top[t] - low_top[t]) for t in common))
        for a, b in zip(ref.token_ids, low.token_ids):         # agreement up to first divergence
            total += 1
            if a != b:
                break
            agree += 1
    print(f"bf16 vs fp32: max first-step top-5 logprob error {first_step_err:.4f}; "
          f"greedy agreement until divergence {agree}/{total}")
    assert first_step_err < 0.25
    assert agree / total > 0.5
