"""Rotary position embeddings (HF "rotate half" layout) with default, linear and llama3 scaling,
and GGUF's ``rope_freqs`` factors (llama.cpp's form of Llama 3.1/3.2 scaling: each inverse
frequency divided by its factor).

cos/sin tables are precomputed in fp32 for every position up to the model's limit, then looked
up by the flat ``positions`` tensor, so one call serves every request in a ragged batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from conveyor.errors import UnsupportedModelError
from conveyor.models.config import ArchConfig


def _inv_freq(cfg: ArchConfig, theta: float | None) -> torch.Tensor:
    """Inverse frequencies [D/2]; ``theta`` set: that base, unscaled (Gemma 3's sliding layers)."""
    d = cfg.head_dim
    base = cfg.rope_theta if theta is None else theta
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if theta is not None:
        return inv
    if cfg.rope_freq_factors:
        if len(cfg.rope_freq_factors) != d // 2:
            raise UnsupportedModelError(
                f"rope_freqs has {len(cfg.rope_freq_factors)} factors, head_dim {d} needs {d // 2}")
        return inv / torch.tensor(cfg.rope_freq_factors, dtype=torch.float32)
    scaling = cfg.rope_scaling_dict
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv, scaling)
    raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported (default, linear, llama3)")


def _llama3_inv_freq(inv: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of one RoPE variant; ``theta`` given: that base without scaling."""

    def __init__(self, cfg: ArchConfig, theta: float | None = None):
        super().__init__()
        self.theta = theta
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset_tables(cfg)

    def reset_tables(self, cfg: ArchConfig) -> None:
        """(Re)compute the tables on the CPU; also after building the model on the meta device."""
        inv = _inv_freq(cfg, self.theta)                                   # [D/2]
        pos = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(pos, inv)                                      # [P, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)                            # [P, D]
        self.cos = emb.cos()
        self.sin = emb.sin()

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos = self.cos[positions].unsqueeze(1)                             # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
