"""Layers every model family is built from, with HF parameter names (q/k/v and gate/up fused).

``RMSNorm`` carries the residual stream beside the hidden states (vLLM's layout): a norm takes
``(x, residual)``, adds, and normalises, so with the C++ extension (``fused=True``, CPU with the
"cpu" attention backend) one op does residual add + RMSNorm, one op RoPE on the fused qkv rows and
one op the KV write. The plain-PyTorch path computes the same values op by op and is the
reference the fused path is tested against. ``Attention`` covers q/k/v bias, per-head q/k norm,
a sliding window and its own RoPE; ``GatedMLP`` SwiGLU and GeGLU. Checkpoints use HF's names; the
loader stacks q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` (``FUSED_PARAMS``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from conveyor import kernels
from conveyor.attention.backend import AttentionMetadata, make_attention
from conveyor.errors import UnsupportedModelError
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
    """q/k/v projections run as one fused GEMM (``qkv_proj``, loaded from HF's three); then, with
    ``cfg.qk_norm``, an RMSNorm per q and k head, RoPE (``rope``: this layer's variant) and paged
    attention over the whole context or the last ``sliding_window`` positions."""

    def __init__(self, cfg: ArchConfig, rope: RotaryEmbedding, backend: str, fused: bool = False,
                 sliding_window: int | None = None, norm_cls: type | None = None):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_size, self.kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
        self.qkv_proj = nn.Linear(h, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.rope = rope
        # over [T, heads, D] views, on the plain path (the fused op takes rows)
        self.q_norm = (norm_cls or RMSNorm)(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = (norm_cls or RMSNorm)(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        scale = cfg.attention_scale if cfg.attention_scale is not None else d ** -0.5
        self.attn = make_attention(backend, cfg.num_heads, cfg.num_kv_heads, d, scale,
                                   sliding_window)
        # the fused path applies RoPE to the qkv rows as projected: no room for q/k norm
        self.fused = fused and not cfg.qk_norm and hasattr(self.attn, "forward_qkv")

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
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(positions, q, k)
        out = self.attn.forward(q, k, v, kv_cache, md)                   # [T, Hq, D]
        return self.o_proj(out.reshape(t, -1))                           # [T, H]


_ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``: SwiGLU (silu) or GeGLU (gelu_pytorch_tanh); gate and up
    run as one fused GEMM (``gate_up_proj``), SwiGLU's activation as one C++ op when fused."""

    def __init__(self, cfg: ArchConfig, fused: bool = False):
        super().__init__()
        if cfg.hidden_act not in _ACTIVATIONS:
            raise UnsupportedModelError(
                f"activation {cfg.hidden_act!r} is not supported ({sorted(_ACTIVATIONS)})")
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.fused = fused and cfg.hidden_act == "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)                                          # [T, 2I]
        if self.fused:
            act = torch.empty((x.shape[0], self.intermediate_size), dtype=gate_up.dtype)
            _fused_ops().silu_and_mul(act, gate_up)
            return self.down_proj(act)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)               # [T, I] each
        return self.down_proj(self.act(gate) * up)


class CausalLM(nn.Module):
    """A decoder stack ``model`` plus the LM head: ``forward`` gives hidden states of every token,
    ``compute_logits`` logits only where sampled. A family subclasses it with ``build_model``."""

    def __init__(self, cfg: ArchConfig, attention_backend: str = "sdpa",
                 fused_ops: bool | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        """The kernel paths are decided here, once, for ``dtype`` / ``device`` (what the model
        will run in; ``kernels.decide``): fused_ops None = the C++ element-wise ops wherever
        the "cpu" backend runs; True / False force them."""
        super().__init__()
        self.config = cfg
        self.dispatch = kernels.decide(attention_backend, dtype, device, cfg.head_dim, fused_ops)
        self.fused_ops = self.dispatch.fused_ops
        # built before the head, so a tied weight is named model.embed_tokens.weight
        self.model = self.build_model(cfg, self.dispatch.attention_backend, self.fused_ops)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def build_model(self, cfg: ArchConfig, backend: str, fused: bool) -> nn.Module:
        """The decoder stack: ``embed_tokens`` and ``(input_ids, positions, kv_caches, md) -> hidden``."""
        raise NotImplementedError

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], md: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, md)           # [T, H]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()                            # [N, V]
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
