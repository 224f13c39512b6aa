"""Int8 linear layers for CPU (``--quantization int8``): int8 weights, int8 activations, VNNI GEMMs.

Owns ``Int8Linear`` and ``quantize_linears(model)``. Weights are quantized once at load, per output
channel and symmetric (scale = max|w| / 127). Activations are quantized at every call, per row
(per token), asymmetric uint8 with an integer zero point z per row, by one C++ op
(``conveyor_cpu::quantize_rows_int8``; the torch references below where the extension is not
loaded). oneDNN's u8 x s8 linear (VNNI where the CPU has it) takes one zero point for the whole
tensor, so it runs with 128 (weight scales folded in), and ``dequantize_rows`` applies each row's
scale and adds what the row's own zero point is owed, ``scale * (128 - z)`` times the weight row
sums. Why (``scripts/int8_accuracy.py``, SmolLM2 perplexity): one activation scale per tensor,
what oneDNN's qlinear takes, costs +41%; per token symmetric around 0, +2.2%; per token over
[min, max] around its midpoint, +3.0% (0 is not exact, and most activations sit near it); per
token with an integer zero point, nothing measurable. On the real path with bf16 activations:
+0.29% (bf16 alone: +0.19%); see BENCHMARKS.md. Opt-in: it is faster from ~64 rows up and slower
for small decode batches.

Invariants: only layer GEMMs are quantized, never the LM head (it decides the token); the output
has the input's dtype (fp32 or bf16), rounded once from fp32; the torch references and the C++
ops give identical ints and scales. It runs only where ``platform.cpu_info().has_vnni``
(``check_supported``, at start): without VNNI oneDNN's u8 x s8 GEMM sums pairs of products in
int16 (vpmaddubsw) and saturates, so it would compute wrong values rather than slow ones.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from conveyor import platform
from conveyor.errors import ConfigError
from conveyor.models.packed import linear_children

log = logging.getLogger(__name__)

_ZERO_POINT = 128
_BATCH_HINT = 64     # oneDNN's weight layout for this many rows: the best of 1/64/512/2048 measured


def int8_supported() -> bool:
    """Whether this torch has oneDNN's quantized linear (CPU builds with oneDNN do)."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.onednn, "qlinear_prepack")
            and hasattr(torch.ops.onednn, "qlinear_pointwise"))


def check_supported(device: torch.device) -> None:
    """Raise ConfigError (one line saying what to change) unless int8 GEMMs run correctly here:
    a CPU device, a torch with oneDNN's quantized linear, and a CPU with VNNI."""
    if device.type != "cpu":
        raise ConfigError(f"--quantization int8 runs on the CPU only, not {device.type}; "
                          "drop --quantization or use --device cpu", "quantization")
    if not int8_supported():
        raise ConfigError("--quantization int8 needs a torch with oneDNN "
                          "(torch.ops.onednn.qlinear_pointwise); drop --quantization",
                          "quantization")
    platform.require("vnni", "--quantization int8")


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(qw int8 [N, K], scale fp32 [N])`` with ``w ~= qw * scale[:, None]``."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row asymmetric uint8 of ``x`` [T, K] over [min(x, 0), max(x, 0)] with an integer zero
    point z (0 is exact): ``(q, scale [T], offset [T] = scale * (128 - z))``, so that
    ``x ~= (q - 128) * scale + offset``."""
    xf = x.float()
    hi = xf.amax(dim=1).clamp_min(0.0)
    lo = xf.amin(dim=1).clamp_max(0.0)
    rng = (hi - lo) / 255.0
    scale = torch.where(rng > 0, rng, torch.ones_like(rng))
    zero = (-lo / scale).round().clamp(0, 255)
    q = ((xf * (1.0 / scale)[:, None]).round() + zero[:, None]).clamp(0, 255)
    return q.to(torch.uint8), scale, scale * (_ZERO_POINT - zero)


def dequantize_rows_reference(out: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
                              offset: torch.Tensor, colsum: torch.Tensor) -> None:
    """``out[r, c] = y[r, c] * scale[r] + offset[r] * colsum[c]`` (``y`` fp32)."""
    out.copy_(y * scale[:, None] + offset[:, None] * colsum[None, :])


def _quantize_rows(x: torch.Tensor, fused: bool):
    if not fused:
        return quantize_rows_reference(x)
    q = torch.empty(x.shape, dtype=torch.uint8)
    scale, offset = torch.empty(x.shape[0]), torch.empty(x.shape[0])
    torch.ops.conveyor_cpu.quantize_rows_int8(q, scale, offset, x)
    return q, scale, offset


class Int8Linear(nn.Module):
    """``y ~= x W^T + b`` with W and each row of x in int8. Input ``[T, in]``, output ``[T, out]``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fused: bool):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        qw, self.weight_scale = quantize_weight(weight)
        self.packed = torch.ops.onednn.qlinear_prepack(qw, [_BATCH_HINT, self.in_features])
        self.weight_zero_point = torch.zeros(self.out_features, dtype=torch.int64)
        # sum_k W[c, k] of the quantized weights: what a row's offset adds to output column c
        self.colsum = qw.float().sum(dim=1) * self.weight_scale
        self.bias = None if bias is None else bias.detach()
        self.fused = fused                           # the C++ quantize ops (else the references)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale, offset = _quantize_rows(x, self.fused)
        # oneDNN: (q - 128) @ qw^T * weight_scale in fp32 (a bf16 result here would be rounded
        # before the zero-point term is added, which cost SmolLM2 +1.2% perplexity); then each
        # row's scale and zero-point term, rounded once into x's dtype
        acc = torch.ops.onednn.qlinear_pointwise(
            q, 1.0, _ZERO_POINT, self.packed, self.weight_scale, self.weight_zero_point, None,
            1.0, 0, torch.float32, "none", [], "")
        y = acc if x.dtype == torch.float32 else torch.empty(acc.shape, dtype=x.dtype)
        if self.fused:
            torch.ops.conveyor_cpu.dequantize_rows(y, acc, scale, offset, self.colsum)
        else:
            dequantize_rows_reference(y, acc, scale, offset, self.colsum)
        return y if self.bias is None else y.add_(self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int8 weights and per-token activations, fused_quantize={self.fused}")


def quantize_linears(model: nn.Module, fused: bool | None = None) -> int:
    """Replace every ``nn.Linear`` of ``model`` but ``lm_head`` by an ``Int8Linear`` (call it before
    ``pack_linears``); returns how many. ``fused``: quantize activations with the C++ op (None:
    wherever conveyor's CPU extension builds). Raises ConfigError where int8 cannot run
    (``check_supported``)."""
    check_supported(next(model.parameters()).device)
    if fused is None:
        from conveyor.kernels import is_available   # lazy: may build the extension
        fused = is_available()
    targets = [(parent, name, linear) for parent, name, linear in linear_children(model)
               if linear is not getattr(model, "lm_head", None)]
    for parent, name, linear in targets:
        setattr(parent, name, Int8Linear(linear.weight, linear.bias, fused))
    log.info("int8: quantized %d linear layers (per-channel weights, per-token activations)",
             len(targets))
    return len(targets)
