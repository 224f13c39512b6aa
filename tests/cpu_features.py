"""Skip markers for tests that need a CPU feature: the skip reason names the feature and why it
is missing (this CPU lacks it, or ONEDNN_MAX_CPU_ISA hides it); where it exists the test runs.

Features are ``conveyor.platform.FEATURES`` names ("avx2", "avx512", "bf16_prepack",
"native_bf16", "vnni") or single /proc/cpuinfo flags ("avx512_bf16")."""

from __future__ import annotations

import pytest

from conveyor import platform


def requires_cpu(*features: str) -> pytest.MarkDecorator:
    """``skipif`` unless this CPU (under the ISA cap) has every one of ``features``."""
    missing = [m for m in map(platform.cpu_info().missing, features) if m]
    return pytest.mark.skipif(bool(missing), reason="; ".join(missing))
