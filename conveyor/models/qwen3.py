"""Qwen3: the Llama layer stack with an RMSNorm over each q and k head before RoPE, no q/k/v
bias, an explicit head_dim (``ArchConfig.qk_norm``); sliding layers where its config asks."""

from __future__ import annotations

from conveyor.models.llama import GGUF_LAYER_NAMES as _LLAMA_GGUF_NAMES
from conveyor.models.llama import LlamaForCausalLM, convert_hf_state, gguf_to_hf  # noqa: F401 - hooks

GGUF_LAYER_NAMES = {**_LLAMA_GGUF_NAMES, "attn_q_norm": "self_attn.q_norm",
                    "attn_k_norm": "self_attn.k_norm"}


def hf_config_extras(cfg: dict) -> dict:
    return {"qk_norm": True, "attention_bias": bool(cfg.get("attention_bias", False))}


def gguf_config_extras(field) -> dict:
    return {"qk_norm": True}


MODEL_CLASS = LlamaForCausalLM
