"""Llama 3.x GGUFs: llama.cpp stores Llama 3.1/3.2 RoPE scaling as a ``rope_freqs`` tensor. A tiny
random Llama written by ``gguf`` with that tensor runs token for token like transformers (fp32);
the reference is the HF checkpoint with the equivalent ``rope_scaling`` (llama3), because
transformers' GGUF loader ignores ``rope_freqs``. Without the tensor the same weights differ."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import differs_from_hf
from conveyor.engine.llm_engine import LLMEngine
from gguf_files import llama3_rope_factors, write_llama_gguf
from test_equivalence import _check_engine_matches_hf, _tiny_common

SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 64}
THETA = 500000.0
PROMPTS = [[(11 * i + 5 * j) % 49000 + 3 for j in range(n)] for i, n in enumerate([100, 8, 150, 33])]
MAX_TOKENS = [30, 25, 30, 40]


@pytest.fixture(scope="module")
def llama3_ggufs(tmp_path_factory, smollm2_path):
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(**_tiny_common(tie_word_embeddings=False, rope_scaling=SCALING,
                                     rope_theta=THETA))
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    d = tmp_path_factory.mktemp("llama3_gguf")
    with_freqs, without = os.path.join(d, "with.gguf"), os.path.join(d, "without.gguf")
    factors = llama3_rope_factors(cfg.head_dim, THETA, SCALING)
    assert factors.min() == 1.0 and factors.max() == 8.0     # the factors change some frequencies
    write_llama_gguf(with_freqs, hf, smollm2_path, factors)
    write_llama_gguf(without, hf, smollm2_path, None)
    return hf, with_freqs, without, factors


def _engine(path):
    return LLMEngine.from_kwargs(model=path, dtype="float32", max_num_seqs=3,
                                 max_num_batched_tokens=32, num_blocks=40, block_size=16)


def test_rope_freqs_gguf_matches_transformers_llama3_scaling(llama3_ggufs):
    hf, with_freqs, _, factors = llama3_ggufs
    engine = _engine(with_freqs)
    assert engine.model.config.rope_freq_factors == tuple(float(f) for f in factors)
    assert engine.tokenizer.chat_template                # read from the GGUF's tokenizer keys
    _check_engine_matches_hf(engine, hf, PROMPTS, MAX_TOKENS, eos=None)


def test_without_rope_freqs_the_same_weights_differ(llama3_ggufs):
    hf, _, without, _ = llama3_ggufs
    engine = _engine(without)
    assert engine.model.config.rope_freq_factors == ()
    assert differs_from_hf(engine, hf, PROMPTS, MAX_TOKENS)
