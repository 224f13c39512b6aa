"""Which paths a model takes, the C++ ops or the torch reference, decided once.

A model asks when it is built, with the dtype and device it will run in and its head size; the
answer holds for its life, so no layer checks dtypes or devices per step. The C++ ops take
float32 and bfloat16 tensors on the CPU; the paged-attention kernel also needs a head size its
C++ switch has. Anything else takes the reference path, with one logged line saying why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from conveyor.kernels.build import LOADER, KernelLoader

SUPPORTED_HEAD_DIMS = (32, 64, 128, 256)            # the C++ switch in run_dim
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)  # what every op of the extension takes


@dataclass(frozen=True, slots=True)
class KernelDispatch:
    """attention_backend: what the layers build ("cpu" only where the kernel takes the model);
    fused_ops: whether the layers call the C++ element-wise ops (norms, RoPE, KV write, SwiGLU);
    reason: why a requested C++ path is not taken (None when it is)."""

    attention_backend: str
    fused_ops: bool
    reason: str | None = None


def decide(attention_backend: str, dtype: torch.dtype, device: torch.device | str,
           head_dim: int, fused_ops: bool | None = None,
           loader: KernelLoader = LOADER) -> KernelDispatch:
    """The paths of a model built for ``attention_backend`` on ``dtype`` / ``device``.

    fused_ops: None takes the C++ element-wise ops wherever the "cpu" backend was asked for and
    the extension runs; True / False force them (tests compare the two paths).
    """
    if attention_backend != "cpu":
        return KernelDispatch(attention_backend, bool(fused_ops))
    reason = _extension_refuses(dtype, torch.device(device), loader)
    fused = reason is None if fused_ops is None else fused_ops
    if reason is None and head_dim not in SUPPORTED_HEAD_DIMS:
        reason = f"the kernel has no head_dim={head_dim} (supports {SUPPORTED_HEAD_DIMS})"
    if reason is None:
        return KernelDispatch("cpu", fused)
    loader.warn_once(f"cpu attention: {reason}; using 'sdpa'")
    return KernelDispatch("sdpa", fused, reason)


def _extension_refuses(dtype: torch.dtype, device: torch.device,
                       loader: KernelLoader) -> str | None:
    if device.type != "cpu":
        return f"the C++ extension runs on the CPU, not {device}"
    if dtype not in SUPPORTED_DTYPES:
        return f"the C++ extension takes float32 or bfloat16, not {dtype}"
    if not loader.available():
        return "the C++ extension is unavailable"
    return None
