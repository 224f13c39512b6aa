"""The Llama family as one module tree with HF parameter names.

Llama 2/3 (with rope scaling), SmolLM2 (tied embeddings), Mistral and Qwen2 (q/k/v bias) differ
only in ``ArchConfig`` flags. ``forward`` is a function of flat tensors plus attention metadata:
no Python branching on request state inside the layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from conveyor.attention.backend import AttentionMetadata, make_attention
from conveyor.models.config import ArchConfig
from conveyor.models.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ArchConfig, rope: RotaryEmbedding, backend: str):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.rope = rope
        self.attn = make_attention(backend, cfg.num_heads, cfg.num_kv_heads, d, d ** -0.5)

    def forward(self, positions, x, kv_cache, md: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)        # [T, Hq, D]
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)     # [T, Hkv, D]
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)     # [T, Hkv, D]
        q, k = self.rope(positions, q, k)
        out = self.attn.forward(q, k, v, kv_cache, md)                   # [T, Hq, D]
        return self.o_proj(out.reshape(t, -1))                           # [T, H]


class MLP(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, rope: RotaryEmbedding, backend: str):
        super().__init__()
        self.self_attn = Attention(cfg, rope, backend)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, x, kv_cache, md):
        x = x + self.self_attn(positions, self.input_layernorm(x), kv_cache, md)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ArchConfig, backend: str):
        super().__init__()
        rope = RotaryEmbedding(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rope, backend) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions, kv_caches, md):
        x = self.embed_tokens(input_ids)                                  # [T, H]
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(positions, x, kv_cache, md)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """``forward`` gives hidden states of every token; ``compute_logits`` only where sampled."""

    def __init__(self, cfg: ArchConfig, attention_backend: str = "sdpa"):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, attention_backend)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], md: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, md)           # [T, H]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()                              # [N, V]
