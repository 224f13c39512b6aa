"""Tensor-parallel sharding of the shared layers (Megatron-style), on top of unchanged model files.

A rank's model is the family's ordinary module tree built from ``local_arch(cfg, size)``: 1/N of
the attention heads, of the KV heads and of the MLP's intermediate size. With fewer KV heads than
ranks (N a multiple of them, as vLLM allows), each rank holds a copy of the one KV head its query
heads attend to: ``N / num_kv_heads`` ranks share each head, each with its own KV cache of it.
Its weights are the full checkpoint's, sliced after loading (GGUF tensors are dequantized by
then) by ``shard_state_dict``:

- column-parallel (output rows sliced): ``qkv_proj`` (its q, k and v parts each) and
  ``gate_up_proj`` (gate and up each), with their biases: rank r computes its own heads' q/k/v
  and its own MLP columns, and needs no communication;
- row-parallel (input columns sliced): ``o_proj`` and ``down_proj``: each rank's output is a
  partial sum, so ``parallelize`` wraps them in ``RowParallelLinear``, which all-reduces (sums)
  it. Two all-reduces per layer, of ``[T, hidden]``, are the whole of a forward's communication;
- replicated: embeddings, norms, RoPE tables and the LM head (only rank 0 computes logits, so
  the vocabulary needs no gather; at 49k x 576 the table is small next to the layers).

Per-head work (q/k norms, RoPE, paged attention, the KV cache) runs per shard unchanged. The
all-reduce sums partial products in another order than one GEMM does: fp32 outputs match one
rank to rounding (about 1e-6 relative), not bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
from torch import nn

from conveyor.errors import ConfigError
from conveyor.models.config import ArchConfig

_COLUMN = ("self_attn.qkv_proj", "mlp.gate_up_proj")
_ROW = ("self_attn.o_proj", "mlp.down_proj")


class AllReduce(Protocol):
    def all_reduce(self, x: torch.Tensor) -> None:
        """Sum ``x`` over the ranks, in place."""


def kv_replicas(cfg: ArchConfig, size: int) -> int:
    """Ranks that share each KV head: 1 when ``size`` divides the KV heads, ``size //
    num_kv_heads`` when the KV heads divide ``size`` (each of those ranks holds a copy), else 0
    (no even split)."""
    if cfg.num_kv_heads % size == 0:
        return 1
    return size // cfg.num_kv_heads if size % cfg.num_kv_heads == 0 else 0


def _fits(cfg: ArchConfig, size: int) -> bool:
    return (cfg.num_heads % size == 0 and cfg.intermediate_size % size == 0
            and kv_replicas(cfg, size) > 0)


def local_arch(cfg: ArchConfig, size: int) -> ArchConfig:
    """The architecture one of ``size`` ranks builds; ConfigError when ``size`` does not divide the
    attention heads or the intermediate size, or neither divides the other with the KV heads."""
    if size == 1:
        return cfg
    if not _fits(cfg, size):
        counts = {"num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size}
        bad = {k: v for k, v in counts.items() if v % size}
        if kv_replicas(cfg, size) == 0:
            bad["num_key_value_heads"] = cfg.num_kv_heads
        said = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
        fits = [n for n in range(2, cfg.num_heads + 1) if _fits(cfg, n)]
        hint = f"sizes that fit this model: {fits}" if fits else "this model runs on 1 rank"
        raise ConfigError(f"--tensor-parallel-size {size} must divide the model's {said} "
                          f"(heads and MLP columns are split evenly across ranks; KV heads "
                          f"may also be fewer than the ranks if they divide them); {hint}",
                          "tensor_parallel_size")
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // size,
                               num_kv_heads=max(1, cfg.num_kv_heads // size),
                               intermediate_size=cfg.intermediate_size // size)


def shard_state_dict(state: dict[str, torch.Tensor], cfg: ArchConfig, rank: int,
                     size: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s slice of fused (``fuse_hf_state_dict``) full weights of ``cfg``."""
    if size == 1:
        return state
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    replicas = kv_replicas(cfg, size)
    head = rank // replicas                        # the KV head this rank's query heads use

    def kv_part(t: torch.Tensor) -> torch.Tensor:
        if replicas == 1:
            return _chunk(t, rank, size, 0)
        return t[head * cfg.head_dim:(head + 1) * cfg.head_dim]

    out = {}
    for name, t in state.items():
        if ".qkv_proj." in name:
            tq, tk, tv = t.split([q, kv, kv], dim=0)
            t = torch.cat([_chunk(tq, rank, size, 0), kv_part(tk), kv_part(tv)])
        elif any(f".{p}." in name for p in _COLUMN):
            t = torch.cat([_chunk(p, rank, size, 0) for p in t.split([inter, inter], dim=0)])
        elif any(f".{p}.weight" in name for p in _ROW):
            t = _chunk(t, rank, size, 1)
        out[name] = t.contiguous()
    return out


def _chunk(t: torch.Tensor, rank: int, size: int, dim: int) -> torch.Tensor:
    return t.chunk(size, dim=dim)[rank]


class RowParallelLinear(nn.Module):
    """A layer whose input is this rank's slice of the features: its output, summed over ranks,
    is the full layer's. ``inner`` is any linear (plain, oneDNN-packed, int8) without bias."""

    def __init__(self, inner: nn.Module, comm: AllReduce):
        super().__init__()
        self.inner = inner
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)                                              # [T, H] partial
        self.comm.all_reduce(out)                                        # [T, H] full
        return out


def parallelize(model: nn.Module, comm: AllReduce) -> int:
    """Wrap every row-parallel layer of a sharded model in ``RowParallelLinear``; returns how many."""
    wrapped = 0
    for name, module in list(model.named_modules()):
        for attr in ("o_proj", "down_proj"):
            inner = getattr(module, attr, None)
            if isinstance(inner, nn.Module) and not isinstance(inner, RowParallelLinear):
                if getattr(inner, "bias", None) is not None:
                    raise ConfigError(f"{name}.{attr} has a bias: tensor parallelism would add "
                                      "it once per rank", "tensor_parallel_size")
                setattr(module, attr, RowParallelLinear(inner, comm))
                wrapped += 1
    return wrapped
