"""Token-for-token equivalence with HF transformers' greedy generate (fp32).

The real SmolLM2 GGUF through one engine with 8 slots, a 64-token budget and a KV pool small
enough to preempt; and tiny random-weight Qwen2 (qkv bias, untied head) and Llama (llama3 rope
scaling) checkpoints written as safetensors and loaded from disk.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from conftest import StepRecorder, hf_greedy, run_engine
from conveyor.sampling_params import SamplingParams
from conveyor.engine.llm_engine import LLMEngine

TEXT = (
    "The history of computing is a story of people finding ways to make machines do arithmetic "
    "faster than any clerk could. Early mechanical calculators gave way to electromechanical relays, "
    "then to vacuum tubes, transistors and integrated circuits. Each step made computation cheaper, "
    "and each drop in price opened new uses: census tabulation, artillery tables, weather forecasts, "
    "payroll, airline reservations, and eventually the personal computer on every desk. Today a "
    "single phone holds more processing power than all the computers of 1960 combined, and large "
    "language models answer questions for millions of people at once. Serving them efficiently is "
    "a scheduling problem: many users, one model, finite memory. ")


def _prompts(tokenizer, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    base = tokenizer.encode(TEXT * 8, add_special_tokens=False)
    rng = random.Random(seed)
    lengths = [lo, hi] + [rng.randint(lo, hi) for _ in range(n - 2)]
    out = []
    for length in lengths:
        start = rng.randint(0, len(base) - length)
        out.append(base[start:start + length])
    return out


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_path):
    from transformers import AutoModelForCausalLM
    d, f = os.path.split(smollm2_path)
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()


def _check_engine_matches_hf(engine: LLMEngine, hf_model, prompts, max_tokens, eos):
    rec = StepRecorder(engine)
    ids = [engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=m))
           for p, m in zip(prompts, max_tokens)]
    finals = run_engine(engine)
    engine.check_invariants()
    assert engine.core.kv_manager.pool.num_free_blocks == engine.num_kv_blocks
    for rid, prompt, m in zip(ids, prompts, max_tokens):
        expected = hf_greedy(hf_model, prompt, m, eos)
        got = finals[rid].outputs[0].token_ids
        assert got == expected, f"request {rid} (prompt {len(prompt)} tokens, max {m}) differs"
    return rec, ids


@pytest.mark.slow
def test_smollm2_gguf_greedy_matches_transformers_under_pressure(smollm2_path, hf_smollm2):
    engine = LLMEngine.from_kwargs(model=smollm2_path, dtype="float32", max_num_seqs=8,
                                   max_num_batched_tokens=64, num_blocks=72, block_size=16)
    prompts = _prompts(engine.tokenizer, 24, 8, 600, seed=1)
    rng = random.Random(2)
    max_tokens = [rng.choice([1, 2, 8, 16, 24, 32]) for _ in prompts]
    rec, ids = _check_engine_matches_hf(engine, hf_smollm2, prompts, max_tokens, 2)
    assert rec.joined_mid_flight(), "no request joined while others were running"
    assert rec.chunked_prefill_happened({rid: len(p) for rid, p in zip(ids, prompts)})
    assert rec.num_preemptions() > 0, "the KV pool was not small enough to preempt"


def _save_tiny(tmp_path, config, tokenizer_src: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    d, f = os.path.split(tokenizer_src)
    AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(tmp_path)
    return model


def _tiny_common(**kw):
    return dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                initializer_range=0.3, bos_token_id=1, eos_token_id=2, **kw)


def test_tiny_qwen2_safetensors_matches_transformers(tmp_path, smollm2_path):
    from transformers import Qwen2Config
    cfg = Qwen2Config(**_tiny_common(tie_word_embeddings=False, rope_theta=10000.0))
    hf = _save_tiny(tmp_path, cfg, smollm2_path)
    assert hf.model.layers[0].self_attn.q_proj.bias is not None
    engine = LLMEngine.from_kwargs(model=str(tmp_path), dtype="float32", max_num_seqs=4,
                                   max_num_batched_tokens=24, num_blocks=40, block_size=8)
    prompts = [[(7 * i + 13 * j) % 49000 + 3 for j in range(n)] for i, n in enumerate([5, 40, 17, 90, 3, 64])]
    _check_engine_matches_hf(engine, hf, prompts, [12, 20, 7, 16, 30, 9], eos=None)


def test_tiny_llama_rope_scaling_safetensors_matches_transformers(tmp_path, smollm2_path):
    from transformers import LlamaConfig
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    cfg = LlamaConfig(**_tiny_common(tie_word_embeddings=True, rope_scaling=scaling, rope_theta=500000.0))
    hf = _save_tiny(tmp_path, cfg, smollm2_path)
    engine = LLMEngine.from_kwargs(model=str(tmp_path), dtype="float32", max_num_seqs=3,
                                   max_num_batched_tokens=32, num_blocks=30, block_size=16)
    assert engine.model.config.rope_scaling_dict.get("rope_type") == "llama3"
    prompts = [[(11 * i + 5 * j) % 49000 + 3 for j in range(n)] for i, n in enumerate([100, 8, 150, 33])]
    _check_engine_matches_hf(engine, hf, prompts, [40, 25, 30, 60], eos=None)
