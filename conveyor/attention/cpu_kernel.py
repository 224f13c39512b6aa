"""The "cpu" attention backend: ``CpuAttention`` calls the C++ paged-attention kernel
(``torch.ops.conveyor_cpu.paged_attention``, ``conveyor/csrc/paged_attention.cpp``).

Building and loading the extension is ``conveyor.kernels``' job (once per process); whether a
model uses this backend is decided once, when it is built (``kernels.decide``). The loader's
names are re-exported here for existing callers.
"""

from __future__ import annotations

import torch

from conveyor.attention.backend import AttentionMetadata, SplitAttention, write_kv
from conveyor.kernels import (LOADER, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS,  # noqa: F401
                              KernelLoader, KernelUnavailable, is_available)


def _as_index(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int64 and t.is_contiguous() else t.to(torch.int64).contiguous()


class CpuAttention:
    """Paged attention through the C++ kernel: reads K/V in place from the block tables, handles
    decode rows and prefill chunks in one call, fp32 or bf16, threads = torch.get_num_threads().

    A model builds it only where the kernel takes its tensors (``kernels.decide``); ``forward``
    still hands tensors it cannot take (another device or dtype) to ``SplitAttention``, for
    direct callers; ``forward_qkv`` (the model's fused path) does not check.
    """

    name = "cpu"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.window = sliding_window or 0                    # the kernel's 0: no window
        self._fallback = SplitAttention(num_heads, num_kv_heads, head_dim, scale, sliding_window)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                md: AttentionMetadata) -> torch.Tensor:
        # q: [T, Hq, D]; k, v: [T, Hkv, D]; kv_cache: [2, num_blocks, block_size, Hkv, D]
        if not self._takes(q, kv_cache):
            return self._fallback.forward(q, k, v, kv_cache, md)
        write_kv(kv_cache, k, v, md.slot_mapping)
        if q.stride(-1) != 1:
            q = q.contiguous()
        out = torch.empty(q.shape, dtype=q.dtype)                              # [T, Hq, D]
        torch.ops.conveyor_cpu.paged_attention(
            out, q, kv_cache, _as_index(md.block_tables), _as_index(md.query_start_loc),
            _as_index(md.seq_lens), self.scale, self.window, torch.get_num_threads())
        return out

    def forward_qkv(self, qkv: torch.Tensor, kv_cache: torch.Tensor,
                    md: AttentionMetadata) -> torch.Tensor:
        """Attention straight from fused qkv rows ``[T, (Hq + 2 Hkv) D]`` (RoPE already applied):
        one op writes their k/v heads to the cache, the kernel reads q as a strided view."""
        t, hq, hkv, d = qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        torch.ops.conveyor_cpu.write_kv(kv_cache, qkv, md.slot_mapping, hq, hkv)
        q = qkv[:, :hq * d].view(t, hq, d)
        out = torch.empty((t, hq, d), dtype=qkv.dtype)
        torch.ops.conveyor_cpu.paged_attention(
            out, q, kv_cache, _as_index(md.block_tables), _as_index(md.query_start_loc),
            _as_index(md.seq_lens), self.scale, self.window, torch.get_num_threads())
        return out

    @staticmethod
    def _takes(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
        return (q.device.type == "cpu" and kv_cache.device.type == "cpu"
                and q.dtype in SUPPORTED_DTYPES and kv_cache.dtype in SUPPORTED_DTYPES
                and kv_cache.is_contiguous())


def make_cpu_attention(num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                       loader: KernelLoader = LOADER, sliding_window: int | None = None):
    """``CpuAttention`` when the kernel is available and supports ``head_dim``, otherwise
    ``SplitAttention`` (after one logged warning); ``sliding_window`` as in ``make_attention``."""
    if not loader.available():
        return SplitAttention(num_heads, num_kv_heads, head_dim, scale, sliding_window)
    if head_dim not in SUPPORTED_HEAD_DIMS:
        loader.warn_once(f"cpu attention kernel has no head_dim={head_dim} "
                         f"(supports {SUPPORTED_HEAD_DIMS}); using 'sdpa'")
        return SplitAttention(num_heads, num_kv_heads, head_dim, scale, sliding_window)
    return CpuAttention(num_heads, num_kv_heads, head_dim, scale, sliding_window)
