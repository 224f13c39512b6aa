"""Linear layers with weights prepacked once, for CPU inference: for conveyor's bf16 GEMM or for
oneDNN.

``F.linear`` on CPU hands oneDNN a plain row-major weight on every call, and oneDNN re-lays it
out into its blocked format each time: for the small-batch GEMMs of decode steps that costs about
as much as the multiply itself (profiled: the 30 layers' GEMMs of SmolLM2 take 17 ms at batch 1
and 63 ms at batch 64 with plain weights, 11 ms and 45 ms prepacked, bf16, Zen 4). vLLM's CPU
backend and torch.compile's freezing pass do the same prepacking.

bf16 linears go to conveyor's own GEMM (``csrc/bf16_gemm.cpp``) where
``platform.bf16_gemm_path()`` says "conveyor" and the built extension has it: at decode sizes it
streams the weights faster than oneDNN and keeps 6 rows for about the price of one, 12 for a
little more (BENCHMARKS.md, "A bf16 GEMM for small batches"). ``CONVEYOR_DISABLE_BF16_GEMM=1``
keeps oneDNN. fp32 linears go to conveyor's fp32 GEMM (``csrc/fp32_gemm.cpp``) where
``platform.fp32_gemm_path()`` says "conveyor" (AVX2 CPUs without AVX-512; BENCHMARKS.md, "An fp32
GEMM for AVX2 CPUs"); ``CONVEYOR_DISABLE_FP32_GEMM=1`` keeps oneDNN.

Invariants:
- Packing changes the layout, not the maths: outputs equal ``F.linear``'s up to summation order
  (tested; F.linear itself picks other kernels for some shapes, e.g. gemv for one row). A bf16
  output is rounded once from fp32 sums, in both kernels.
- Only CPU modules in fp32 or bf16 are packed, only where this torch build has oneDNN, and bf16
  only where ``platform.cpu_info().can_prepack_bf16`` (oneDNN refuses the bf16 reorder without
  AVX-512 core or AVX-NE-CONVERT: plain bf16 linears still run there, slowly);
  ``CONVEYOR_DISABLE_PACKED_LINEAR=1`` turns it off. Anything else keeps ``nn.Linear``.
- The plain weight is dropped after packing (no second copy in memory); ``num_parameters``
  counts it from ``in_features x out_features``.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from conveyor import platform

log = logging.getLogger(__name__)

_NO_BIAS = torch.empty(0)

_BATCH_HINT = 64   # oneDNN's layout choice barely depends on it for these shapes (measured 1-256)


def packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether linears of this device and dtype get prepacked (see the invariants above)."""
    if os.environ.get("CONVEYOR_DISABLE_PACKED_LINEAR") == "1":
        return False
    if dtype == torch.bfloat16 and not platform.cpu_info().can_prepack_bf16:
        return False
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


# dtype -> conveyor's (probe, pack, linear) ops
_CONVEYOR_OPS = {torch.bfloat16: ("has_bf16_gemm", "pack_bf16_weight", "bf16_linear"),
                 torch.float32: ("has_fp32_gemm", "pack_fp32_weight", "fp32_linear")}


def conveyor_gemm_takes(weight: torch.Tensor) -> bool:
    """Whether this weight goes to one of conveyor's GEMMs rather than oneDNN (see above): bf16
    where ``platform.bf16_gemm_path()`` says so (and K is even), fp32 where
    ``platform.fp32_gemm_path()`` does, and the built extension has the kernel."""
    if weight.device.type != "cpu" or weight.dtype not in _CONVEYOR_OPS:
        return False
    if weight.dtype == torch.bfloat16:
        ok = weight.shape[1] % 2 == 0 and platform.bf16_gemm_path() == "conveyor"
    else:
        ok = platform.fp32_gemm_path() == "conveyor"
    return ok and _extension_has(_CONVEYOR_OPS[weight.dtype][0])


def _extension_has(probe: str) -> bool:
    from conveyor.kernels import LOADER  # noqa: PLC0415 - builds the extension on first use
    if not LOADER.available():
        return False
    return bool(getattr(torch.ops.conveyor_cpu, probe)(_NO_BIAS))


class PackedLinear(nn.Module):
    """``y = x W^T + b`` with W packed once, for conveyor's bf16 or fp32 GEMM (``kernel ==
    "conveyor"``, by the weight's dtype) or oneDNN. Input ``[..., in]``, output ``[..., out]``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kernel = "conveyor" if conveyor_gemm_takes(weight) else "oneDNN"
        self.dtype = weight.dtype
        if self.kernel == "conveyor":
            _, pack_op, linear_op = _CONVEYOR_OPS[weight.dtype]
            self.packed = getattr(torch.ops.conveyor_cpu, pack_op)(weight)
            self._linear = getattr(torch.ops.conveyor_cpu, linear_op)
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _BATCH_HINT)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous():
            x = x.contiguous()
        if self.kernel == "oneDNN":
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        rows = x.reshape(-1, self.in_features)
        out = torch.empty(rows.shape[0], self.out_features, dtype=self.dtype)
        self._linear(out, rows, self.packed, _NO_BIAS if self.bias is None else self.bias)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"packed={self.kernel}")


def linear_children(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """``(parent, attribute name, layer)`` of every plain ``nn.Linear`` in ``model``."""
    return [(parent, name, child) for parent in model.modules()
            for name, child in parent.named_children() if type(child) is nn.Linear]


def pack_linears(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` of ``model`` (CPU, fp32/bf16) by a ``PackedLinear``; returns
    how many were packed. A tied LM head gets its own packed copy; the embedding keeps its table."""
    packed = 0
    for parent, name, linear in linear_children(model):
        if not packing_supported(linear.weight.device, linear.weight.dtype):
            continue
        setattr(parent, name, PackedLinear(linear))
        packed += 1
    if packed:
        log.debug("prepacked %d linear layers for oneDNN", packed)
    return packed


def num_parameters(model: nn.Module) -> int:
    """Parameters the model stands for, a tied weight counted once. Layers holding their weight in
    a ``packed`` buffer instead of a parameter (``PackedLinear``, ``Int8Linear``) count as
    ``in_features x out_features``."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total + sum(m.in_features * m.out_features
                       for m in model.modules() if hasattr(m, "packed"))
