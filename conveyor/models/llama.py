"""The Llama family: Llama 2/3 (rope scaling, GGUF rope_freqs), SmolLM2 (tied embeddings),
Mistral (sliding window on every layer) and Qwen2 (q/k/v bias) differ only in ``ArchConfig``.

``forward`` is a function of flat tensors plus attention metadata: no Python branching on
request state inside the layers. The layers themselves live in ``layers.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from conveyor.models.config import ArchConfig
from conveyor.models.layers import (Attention, CausalLM, GatedMLP, RMSNorm, fuse_hf_state_dict)
from conveyor.models.rope import RotaryEmbedding

# GGUF tensor (inside blk.N) -> HF parameter inside model.layers.N
GGUF_LAYER_NAMES = {"ffn_norm": "post_attention_layernorm"}


def hf_config_extras(cfg: dict) -> dict:
    return {}


def gguf_config_extras(field) -> dict:
    return {}


def gguf_to_hf(name: str, arr):
    return arr


def convert_hf_state(state: dict[str, torch.Tensor], cfg: ArchConfig) -> dict[str, torch.Tensor]:
    return fuse_hf_state_dict(state)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, rope: RotaryEmbedding, backend: str, fused: bool,
                 window: int | None):
        super().__init__()
        self.self_attn = Attention(cfg, rope, backend, fused, window)
        self.mlp = GatedMLP(cfg, fused)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)

    def forward(self, positions, x, residual, kv_cache, md):
        """(x, residual) -> (mlp output, residual): the caller adds the two (in the next norm)."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, kv_cache, md)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ArchConfig, backend: str, fused: bool = False):
        super().__init__()
        rope = RotaryEmbedding(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rope, backend, fused, cfg.layer_window(i))
                                    for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)

    def forward(self, input_ids, positions, kv_caches, md):
        x, residual = self.embed_tokens(input_ids), None                   # [T, H]
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(positions, x, residual, kv_cache, md)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(CausalLM):
    def build_model(self, cfg: ArchConfig, backend: str, fused: bool) -> nn.Module:
        return LlamaModel(cfg, backend, fused)


MODEL_CLASS = LlamaForCausalLM
