"""Gemma 3 (text): interleaved sliding-window (local) and global layers, each kind with its own
RoPE (local: ``rope_local_theta``, unscaled; global: ``rope_theta`` with the config's scaling),
q/k RMSNorm, GeGLU, four norms per layer, embeddings scaled by sqrt(hidden_size), tied head.

Gemma's norms compute ``norm(x) * (1 + w)``; ``convert_hf_state`` folds the 1 into the weights
once, so every norm is the shared ``RMSNorm`` (and its fused op). GGUF files store ``1 + w``
already: ``gguf_to_hf`` takes it back to HF's ``w`` (as transformers' GGUF loader does), so both
checkpoint kinds meet in HF's names and values.
"""

from __future__ import annotations

import torch
from torch import nn

from conveyor.errors import UnsupportedModelError
from conveyor.models.config import FULL, SLIDING, ArchConfig, rope_pairs
from conveyor.models.layers import Attention, CausalLM, GatedMLP, RMSNorm, fuse_hf_state_dict
from conveyor.models.rope import RotaryEmbedding

_PATTERN = 6                 # every 6th layer is global (HF's default, llama.cpp's fixed value)
_GGUF_LOCAL_THETA = 10000.0  # llama.cpp's fixed RoPE base of Gemma 3's sliding layers
_GGUF_27B_LAYERS = 62        # llama.cpp scales 27B's queries by (hidden / heads), others head_dim

GGUF_LAYER_NAMES = {
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def _layer_types(n: int, pattern: int = _PATTERN) -> tuple[str, ...]:
    return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n))


def hf_config_extras(cfg: dict) -> dict:
    if cfg.get("attn_logit_softcapping"):
        raise UnsupportedModelError("Gemma attention logit soft-capping is not supported")
    params = cfg.get("rope_parameters") or {}
    full, local = params.get(FULL) or {}, params.get(SLIDING) or {}
    scaling = full if full.get("rope_type", "default") != "default" else cfg.get("rope_scaling") or {}
    n = cfg["num_hidden_layers"]
    return dict(
        qk_norm=True, rope_theta=float(full.get("rope_theta", cfg.get("rope_theta", 1e6))),
        rope_local_theta=float(local.get("rope_theta", cfg.get("rope_local_base_freq", 1e4))),
        rope_scaling=rope_pairs({k: v for k, v in scaling.items() if k != "rope_theta"}),
        sliding_window=cfg.get("sliding_window", 4096),
        layer_types=tuple(cfg.get("layer_types")
                          or _layer_types(n, cfg.get("sliding_window_pattern", _PATTERN))),
        attention_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5,
        hidden_act=cfg.get("hidden_activation", "gelu_pytorch_tanh"),
        final_logit_softcapping=cfg.get("final_logit_softcapping"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)))


def gguf_config_extras(field) -> dict:
    n, heads = field("block_count"), field("attention.head_count")
    head_dim = field("attention.key_length") or field("embedding_length") // heads
    query_dim = field("embedding_length") // heads if n == _GGUF_27B_LAYERS else head_dim
    return dict(qk_norm=True, sliding_window=field("attention.sliding_window", 4096),
                layer_types=_layer_types(n), rope_local_theta=_GGUF_LOCAL_THETA,
                attention_scale=float(query_dim) ** -0.5, hidden_act="gelu_pytorch_tanh")


def gguf_to_hf(name: str, arr):
    return arr - 1.0 if name.endswith("norm.weight") else arr


def convert_hf_state(state: dict[str, torch.Tensor], cfg: ArchConfig) -> dict[str, torch.Tensor]:
    folded = {k: (1.0 + v.float()).to(v.dtype) if k.endswith("norm.weight") else v
              for k, v in state.items()}
    return fuse_hf_state_dict(folded)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, rope: RotaryEmbedding, backend: str, fused: bool,
                 window: int | None):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, rope, backend, fused, window)
        self.mlp = GatedMLP(cfg, fused)
        self.input_layernorm = RMSNorm(h, eps, fused)
        self.post_attention_layernorm = RMSNorm(h, eps, fused)
        self.pre_feedforward_layernorm = RMSNorm(h, eps, fused)
        self.post_feedforward_layernorm = RMSNorm(h, eps, fused)

    def forward(self, positions, x, residual, kv_cache, md):
        """(x, residual) -> (normed mlp output, residual): the caller adds the two."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(positions, x, kv_cache, md))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class Gemma3Model(nn.Module):
    def __init__(self, cfg: ArchConfig, backend: str, fused: bool):
        super().__init__()
        global_rope, local_rope = RotaryEmbedding(cfg), RotaryEmbedding(cfg, cfg.rope_local_theta)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_scale = cfg.hidden_size ** 0.5
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(cfg, local_rope if cfg.layer_window(i) else global_rope, backend,
                               fused, cfg.layer_window(i)) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)

    def forward(self, input_ids, positions, kv_caches, md):
        x = self.embed_tokens(input_ids)                                   # [T, H]
        x, residual = x * torch.tensor(self.embed_scale, dtype=x.dtype), None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(positions, x, residual, kv_cache, md)
        return self.norm(x, residual)[0]


class Gemma3ForCausalLM(CausalLM):
    def build_model(self, cfg: ArchConfig, backend: str, fused: bool) -> nn.Module:
        return Gemma3Model(cfg, backend, fused)


MODEL_CLASS = Gemma3ForCausalLM
