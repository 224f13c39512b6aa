"""The Llama family as one module tree with HF parameter names (q/k/v and gate/up fused).

Llama 2/3 (with rope scaling), SmolLM2 (tied embeddings), Mistral and Qwen2 (q/k/v bias) differ
only in ``ArchConfig`` flags. ``forward`` is a function of flat tensors plus attention metadata:
no Python branching on request state inside the layers. Checkpoints use HF's names; the loader
stacks q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` (``FUSED_PARAMS``).

The residual stream is carried beside the hidden states (vLLM's layout): each norm takes
``(x, residual)``, adds, and normalises, so with the C++ extension (``fused=True``, CPU with the
"cpu" attention backend) one op does residual add + RMSNorm, one op RoPE on the fused qkv rows and
one op the KV write. Which path runs is decided once, at construction (``conveyor.kernels``). The plain-PyTorch path computes the same values op by op and is the
reference the fused path is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from conveyor import kernels
from conveyor.attention.backend import AttentionMetadata, make_attention
from conveyor.models.config import ArchConfig
from conveyor.models.rope import RotaryEmbedding


# fused parameter -> the HF parameters stacked into it, in order (along the output dimension)
FUSED_PARAMS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def fuse_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF-named weights -> this module tree's names (stack q/k/v and gate/up per layer)."""
    out = dict(state)
    for key in [k for k in state if ".self_attn.q_proj." in k or ".mlp.gate_proj." in k]:
        for fused, parts in FUSED_PARAMS.items():
            if f".{parts[0]}." in key:
                prefix, suffix = key.split(f".{parts[0]}.")
                names = [f"{prefix}.{p}.{suffix}" for p in parts]
                if all(n in out for n in names):
                    out[f"{prefix}.{fused}.{suffix}"] = torch.cat([out.pop(n) for n in names])
    return out


def _fused_ops():
    return torch.ops.conveyor_cpu


class RMSNorm(nn.Module):
    """``norm(x)``, or with a residual ``(norm(x + residual), x + residual)``; the fused path does
    the latter in place in ``x`` and ``residual``."""

    def __init__(self, dim: int, eps: float, fused: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fused = fused

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.fused:
            if residual is None:
                out = torch.empty_like(x)
                _fused_ops().rms_norm(out, x, self.weight, self.eps)
                return out
            _fused_ops().fused_add_rms_norm(x, residual, self.weight, self.eps)
            return x, residual
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    """q/k/v projections run as one fused GEMM (``qkv_proj``, loaded from HF's three)."""

    def __init__(self, cfg: ArchConfig, rope: RotaryEmbedding, backend: str, fused: bool = False):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_size, self.kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
        self.qkv_proj = nn.Linear(h, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.rope = rope
        self.attn = make_attention(backend, cfg.num_heads, cfg.num_kv_heads, d, d ** -0.5)
        self.fused = fused and hasattr(self.attn, "forward_qkv")

    def forward(self, positions, x, kv_cache, md: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)                                           # [T, (Hq + 2 Hkv) D]
        if self.fused:
            _fused_ops().rotary_embedding(qkv, positions, self.rope.cos, self.rope.sin,
                                          self.num_heads, self.num_kv_heads)
            out = self.attn.forward_qkv(qkv, kv_cache, md)               # [T, Hq, D]
            return self.o_proj(out.view(t, -1))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)                     # [T, Hq, D]
        k = k.view(t, self.num_kv_heads, self.head_dim)                  # [T, Hkv, D]
        v = v.contiguous().view(t, self.num_kv_heads, self.head_dim)     # [T, Hkv, D]
        q, k = self.rope(positions, q, k)
        out = self.attn.forward(q, k, v, kv_cache, md)                   # [T, Hq, D]
        return self.o_proj(out.reshape(t, -1))                           # [T, H]


class MLP(nn.Module):
    """SwiGLU; gate and up projections run as one fused GEMM (``gate_up_proj``)."""

    def __init__(self, cfg: ArchConfig, fused: bool = False):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)                                          # [T, 2I]
        if self.fused:
            act = torch.empty((x.shape[0], self.intermediate_size), dtype=gate_up.dtype)
            _fused_ops().silu_and_mul(act, gate_up)
            return self.down_proj(act)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)               # [T, I] each
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, rope: RotaryEmbedding, backend: str, fused: bool = False):
        super().__init__()
        self.self_attn = Attention(cfg, rope, backend, fused)
        self.mlp = MLP(cfg, fused)
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
        self.layers = nn.ModuleList(DecoderLayer(cfg, rope, backend, fused)
                                    for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)

    def forward(self, input_ids, positions, kv_caches, md):
        x, residual = self.embed_tokens(input_ids), None                   # [T, H]
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(positions, x, residual, kv_cache, md)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    """``forward`` gives hidden states of every token; ``compute_logits`` only where sampled."""

    def __init__(self, cfg: ArchConfig, attention_backend: str = "sdpa",
                 fused_ops: bool | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        """The kernel paths are decided here, once, for ``dtype`` / ``device`` (what the model
        will run in; ``kernels.decide``): fused_ops None = the C++ element-wise ops wherever
        the "cpu" backend runs; True / False force them."""
        super().__init__()
        self.config = cfg
        self.dispatch = kernels.decide(attention_backend, dtype, device, cfg.head_dim, fused_ops)
        self.model = LlamaModel(cfg, self.dispatch.attention_backend, self.dispatch.fused_ops)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], md: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, md)           # [T, H]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()                              # [N, V]
