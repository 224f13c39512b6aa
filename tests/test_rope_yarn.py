"""YaRN RoPE scaling (Qwen2.5/Qwen3 long context, DeepSeek's mscale) token for token against
transformers (fp32) on tiny random checkpoints whose prompts run past
``original_max_position_embeddings``: from HF ``rope_parameters`` (defaults; betas, mscale pair
and no truncation; an explicit attention factor) and from a GGUF with llama.cpp's yarn keys,
whose reference is the HF checkpoint with the equivalent parameters (transformers' GGUF loader
ignores them). The same weights without the scaling give other tokens."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from conftest import differs_from_hf
from conveyor.engine.llm_engine import LLMEngine
from conveyor.errors import UnsupportedModelError
from gguf_files import write_llama_gguf
from test_equivalence import _check_engine_matches_hf, _save_tiny, _tiny_common

THETA = 10000.0
PROMPTS = [[(13 * i + 7 * j) % 49000 + 3 for j in range(n)] for i, n in enumerate([150, 9, 96, 70])]
MAX_TOKENS = [20, 30, 24, 16]
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


def _engine(path):
    return LLMEngine.from_kwargs(model=path, dtype="float32", max_num_seqs=3,
                                 max_num_batched_tokens=40, num_blocks=60, block_size=16)


@pytest.mark.parametrize("family, params", [
    ("qwen3", YARN),
    ("llama", {**YARN, "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 2.0, "mscale_all_dim": 1.0,
               "truncate": False}),
    ("llama", {**YARN, "attention_factor": 1.3}),
])
def test_yarn_checkpoint_matches_transformers(tmp_path, smollm2_path, family, params):
    from transformers import LlamaConfig, Qwen3Config
    make = {"qwen3": Qwen3Config, "llama": LlamaConfig}[family]
    extra = {"head_dim": 32} if family == "qwen3" else {}
    cfg = make(**_tiny_common(tie_word_embeddings=False, rope_parameters={**params,
                                                                          "rope_theta": THETA},
                              **extra))
    hf = _save_tiny(tmp_path, cfg, smollm2_path)
    engine = _engine(str(tmp_path))
    assert engine.model.config.rope_scaling_dict["rope_type"] == "yarn"
    _check_engine_matches_hf(engine, hf, PROMPTS, MAX_TOKENS, eos=None)


def test_gguf_with_llama_cpp_yarn_keys_matches_transformers(tmp_path, smollm2_path):
    from transformers import AutoModelForCausalLM, LlamaConfig
    params = {**YARN, "beta_fast": 24.0,
              "attention_factor": 1.25 * (0.1 * math.log(4.0) + 1.0)}   # llama.cpp's attn 1.25
    cfg = LlamaConfig(**_tiny_common(tie_word_embeddings=False,
                                     rope_parameters={**params, "rope_theta": THETA}))
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    path = os.path.join(tmp_path, "yarn.gguf")
    write_llama_gguf(path, hf, smollm2_path, None, arch_keys={
        "rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
        "rope.scaling.original_context_length": 64, "rope.scaling.yarn_beta_fast": 24.0,
        "rope.scaling.yarn_attn_factor": 1.25, "rope.scaling.yarn_ext_factor": -1.0})
    engine = _engine(path)
    scaling = engine.model.config.rope_scaling_dict
    assert scaling["original_max_position_embeddings"] == 64 and scaling["beta_fast"] == 24.0
    _check_engine_matches_hf(engine, hf, PROMPTS, MAX_TOKENS, eos=None)


def test_without_the_scaling_the_same_weights_differ(tmp_path, smollm2_path):
    from transformers import Qwen3Config
    cfg = Qwen3Config(**_tiny_common(tie_word_embeddings=False, head_dim=32,
                                     rope_parameters={**YARN, "rope_theta": THETA}))
    hf = _save_tiny(tmp_path, cfg, smollm2_path)
    config_path = os.path.join(tmp_path, "config.json")
    with open(config_path) as f:
        plain = json.load(f)
    plain["rope_parameters"] = {"rope_type": "default", "rope_theta": THETA}
    plain.pop("rope_scaling", None)
    with open(config_path, "w") as f:
        json.dump(plain, f)
    engine = _engine(str(tmp_path))
    assert engine.model.config.rope_scaling_dict.get("rope_type", "default") == "default"
    assert differs_from_hf(engine, hf, PROMPTS, MAX_TOKENS)


@pytest.mark.parametrize("keys, message", [
    ({"rope.scaling.yarn_ext_factor": 0.5}, "yarn_ext_factor=0.5"),
    ({"rope.scaling.yarn_log_multiplier": 0.1}, "yarn_log_multiplier=0.1"),
])
def test_yarn_keys_without_an_hf_counterpart_are_refused(keys, message):
    from conveyor.weights.gguf_loader import _yarn_params
    with pytest.raises(UnsupportedModelError, match=message):
        _yarn_params(keys.get, 4.0)
    defaults = {"rope.scaling.yarn_ext_factor": 1.0, "rope.scaling.yarn_log_multiplier": 0.0,
                "rope.scaling.original_context_length": 4096}
    assert _yarn_params(defaults.get, 4.0) == {"original_max_position_embeddings": 4096}
