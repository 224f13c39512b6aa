"""The one place that answers hardware questions: device, CPU model and flags, threads, dtype.

Nothing else in conveyor sniffs hardware. ``describe()`` is logged at start and stamped on every
benchmark so numbers are only compared with numbers from the same machine.
"""

from __future__ import annotations

import os
import platform as _platform
from dataclasses import dataclass
from functools import cache

import torch

_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True, slots=True)
class CpuInfo:
    model_name: str
    flags: frozenset[str]
    num_cores: int

    @property
    def has_native_bf16(self) -> bool:
        return any(f in self.flags for f in _NATIVE_BF16_FLAGS)

    def short_flags(self) -> str:
        keep = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "fma")
        return " ".join(f for f in keep if f in self.flags)


@cache
def cpu_info() -> CpuInfo:
    model, flags = _platform.processor() or "unknown", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags":
                    flags = frozenset(value.split())
                if model != "unknown" and flags:
                    break
    except OSError:
        pass
    return CpuInfo(model, flags, os.cpu_count() or 1)


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" is CUDA when a GPU is visible, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Map a dtype name to a torch dtype; "auto" picks what the device does natively and fast.

    CPU: bf16 when the CPU has avx512_bf16 or AMX, else fp32 (emulated bf16 is ~100x slower).
    CUDA: bf16 where supported, else fp16.
    """
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_info().has_native_bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def describe(device: torch.device | None = None) -> str:
    """One line about the machine, for logs and benchmark reports."""
    info = cpu_info()
    parts = [f"cpu={info.model_name!r}", f"cores={info.num_cores}", f"flags=[{info.short_flags()}]",
             f"torch={torch.__version__}", f"threads={torch.get_num_threads()}"]
    if device is not None and device.type == "cuda":
        parts.append(f"gpu={torch.cuda.get_device_name(device)!r}")
    return " ".join(parts)
