"""Which attention backend a device gets by default.

Owns the choice only; the engine passes the returned name to ``make_attention``.
"""

from __future__ import annotations

import torch


def default_backend(device: torch.device | str) -> str:
    """"cpu" (the C++ paged-attention kernel) on a CPU device where that kernel builds, else
    "sdpa". The first call on a CPU device may compile the kernel (once per machine and target,
    cached), for the target ``platform`` picks (``platform.resolve_kernel_arch``)."""
    if torch.device(device).type != "cpu":
        return "sdpa"
    from conveyor import kernels   # lazy: keeps importing this module cheap
    return "cpu" if kernels.is_available() else "sdpa"
