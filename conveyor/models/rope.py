"""Rotary position embeddings (HF "rotate half" layout) with default, linear, llama3 and YaRN
scaling, and GGUF's ``rope_freqs`` factors (llama.cpp's form of Llama 3.1/3.2 scaling: each
inverse frequency divided by its factor).

YaRN (Qwen2.5/Qwen3 long context, DeepSeek) follows transformers' ``_compute_yarn_parameters``:
the high frequencies keep their values (extrapolation), the low ones are divided by ``factor``
(interpolation), a linear ramp between the dimensions that turn ``beta_fast`` and ``beta_slow``
times over ``original_max_position_embeddings``; and cos/sin are multiplied by the attention
factor (given, or ``0.1 ln(factor) + 1``, or DeepSeek's ``mscale`` / ``mscale_all_dim`` ratio).

cos/sin tables are precomputed in fp32 for every position up to the model's limit, then looked
up by the flat ``positions`` tensor, so one call serves every request in a ragged batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from conveyor.errors import UnsupportedModelError
from conveyor.models.config import ArchConfig


def _inv_freq(cfg: ArchConfig, theta: float | None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [D/2], the factor cos/sin are multiplied by); ``theta`` set: that
    base, unscaled (Gemma 3's sliding layers)."""
    d = cfg.head_dim
    base = cfg.rope_theta if theta is None else theta
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if theta is not None:
        return inv, 1.0
    if cfg.rope_freq_factors:
        if len(cfg.rope_freq_factors) != d // 2:
            raise UnsupportedModelError(
                f"rope_freqs has {len(cfg.rope_freq_factors)} factors, head_dim {d} needs {d // 2}")
        return inv / torch.tensor(cfg.rope_freq_factors, dtype=torch.float32), 1.0
    scaling = cfg.rope_scaling_dict
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / scaling["factor"], 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv, scaling), 1.0
    if kind == "yarn":
        return _yarn(inv, cfg, base, scaling)
    raise UnsupportedModelError(
        f"rope scaling type {kind!r} is not supported (default, linear, llama3, yarn)")


def _yarn(inv: torch.Tensor, cfg: ArchConfig, base: float, s: dict) -> tuple[torch.Tensor, float]:
    if s.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("yarn rope scaling with partial_rotary_factor != 1 is not supported")
    d = cfg.head_dim
    old_len = s.get("original_max_position_embeddings") or cfg.max_position_embeddings
    factor = s.get("factor") or cfg.max_position_embeddings / old_len

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.get("attention_factor")
    if attention is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def dim_of(rotations: float) -> float:   # the dimension turning `rotations` times over old_len
        return d * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(s.get("beta_fast") or 32), dim_of(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp                        # 1: extrapolate (keep the frequency), 0: interpolate
    periods = base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)   # 1 / inv
    return 1.0 / (factor * periods) * (1 - keep) + inv * keep, float(attention)


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
        inv, scale = _inv_freq(cfg, self.theta)                            # [D/2]
        pos = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(pos, inv)                                      # [P, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)                            # [P, D]
        self.cos = emb.cos() * scale      # YaRN's attention factor (1 otherwise)
        self.sin = emb.sin() * scale

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos = self.cos[positions].unsqueeze(1)                             # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
