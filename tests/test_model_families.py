"""Qwen3 and Gemma 3 from tiny random-weight HF checkpoints, token for token against transformers
(fp32) in a continuous batch with chunked prefill; Gemma 3's sliding window made small (8 keys)
so that prompts far longer than the window stay cheap, also across prefix caching and both
preemption modes. Norm weights are randomised so that Gemma's (1 + w) and the q/k norms matter."""

from __future__ import annotations

import os

import pytest
import torch

from conveyor.engine.llm_engine import LLMEngine
from test_equivalence import _check_engine_matches_hf, _tiny_common

WINDOW = 8


def _save_tiny(tmp_path, config, tokenizer_src):
    """Random weights with random norms (HF initialises them to 1, or 0 for Gemma's 1 + w)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(tmp_path, safe_serialization=True)
    d, f = os.path.split(tokenizer_src)
    AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(tmp_path)
    return model


def _prompts(lengths, seed):
    return [[(seed * 7 + 11 * i + 5 * j) % 49000 + 3 for j in range(n)] for i, n in enumerate(lengths)]


def test_tiny_qwen3_matches_transformers_with_chunked_prefill(tmp_path, smollm2_path):
    from transformers import Qwen3Config
    cfg = Qwen3Config(**_tiny_common(tie_word_embeddings=False, head_dim=32, rope_theta=10000.0))
    hf = _save_tiny(tmp_path, cfg, smollm2_path)
    assert hf.model.layers[0].self_attn.q_norm is not None
    engine = LLMEngine.from_kwargs(model=str(tmp_path), dtype="float32", max_num_seqs=4,
                                   max_num_batched_tokens=24, num_blocks=40, block_size=8)
    assert engine.model.config.architecture == "qwen3" and engine.model.config.qk_norm
    prompts = _prompts([5, 40, 17, 90, 3, 64], seed=1)
    rec, ids = _check_engine_matches_hf(engine, hf, prompts, [12, 20, 7, 16, 30, 9], eos=None)
    assert rec.chunked_prefill_happened({rid: len(p) for rid, p in zip(ids, prompts)})


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory, smollm2_path):
    from transformers import Gemma3TextConfig
    path = tmp_path_factory.mktemp("tiny_gemma3")
    common = _tiny_common(tie_word_embeddings=True)
    common.update(num_hidden_layers=3, head_dim=32)
    cfg = Gemma3TextConfig(
        **common, sliding_window=WINDOW, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0,
                                            "rope_theta": 1000000.0}})
    cfg.architectures = ["Gemma3ForCausalLM"]
    hf = _save_tiny(path, cfg, smollm2_path)
    return str(path), hf


def test_tiny_gemma3_matches_transformers_across_the_window(tiny_gemma3):
    path, hf = tiny_gemma3
    engine = LLMEngine.from_kwargs(model=path, dtype="float32", max_num_seqs=4,
                                   max_num_batched_tokens=24, num_blocks=60, block_size=8)
    c = engine.model.config
    assert (c.architecture, c.sliding_window, c.rope_local_theta) == ("gemma3", WINDOW, 10000.0)
    assert [c.layer_window(i) for i in range(3)] == [WINDOW, None, WINDOW]
    assert c.rope_scaling_dict == {"rope_type": "linear", "factor": 4.0}
    prompts = _prompts([3, 7, 8, 9, 40, 90], seed=2)          # shorter than, at and past the window
    rec, ids = _check_engine_matches_hf(engine, hf, prompts, [20, 12, 5, 16, 9, 14], eos=None)
    assert rec.chunked_prefill_happened({rid: len(p) for rid, p in zip(ids, prompts)})
    assert rec.joined_mid_flight()


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_tiny_gemma3_prefix_caching_and_preemption_match_transformers(tiny_gemma3, mode):
    path, hf = tiny_gemma3
    engine = LLMEngine.from_kwargs(model=path, dtype="float32", max_num_seqs=4,
                                   max_num_batched_tokens=32, num_blocks=14, block_size=8,
                                   enable_prefix_caching=True, preemption_mode=mode,
                                   swap_space_bytes=1 << 22)
    shared = _prompts([33], seed=3)[0]                       # four blocks: past the window
    prompts = [shared + tail for tail in _prompts([4, 11, 6, 19], seed=4)]
    rec, _ = _check_engine_matches_hf(engine, hf, prompts, [20, 16, 24, 12], eos=None)
    assert engine.core.kv_manager.num_prefix_hits > 0
    assert rec.num_preemptions() > 0
    assert engine.core.scheduler.num_preemptions_by_mode[mode] > 0
