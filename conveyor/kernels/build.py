"""Building and loading conveyor's C++ extension (``conveyor/csrc``), once per process.

One extension, one op namespace (``torch.ops.conveyor_cpu``): ``paged_attention.cpp`` (the
"cpu" attention backend's kernel, ``attention/cpu_kernel.py``), ``fused_ops.cpp`` (RMSNorm,
fused residual-add + RMSNorm, RoPE, KV write, SwiGLU, int8 row quantization: ``models/``) and
``bf16_gemm.cpp`` (bf16 linears on AVX512_BF16 builds: ``models/packed.py``).

Invariants:
- Importing this module compiles nothing; the first ``KernelLoader.available()`` builds (once
  per machine, into ``~/.cache/conveyor/ext/<hash>``; the hash covers the source, compiler,
  flags, CPU flags (host and usable), torch and Python versions) or loads the cached build.
- The build runs at most once per process: a lock serialises callers, and torch's file baton in
  the build directory serialises processes. The outcome is remembered; a failure is logged once
  (and marked on disk, so later processes skip the attempt) and callers take the torch
  reference paths. Nothing in conveyor needs a compiler.
- The target follows ``conveyor.platform``, not the compiler's host: ``KernelArch`` (generic,
  avx2, avx512, avx512_bf16) is the best the CPU runs under ``ONEDNN_MAX_CPU_ISA``, or the one
  ``CONVEYOR_CPU_KERNEL_ARCH`` names (refused if the CPU cannot run it); a value starting with
  "-" is taken as compiler flags, as given. ``-mtune=native`` only tunes, it adds no ISA.
- ``CONVEYOR_DISABLE_CPU_KERNEL=1`` forces the reference paths.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from conveyor import platform
from conveyor.errors import ConfigError
from conveyor.platform import KernelArch, cpu_info

log = logging.getLogger(__name__)

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = (_CSRC / "paged_attention.cpp", _CSRC / "fused_ops.cpp", _CSRC / "bf16_gemm.cpp",
           _CSRC / "fp32_gemm.cpp")   # one extension, one op namespace
HEADERS = (_CSRC / "exp2_poly.h",)                                    # part of the build's cache key
_EXT_NAME = "conveyor_paged_attention"
_COMMON_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast", "-Wno-unknown-pragmas", "-Wno-psabi"]
_AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c"]
_AVX512_FLAGS = [*_AVX2_FLAGS, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
ARCH_FLAGS = {KernelArch.GENERIC: [], KernelArch.AVX2: _AVX2_FLAGS, KernelArch.AVX512: _AVX512_FLAGS,
              KernelArch.AVX512_BF16: [*_AVX512_FLAGS, "-mavx512bf16"]}
_FAILED_MARKER = "build_failed.txt"
_STALE_LOCK_S = 600.0


class KernelUnavailable(RuntimeError):
    """The extension cannot be built here (no compiler, no ninja, compile error)."""


def _compiler() -> str:
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx)
    if path is None:
        raise KernelUnavailable(f"no C++ compiler ({cxx!r} not on PATH; set CXX)")
    return path


def _compiler_accepts(flags: list[str]) -> bool:
    probe = subprocess.run([_compiler(), *flags, "-x", "c++", "-E", "-", "-o", os.devnull],
                           input=b"", capture_output=True)
    return probe.returncode == 0


def arch_flags() -> list[str]:
    """Target flags of the build: ``CONVEYOR_CPU_KERNEL_ARCH`` as compiler flags when it starts
    with "-", else those of ``platform.resolve_kernel_arch`` (plus -mtune=native where the
    compiler takes it). Raises KernelUnavailable for an arch the CPU cannot run."""
    override = os.environ.get(platform.KERNEL_ARCH_ENV, "").strip()
    if override.startswith("-"):
        return override.split()
    try:
        arch = platform.resolve_kernel_arch(override)
    except ConfigError as exc:
        raise KernelUnavailable(str(exc)) from exc
    flags = list(ARCH_FLAGS[arch])
    if not _compiler_accepts(flags):
        raise KernelUnavailable(f"{_compiler()} does not take {' '.join(flags)} (arch {arch.value})")
    return flags + (["-mtune=native"] if _compiler_accepts(["-mtune=native"]) else [])


def build_dir(flags: list[str]) -> Path:
    """Cache directory of the build for this source, toolchain, flags and CPU."""
    version = subprocess.run([_compiler(), "--version"], capture_output=True, text=True).stdout
    cpu = cpu_info()
    key = "\n".join([*(src.read_text() for src in SOURCES + HEADERS), version, " ".join(flags),
                     " ".join(sorted(cpu.flags)), " ".join(sorted(cpu.host_flags)),
                     torch.__version__, sys.version])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "conveyor" / "ext" / digest


def _clear_stale_lock(directory: Path) -> None:
    """torch's build lock is a plain file: a build killed midway leaves it behind and every later
    build would wait on it forever. Builds take well under a minute, so an old one is stale."""
    lock = directory / "lock"
    try:
        if time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
            lock.unlink()
    except FileNotFoundError:
        pass


def _op_registered() -> bool:
    try:
        torch.ops.conveyor_cpu.paged_attention
    except (AttributeError, RuntimeError):
        return False
    return True


def build_and_load() -> None:
    """Compile (or reuse the cached build of) the extension and register its op.

    Raises KernelUnavailable when it cannot; never partially registers the op.
    """
    if _op_registered():
        return
    if os.environ.get("CONVEYOR_DISABLE_CPU_KERNEL") == "1":
        raise KernelUnavailable("disabled by CONVEYOR_DISABLE_CPU_KERNEL=1")
    from torch.utils import cpp_extension   # heavy import, only when building
    if not cpp_extension.is_ninja_available():
        raise KernelUnavailable("ninja not found (pip install ninja)")
    flags = arch_flags() + _COMMON_FLAGS
    directory = build_dir(flags)
    marker = directory / _FAILED_MARKER
    if marker.exists():
        raise KernelUnavailable(f"an earlier build failed; see {marker} (delete it to retry)")
    directory.mkdir(parents=True, exist_ok=True)
    _clear_stale_lock(directory)
    start = time.perf_counter()
    try:
        cpp_extension.load(_EXT_NAME, [str(src) for src in SOURCES], extra_cflags=flags,
                           extra_ldflags=["-fopenmp"], build_directory=str(directory),
                           is_python_module=False, verbose=False)
    except Exception as exc:   # compiler/linker errors arrive as several exception types
        marker.write_text(f"{type(exc).__name__}: {exc}\n")
        raise KernelUnavailable(f"build failed: {exc}") from exc
    log.info("cpu attention kernel ready in %.1fs (%s; %s)", time.perf_counter() - start,
             " ".join(flags), directory)


class KernelLoader:
    """Builds/loads the kernel on the first ``available()`` call, thread-safely, and remembers
    whether that worked. ``build`` is injectable so tests can simulate a machine without one."""

    def __init__(self, build: Callable[[], None] = build_and_load):
        self._build = build
        self._lock = threading.Lock()
        self._ok: bool | None = None
        self._warned: set[str] = set()

    def available(self) -> bool:
        with self._lock:
            if self._ok is None:
                try:
                    self._build()
                    self._ok = True
                except Exception as exc:   # any failure just means "use the fallback"
                    self._warn(f"cpu attention kernel unavailable, using 'sdpa' instead: {exc}")
                    self._ok = False
            return self._ok

    def warn_once(self, message: str) -> None:
        with self._lock:
            self._warn(message)

    def _warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning(message.splitlines()[0][:500])


# The op registry is process-wide (torch.ops), so its loader is too.
LOADER = KernelLoader()


def is_available() -> bool:
    """True when the kernel is built and loaded (builds it on the first call)."""
    return LOADER.available()
