"""The one place that answers hardware questions: device, CPU model and flags, threads, dtype, and
which code path this CPU can run.

Nothing else in conveyor sniffs hardware: ``models/packed.py``, ``models/int8.py``, the C++
kernel build and ``--dtype auto`` ask the named capabilities of ``cpu_info()``. ``describe()``
is logged at start and stamped on every benchmark, so numbers are only compared with numbers
from the same machine and the same decisions.

Decision table (features are any-of alternatives over /proc/cpuinfo flags):

| capability         | needs                                         | decides                          |
|--------------------|-----------------------------------------------|----------------------------------|
| has_avx2           | avx2 + fma                                    | kernel arch avx2                 |
| has_avx512         | avx512f + avx512bw + avx512vl + avx512dq      | kernel arch avx512               |
| can_prepack_bf16   | has_avx512, or avx_ne_convert + avx_vnni_int8 | bf16 linears prepacked for oneDNN|
| has_native_bf16    | avx512_bf16 or amx_bf16                       | --dtype auto = bf16; kernel bf16 |
| bf16_gemm          | kernel arch avx512_bf16, no amx_bf16          | bf16 linears: conveyor's GEMM    |
| fp32_gemm          | kernel arch avx2 (no avx512)                  | fp32 linears: conveyor's GEMM    |
| has_vnni           | avx512_vnni, avx_vnni or amx_int8             | --quantization int8 allowed      |

``bf16_gemm`` names who multiplies bf16 linears: "conveyor" (``csrc/bf16_gemm.cpp``, faster at
decode sizes), "onednn" (prepacked) where oneDNN can prepack bf16, else "plain" (``nn.Linear``).
AMX CPUs keep oneDNN, whose AMX tiles this kernel does not use. ``bf16_gemm_path()`` is that
decision in this process: a kernel build below avx512_bf16 (``CONVEYOR_CPU_KERNEL_ARCH``) or
``CONVEYOR_DISABLE_BF16_GEMM=1`` keeps oneDNN; ``describe()`` and ``models/packed.py`` both
ask it. ``fp32_gemm`` likewise: "conveyor" (``csrc/fp32_gemm.cpp``) on AVX2 CPUs without
AVX-512, where oneDNN's fp32 GEMM is slower at decode sizes and level at hundreds of rows; with
AVX-512 oneDNN's is faster beyond 6 rows and stays (``fp32_gemm_path()``, off switch
``CONVEYOR_DISABLE_FP32_GEMM=1``).

So Zen 3 / Zen 1 (AVX2 + FMA): fp32 by default, bf16 runs on plain linears (slow), int8 refused;
Skylake-X (AVX-512, no VNNI/bf16): bf16 prepacked but emulated, int8 refused; Alder Lake (AVX2 +
avx_vnni): int8 allowed, bf16 plain; Cascade Lake: + int8; Zen 4/5, Sapphire Rapids: everything.

Invariant: the flags every decision reads are the CPU's flags with those above
``ONEDNN_MAX_CPU_ISA`` masked, with oneDNN's ISA levels and partial order, so each decision
follows what oneDNN will actually run (oneDNN with AVX2 cannot prepack bf16, and its u8 x s8
GEMM without VNNI saturates in int16) and a capped run on a big CPU takes the small CPU's paths.
"""

from __future__ import annotations

import enum
import logging
import os
import platform as _platform
from dataclasses import dataclass
from functools import cache

import torch

from conveyor.errors import ConfigError

log = logging.getLogger(__name__)

ISA_CAP_ENV = "ONEDNN_MAX_CPU_ISA"
KERNEL_ARCH_ENV = "CONVEYOR_CPU_KERNEL_ARCH"
BF16_GEMM_OFF_ENV = "CONVEYOR_DISABLE_BF16_GEMM"
FP32_GEMM_OFF_ENV = "CONVEYOR_DISABLE_FP32_GEMM"

# Named features: any one alternative (all of its flags) suffices.
_AVX512_CORE = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})
FEATURES: dict[str, tuple[frozenset[str], ...]] = {
    "avx2": (frozenset({"avx2", "fma"}),),
    "avx512": (_AVX512_CORE,),
    "bf16_prepack": (_AVX512_CORE, frozenset({"avx_ne_convert", "avx_vnni_int8"})),
    "native_bf16": (frozenset({"avx512_bf16"}), frozenset({"amx_bf16"})),
    "vnni": (frozenset({"avx512_vnni"}), frozenset({"avx_vnni"}), frozenset({"amx_int8"})),
}

# oneDNN ISA bits and the flags each one unlocks; any other avx512* flag counts as avx512_core.
_BIT_OF_FLAG = {"avx": "avx", "avx2": "avx2", "fma": "avx2", "avx_vnni": "avx_vnni",
                "avx_vnni_int8": "avx_vnni_2", "avx_ne_convert": "avx_vnni_2",
                "avx512_vnni": "avx512_vnni", "avx512_bf16": "avx512_bf16",
                "avx512_fp16": "avx512_fp16", "amx_fp16": "amx_fp16"}
_AVX2_BITS = ("avx", "avx2")
_CORE_BITS = (*_AVX2_BITS, "avx512_core")
_FP16_BITS = (*_CORE_BITS, "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni")
# ONEDNN_MAX_CPU_ISA value -> the bits it allows (oneDNN's documented partial order)
ISA_LEVELS: dict[str, frozenset[str]] = {k: frozenset(v) for k, v in {
    "SSE41": (), "AVX": ("avx",), "AVX2": _AVX2_BITS,
    "AVX2_VNNI": (*_AVX2_BITS, "avx_vnni"), "AVX2_VNNI_2": (*_AVX2_BITS, "avx_vnni", "avx_vnni_2"),
    "AVX512_CORE": _CORE_BITS, "AVX512_CORE_VNNI": (*_CORE_BITS, "avx512_vnni"),
    "AVX512_CORE_BF16": (*_CORE_BITS, "avx512_vnni", "avx512_bf16"),
    "AVX10_1_512": _FP16_BITS, "AVX512_CORE_FP16": _FP16_BITS,
    "AVX10_1_512_AMX": (*_FP16_BITS, "amx"), "AVX512_CORE_AMX": (*_FP16_BITS, "amx"),
    "AVX10_1_512_AMX_FP16": (*_FP16_BITS, "amx", "amx_fp16"),
    "AVX512_CORE_AMX_FP16": (*_FP16_BITS, "amx", "amx_fp16"),
}.items()}
_NO_CAP = ("", "DEFAULT", "ALL")


def _isa_bit(flag: str) -> str | None:
    if flag in _BIT_OF_FLAG:
        return _BIT_OF_FLAG[flag]
    if flag.startswith("avx512"):
        return "avx512_core"
    return "amx" if flag.startswith("amx_") else None


def parse_isa_cap(value: str | None) -> str | None:
    """The ``ONEDNN_MAX_CPU_ISA`` level in force, or None for none. Unknown values are ignored
    (as oneDNN ignores them), with a warning; case does not matter, spaces do (as in oneDNN)."""
    name = (value or "").upper()
    if name in _NO_CAP:
        return None
    if name not in ISA_LEVELS:
        log.warning("%s=%s is not an ISA level conveyor knows (%s); ignoring it", ISA_CAP_ENV,
                    value, ", ".join(ISA_LEVELS))
        return None
    return name


def mask_flags(flags: frozenset[str], isa_cap: str | None) -> frozenset[str]:
    """``flags`` without those whose oneDNN ISA bit is above ``isa_cap``."""
    if isa_cap is None:
        return flags
    allowed = ISA_LEVELS[isa_cap]
    return frozenset(f for f in flags if _isa_bit(f) in (None, *allowed))


class KernelArch(enum.Enum):
    """Targets of the C++ extension build, best last; each needs the features listed."""

    GENERIC = "generic"
    AVX2 = "avx2"
    AVX512 = "avx512"
    AVX512_BF16 = "avx512_bf16"

    @property
    def features(self) -> tuple[str, ...]:
        return {"generic": (), "avx2": ("avx2",), "avx512": ("avx2", "avx512"),
                "avx512_bf16": ("avx2", "avx512", "native_bf16")}[self.value]


@dataclass(frozen=True, slots=True)
class CpuInfo:
    """A CPU as conveyor sees it: ``flags`` are the usable ones (the ISA cap applied),
    ``host_flags`` all that /proc/cpuinfo lists."""

    model_name: str
    flags: frozenset[str]
    num_cores: int
    isa_cap: str | None = None
    host_flags: frozenset[str] = frozenset()

    @classmethod
    def of(cls, flags, isa_cap: str | None = None, model_name: str = "unknown",
           num_cores: int = 1) -> "CpuInfo":
        """The CpuInfo of a CPU with these host flags under ``isa_cap`` (a level name)."""
        host = frozenset(flags)
        return cls(model_name, mask_flags(host, isa_cap), num_cores, isa_cap, host)

    def has(self, feature: str) -> bool:
        """A named feature of ``FEATURES``, or a single flag, after the ISA cap."""
        return any(alt <= self.flags for alt in FEATURES.get(feature, (frozenset({feature}),)))

    def missing(self, feature: str) -> str | None:
        """None when ``has(feature)``, else one line naming the feature and why it is missing."""
        if self.has(feature):
            return None
        alts = FEATURES.get(feature, (frozenset({feature}),))
        need = " or ".join("+".join(sorted(alt)) for alt in alts)
        hidden = any(alt <= self.host_flags for alt in alts)
        why = f"hidden by {ISA_CAP_ENV}={self.isa_cap}" if hidden else "this CPU lacks it"
        return f"needs CPU feature {feature} ({need}); {why}"

    has_avx2 = property(lambda self: self.has("avx2"))
    has_avx512 = property(lambda self: self.has("avx512"))
    can_prepack_bf16 = property(lambda self: self.has("bf16_prepack"))
    has_native_bf16 = property(lambda self: self.has("native_bf16"))
    has_vnni = property(lambda self: self.has("vnni"))

    @property
    def bf16_gemm(self) -> str:
        """Who multiplies bf16 linears (see the decision table)."""
        if self.kernel_arch == KernelArch.AVX512_BF16 and not self.has("amx_bf16"):
            return "conveyor"
        return "onednn" if self.can_prepack_bf16 else "plain"

    @property
    def fp32_gemm(self) -> str:
        """Who multiplies fp32 linears (see the decision table)."""
        return "conveyor" if self.kernel_arch == KernelArch.AVX2 else "onednn"

    @property
    def kernel_arch(self) -> KernelArch:
        """The best C++ kernel target this CPU runs."""
        return [a for a in KernelArch if all(self.has(f) for f in a.features)][-1]

    def short_flags(self) -> str:
        keep = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16",
                "amx_int8", "fma")
        return " ".join(f for f in keep if f in self.flags)

    def decisions(self, bf16_gemm: str | None = None, fp32_gemm: str | None = None) -> str:
        """The paths this CPU takes, for ``describe()`` (``bf16_gemm``, ``fp32_gemm``: this
        process's, as ``bf16_gemm_path`` / ``fp32_gemm_path`` say; default the CPU's)."""
        bf16 = ("native" if self.has_native_bf16 else "emulated") + {
            "conveyor": "+conveyor_gemm", "onednn": "+prepacked", "plain": "+plain"}[
                bf16_gemm or self.bf16_gemm]
        return (f"auto_dtype={'bfloat16' if self.has_native_bf16 else 'float32'} bf16={bf16} "
                f"int8={'ok' if self.has_vnni else 'refused'} kernel={self.kernel_arch.value} "
                f"fp32={'conveyor_gemm' if (fp32_gemm or self.fp32_gemm) == 'conveyor' else 'prepacked'}")


def _read_proc_cpuinfo() -> tuple[str, frozenset[str]]:
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
    return model, flags


@cache
def cpu_info() -> CpuInfo:
    """This machine's CPU under ``ONEDNN_MAX_CPU_ISA`` (read once per process, like oneDNN)."""
    model, flags = _read_proc_cpuinfo()
    return CpuInfo.of(flags, parse_isa_cap(os.environ.get(ISA_CAP_ENV)), model,
                      os.cpu_count() or 1)


def resolve_kernel_arch(value: str | None, cpu: CpuInfo | None = None) -> KernelArch:
    """``CONVEYOR_CPU_KERNEL_ARCH`` (a ``KernelArch`` name) or, unset, the best the CPU runs.
    Raises ConfigError for an unknown name or a target the CPU cannot run."""
    cpu = cpu or cpu_info()
    if not value:
        return cpu.kernel_arch
    try:
        arch = KernelArch(value.strip().lower())
    except ValueError:
        raise ConfigError(f"{KERNEL_ARCH_ENV}={value!r}: use one of "
                          f"{[a.value for a in KernelArch]} or compiler flags starting with '-'",
                          KERNEL_ARCH_ENV) from None
    lacking = [m for m in map(cpu.missing, arch.features) if m]
    if lacking:
        raise ConfigError(f"{KERNEL_ARCH_ENV}={arch.value} {lacking[0]}; use "
                          f"{cpu.kernel_arch.value} or unset it", KERNEL_ARCH_ENV)
    return arch


def _build_has(arch: KernelArch, flags: frozenset[str]) -> bool:
    """Whether the kernel build ``CONVEYOR_CPU_KERNEL_ARCH`` asks for has code that needs
    ``arch``: unset, the CPU's best (which the caller's decision already required); a named
    arch, that one or a higher one; compiler flags, all of ``flags`` or ``-march=native``. (An
    unknown name is refused at build.)"""
    value = os.environ.get(KERNEL_ARCH_ENV, "").strip()
    if not value:
        return True
    if value.startswith("-"):
        given = set(value.split())
        return "-march=native" in given or flags <= given
    order = list(KernelArch)
    try:
        return order.index(KernelArch(value.lower())) >= order.index(arch)
    except ValueError:
        return False


def bf16_gemm_path(cpu: CpuInfo | None = None) -> str:
    """Who multiplies bf16 linears in this process: ``CpuInfo.bf16_gemm``, kept at oneDNN (or
    plain) by ``CONVEYOR_DISABLE_BF16_GEMM=1`` or a kernel build without the GEMM (see
    ``_build_has``). (``models/packed.py`` also asks the built extension whether it has the
    GEMM, the last word for ``-march`` values other than native.)"""
    cpu = cpu or cpu_info()
    if cpu.bf16_gemm != "conveyor":
        return cpu.bf16_gemm
    if (os.environ.get(BF16_GEMM_OFF_ENV) == "1"
            or not _build_has(KernelArch.AVX512_BF16, frozenset({"-mavx512bf16"}))):
        return "onednn" if cpu.can_prepack_bf16 else "plain"
    return "conveyor"


def fp32_gemm_path(cpu: CpuInfo | None = None) -> str:
    """Who multiplies fp32 linears in this process: ``CpuInfo.fp32_gemm``, kept at oneDNN by
    ``CONVEYOR_DISABLE_FP32_GEMM=1`` or a kernel build without the GEMM (see ``_build_has``)."""
    cpu = cpu or cpu_info()
    if (cpu.fp32_gemm != "conveyor" or os.environ.get(FP32_GEMM_OFF_ENV) == "1"
            or not _build_has(KernelArch.AVX2, frozenset({"-mavx2", "-mfma"}))):
        return "onednn"
    return "conveyor"


def require(feature: str, option: str, cpu: CpuInfo | None = None) -> None:
    """Refuse ``option`` at start (ConfigError, one line) when the CPU lacks ``feature``."""
    missing = (cpu or cpu_info()).missing(feature)
    if missing:
        raise ConfigError(f"{option} {missing}; drop {option} on this machine",
                          option.lstrip("-").split()[0])


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" is CUDA when a GPU is visible, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r}: expected auto, cpu or cuda[:N]", "device") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: expected auto, cpu or cuda[:N]", "device")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device!r}: no CUDA device is visible; use --device cpu",
                          "device")
    return resolved


def memory_bytes(device: torch.device) -> int | None:
    """Physical memory of ``device`` in bytes (None where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def resolve_dtype(dtype: str, device: torch.device, cpu: CpuInfo | None = None) -> torch.dtype:
    """Map a dtype name to a torch dtype; "auto" picks what the device does natively and fast.

    CPU: bf16 when ``has_native_bf16``, else fp32. An explicit bf16 without it runs (emulated;
    on plain linears where oneDNN cannot prepack bf16) and says so. CUDA: bf16 where supported,
    else fp16.
    """
    if device.type == "cuda":
        if dtype == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif device.type == "cpu":
        cpu = cpu or cpu_info()
        if dtype == "auto":
            return torch.bfloat16 if cpu.has_native_bf16 else torch.float32
        if dtype == "bfloat16" and not cpu.has_native_bf16:
            log.warning("--dtype bfloat16: %s, so bf16 is emulated%s; --dtype auto picks float32 "
                        "here", cpu.missing("native_bf16"), "" if cpu.can_prepack_bf16 else
                        " on unpacked linears (measured ~10x slower than float32 at 64 rows)")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
            "auto": torch.float32}[dtype]


def _aten_capability(info: CpuInfo) -> str:
    """ATen's vector level, flagged when it is above the oneDNN cap: ATen's own kernels
    (elementwise ops, softmax, ...) follow ``ATEN_CPU_CAPABILITY``, not ``ONEDNN_MAX_CPU_ISA``, so
    a capped run that should behave like a smaller CPU needs both."""
    aten = torch.backends.cpu.get_cpu_capability()
    if info.isa_cap is not None and aten.startswith("AVX512") \
            and "avx512_core" not in ISA_LEVELS[info.isa_cap]:
        return f"{aten}(above_isa_cap:set_ATEN_CPU_CAPABILITY=avx2)"
    return aten


def describe(device: torch.device | None = None) -> str:
    """One line about the machine and the paths it takes, for logs and benchmark reports."""
    info = cpu_info()
    parts = [f"cpu={info.model_name!r}", f"cores={info.num_cores}", f"flags=[{info.short_flags()}]"]
    if info.isa_cap is not None:
        parts.append(f"isa_cap={info.isa_cap}")
    kernel_env = os.environ.get(KERNEL_ARCH_ENV)
    parts += [f"decisions=[{info.decisions(bf16_gemm_path(info), fp32_gemm_path(info))}" + (
                  f" kernel_env={kernel_env!r}]" if kernel_env
                                                  else "]"),
              f"aten={_aten_capability(info)}",
              f"torch={torch.__version__}", f"threads={torch.get_num_threads()}"]
    if device is not None and device.type == "cuda":
        parts.append(f"gpu={torch.cuda.get_device_name(device)!r}")
    return " ".join(parts)
