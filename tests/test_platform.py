"""``conveyor.platform`` decides which path a CPU runs: the decision table over fake flag sets of
real CPUs (no hardware needed), the ``ONEDNN_MAX_CPU_ISA`` cap masking flags like oneDNN does,
``--dtype auto``, the kernel arch, ``describe()``, and, on this machine under caps, that the
decisions match what oneDNN and the CLI actually do."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from conveyor import platform
from conveyor.errors import ConfigError
from conveyor.platform import CpuInfo, KernelArch

_V3 = {"sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}
_SKX = _V3 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}
CPUS = {   # /proc/cpuinfo flags that matter, as those CPUs list them
    "sandy_bridge": {"sse4_1", "sse4_2", "avx"},
    "zen1": _V3, "zen3": _V3 | {"vaes", "vpclmulqdq"},
    "alder_lake": _V3 | {"avx_vnni"},
    "skylake_x": _SKX, "cascade_lake": _SKX | {"avx512_vnni"},
    "zen4": _SKX | {"avx512_vnni", "avx512_bf16", "avx512ifma", "avx512_vbmi2"},
    "sapphire_rapids": _SKX | {"avx512_vnni", "avx512_bf16", "avx_vnni", "avx512_fp16",
                               "amx_tile", "amx_int8", "amx_bf16"},
    "aarch64": set(),
}
# avx2, avx512, bf16 prepack, native bf16, vnni (int8), kernel arch, --dtype auto
EXPECTED = {
    "sandy_bridge": (0, 0, 0, 0, 0, "generic", torch.float32),
    "zen1": (1, 0, 0, 0, 0, "avx2", torch.float32),
    "zen3": (1, 0, 0, 0, 0, "avx2", torch.float32),
    "alder_lake": (1, 0, 0, 0, 1, "avx2", torch.float32),
    "skylake_x": (1, 1, 1, 0, 0, "avx512", torch.float32),
    "cascade_lake": (1, 1, 1, 0, 1, "avx512", torch.float32),
    "zen4": (1, 1, 1, 1, 1, "avx512_bf16", torch.bfloat16),
    "sapphire_rapids": (1, 1, 1, 1, 1, "avx512_bf16", torch.bfloat16),
    "aarch64": (0, 0, 0, 0, 0, "generic", torch.float32),
}
CPU = torch.device("cpu")


BF16_GEMM = {"sandy_bridge": "plain", "zen1": "plain", "zen3": "plain", "alder_lake": "plain",
             "skylake_x": "onednn", "cascade_lake": "onednn", "zen4": "conveyor",
             "sapphire_rapids": "onednn", "aarch64": "plain"}   # AMX: oneDNN's tiles


def decisions(cpu: CpuInfo) -> tuple:
    return (int(cpu.has_avx2), int(cpu.has_avx512), int(cpu.can_prepack_bf16),
            int(cpu.has_native_bf16), int(cpu.has_vnni), cpu.kernel_arch.value,
            platform.resolve_dtype("auto", CPU, cpu))


@pytest.mark.parametrize("name", sorted(CPUS))
def test_decision_table(name):
    assert decisions(CpuInfo.of(CPUS[name])) == EXPECTED[name]
    assert CpuInfo.of(CPUS[name]).bf16_gemm == BF16_GEMM[name]


def test_bf16_gemm_follows_the_isa_cap():
    """Capped below AMX a Sapphire Rapids is a Zen 4 to the GEMM decision too; capped below
    AVX512_BF16, oneDNN (or plain linears) again."""
    spr = CPUS["sapphire_rapids"]
    assert [CpuInfo.of(spr, cap).bf16_gemm for cap in
            ("AVX512_CORE_AMX", "AVX512_CORE_BF16", "AVX512_CORE_VNNI", "AVX2")] == \
        ["onednn", "conveyor", "onednn", "plain"]
    assert "bf16=native+conveyor_gemm " in CpuInfo.of(CPUS["zen4"]).decisions()


# Sapphire Rapids capped at each oneDNN level takes the paths of the CPU that level describes.
@pytest.mark.parametrize("cap, like", [
    ("SSE41", None), ("AVX", "sandy_bridge"), ("AVX2", "zen3"), ("AVX2_VNNI", "alder_lake"),
    ("AVX512_CORE", "skylake_x"), ("AVX512_CORE_VNNI", "cascade_lake"),
    ("AVX512_CORE_BF16", "zen4"), ("AVX512_CORE_AMX", "sapphire_rapids"),
])
def test_isa_cap_masks_flags_above_its_level(cap, like):
    capped = CpuInfo.of(CPUS["sapphire_rapids"], cap)
    want = EXPECTED[like] if like else (0, 0, 0, 0, 0, "generic", torch.float32)
    assert decisions(capped) == want
    assert capped.isa_cap == cap and capped.host_flags == frozenset(CPUS["sapphire_rapids"])
    assert "sse4_2" in capped.flags                       # flags below every level stay
    if cap in ("AVX2", "AVX2_VNNI"):
        assert not any(f.startswith(("avx512", "amx")) for f in capped.flags)
    if cap == "AVX512_CORE":                              # avx_vnni sits beside, not below, it
        assert "avx_vnni" not in capped.flags and "avx512f" in capped.flags


def test_isa_cap_only_hides_flags():
    for name, flags in CPUS.items():
        assert CpuInfo.of(flags, "AVX512_CORE_AMX_FP16").flags == frozenset(flags), name
    assert decisions(CpuInfo.of(CPUS["zen3"], "AVX512_CORE_BF16")) == EXPECTED["zen3"]


def test_isa_cap_parsing_follows_onednn(caplog):
    assert platform.parse_isa_cap("avx2") == "AVX2"               # case-insensitive
    assert platform.parse_isa_cap("AVX512_CORE_FP16") == "AVX512_CORE_FP16"
    for none in (None, "", "DEFAULT", "all"):
        assert platform.parse_isa_cap(none) is None
    with caplog.at_level(logging.WARNING, logger="conveyor.platform"):
        assert platform.parse_isa_cap("AVX3") is None             # oneDNN ignores it too
        assert platform.parse_isa_cap(" AVX2") is None
    assert "ONEDNN_MAX_CPU_ISA=AVX3 is not an ISA level" in caplog.text


def test_missing_names_the_feature_and_why():
    assert CpuInfo.of(CPUS["zen4"]).missing("vnni") is None
    zen3 = CpuInfo.of(CPUS["zen3"]).missing("vnni")
    assert "vnni" in zen3 and "avx512_vnni" in zen3 and "this CPU lacks it" in zen3
    capped = CpuInfo.of(CPUS["sapphire_rapids"], "AVX2").missing("avx512_bf16")   # a plain flag
    assert capped == "needs CPU feature avx512_bf16 (avx512_bf16); hidden by ONEDNN_MAX_CPU_ISA=AVX2"


def test_require_refuses_in_one_line():
    with pytest.raises(ConfigError, match="--quantization int8 needs CPU feature vnni") as exc:
        platform.require("vnni", "--quantization int8", CpuInfo.of(CPUS["skylake_x"]))
    assert "\n" not in str(exc.value) and exc.value.param == "quantization"
    platform.require("vnni", "--quantization int8", CpuInfo.of(CPUS["alder_lake"]))


def test_explicit_bf16_without_native_bf16_runs_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="conveyor.platform"):
        assert platform.resolve_dtype("bfloat16", CPU, CpuInfo.of(CPUS["zen3"])) == torch.bfloat16
    assert "native_bf16" in caplog.text and "unpacked linears" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="conveyor.platform"):
        assert platform.resolve_dtype("bfloat16", CPU, CpuInfo.of(CPUS["zen4"])) == torch.bfloat16
        assert platform.resolve_dtype("float32", CPU, CpuInfo.of(CPUS["zen3"])) == torch.float32
    assert not caplog.records


def test_kernel_arch_follows_platform_and_refuses_what_the_cpu_cannot_run():
    spr, zen3 = CpuInfo.of(CPUS["sapphire_rapids"]), CpuInfo.of(CPUS["zen3"])
    assert platform.resolve_kernel_arch(None, spr) is KernelArch.AVX512_BF16
    assert platform.resolve_kernel_arch(None, CpuInfo.of(CPUS["sapphire_rapids"], "AVX2")) \
        is KernelArch.AVX2
    assert platform.resolve_kernel_arch("AVX2", spr) is KernelArch.AVX2
    assert platform.resolve_kernel_arch("generic", zen3) is KernelArch.GENERIC
    with pytest.raises(ConfigError, match="CONVEYOR_CPU_KERNEL_ARCH=avx512 needs CPU feature avx512"):
        platform.resolve_kernel_arch("avx512", zen3)
    with pytest.raises(ConfigError, match="use one of"):
        platform.resolve_kernel_arch("skylake", spr)


def test_kernel_build_flags_follow_platform(monkeypatch):
    import shutil

    from conveyor import kernels
    if not shutil.which(os.environ.get("CXX", "c++")):
        pytest.skip("no C++ compiler")
    monkeypatch.delenv(platform.KERNEL_ARCH_ENV, raising=False)
    monkeypatch.setattr(platform, "cpu_info", lambda: CpuInfo.of(CPUS["sapphire_rapids"], "AVX2"))
    flags = kernels.arch_flags()
    assert "-mavx2" in flags and not any("avx512" in f or "march" in f for f in flags)
    monkeypatch.setenv(platform.KERNEL_ARCH_ENV, "avx512")                  # above the cap
    with pytest.raises(kernels.KernelUnavailable, match="hidden by ONEDNN_MAX_CPU_ISA=AVX2"):
        kernels.arch_flags()
    monkeypatch.setenv(platform.KERNEL_ARCH_ENV, "-mavx2 -mfma")            # raw flags, as given
    assert kernels.arch_flags() == ["-mavx2", "-mfma"]
    monkeypatch.setenv(platform.KERNEL_ARCH_ENV, "generic")
    generic = kernels.arch_flags()
    assert not any(f.startswith("-mavx") for f in generic)
    assert kernels.build_dir(generic) != kernels.build_dir(flags)     # in the cache key


def test_kernel_build_cache_is_keyed_by_the_cpu_not_only_the_flags(monkeypatch, tmp_path):
    """A cache dir shared between machines (CI cache, NFS home) never hands a Zen 4 build to a
    Zen 3 (SIGILL): the same flags on another CPU, or under another ISA cap, is another build."""
    import shutil

    from conveyor.kernels import build
    if not shutil.which(os.environ.get("CXX", "c++")):
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    flags = ["-march=native", "-O3"]              # same flags, different meaning per CPU

    def key_on(cpu: CpuInfo):
        monkeypatch.setattr(build, "cpu_info", lambda: cpu)
        return build.build_dir(flags)

    zen4, zen3 = key_on(CpuInfo.of(CPUS["zen4"])), key_on(CpuInfo.of(CPUS["zen3"]))
    capped = key_on(CpuInfo.of(CPUS["zen4"], "AVX2"))
    assert len({zen4, zen3, capped}) == 3
    assert key_on(CpuInfo.of(CPUS["zen4"])) == zen4              # and stable on one machine
    assert zen4.parent == tmp_path / "conveyor" / "ext"
    monkeypatch.setattr(build, "cpu_info", lambda: CpuInfo.of(CPUS["zen4"]))
    assert build.build_dir(flags + ["-mavx512bf16"]) != zen4      # the flags are in it too


@pytest.mark.skipif(not os.environ.get(platform.KERNEL_ARCH_ENV, "").strip().isidentifier(),
                    reason="CONVEYOR_CPU_KERNEL_ARCH does not name an arch in this run")
def test_the_named_kernel_arch_is_the_one_built_and_loaded():
    """A run under CONVEYOR_CPU_KERNEL_ARCH=<arch> really tests that arch: no silent fallback."""
    from conveyor import kernels
    arch = platform.resolve_kernel_arch(os.environ[platform.KERNEL_ARCH_ENV])
    assert kernels.arch_flags()[:len(kernels.ARCH_FLAGS[arch])] == kernels.ARCH_FLAGS[arch]
    assert kernels.is_available()


def test_describe_states_the_decisions_and_the_cap(monkeypatch):
    monkeypatch.setattr(platform, "cpu_info", lambda: CpuInfo.of(CPUS["sapphire_rapids"], "AVX2"))
    monkeypatch.setenv(platform.KERNEL_ARCH_ENV, "generic")
    line = platform.describe(CPU)
    for part in ("isa_cap=AVX2", "auto_dtype=float32", "bf16=emulated+plain", "int8=refused",
                 "kernel=avx2", "kernel_env='generic'", "aten="):
        assert part in line, line
    # ATen's own kernels ignore the oneDNN cap: a capped run says when they are above it
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert "aten=AVX512(above_isa_cap:set_ATEN_CPU_CAPABILITY=avx2)" in platform.describe(CPU)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert " aten=AVX2 " in platform.describe(CPU)
    monkeypatch.setattr(platform, "cpu_info", lambda: CpuInfo.of(CPUS["zen4"]))
    monkeypatch.delenv(platform.KERNEL_ARCH_ENV)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    line = platform.describe(CPU)
    assert "isa_cap" not in line and "int8=ok kernel=avx512_bf16" in line
    assert " aten=AVX512 " in line


def _only_env(monkeypatch, env: dict[str, str]) -> None:
    """The GEMM switches and the kernel arch as ``env`` gives them, the others unset."""
    for name in (platform.BF16_GEMM_OFF_ENV, platform.FP32_GEMM_OFF_ENV, platform.KERNEL_ARCH_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("env, want", [
    ({}, "conveyor"),
    ({platform.BF16_GEMM_OFF_ENV: "1"}, "onednn"),
    ({platform.KERNEL_ARCH_ENV: "avx512_bf16"}, "conveyor"),
    ({platform.KERNEL_ARCH_ENV: "avx512"}, "onednn"),
    ({platform.KERNEL_ARCH_ENV: "avx2"}, "onednn"),
    ({platform.KERNEL_ARCH_ENV: "-mavx2 -mfma"}, "onednn"),
    ({platform.KERNEL_ARCH_ENV: "-march=native"}, "conveyor"),
    ({platform.KERNEL_ARCH_ENV: "-mavx512f -mavx512bw -mavx512bf16"}, "conveyor"),
])
def test_bf16_gemm_path_follows_the_kernel_build_and_the_off_switch(monkeypatch, env, want):
    """What this process multiplies bf16 linears with, as describe() states it and
    models/packed.py takes it: the CPU's choice unless the kernel build lacks the GEMM."""
    _only_env(monkeypatch, env)
    zen4 = CpuInfo.of(CPUS["zen4"])
    assert platform.bf16_gemm_path(zen4) == want
    monkeypatch.setattr(platform, "cpu_info", lambda: zen4)
    label = {"conveyor": "+conveyor_gemm", "onednn": "+prepacked"}[want]
    assert f"bf16=native{label} " in platform.describe(CPU)
    # CPUs whose choice is not conveyor's GEMM keep it whatever the build
    assert platform.bf16_gemm_path(CpuInfo.of(CPUS["sapphire_rapids"])) == "onednn"
    assert platform.bf16_gemm_path(CpuInfo.of(CPUS["zen3"])) == "plain"


@pytest.mark.parametrize("env, want", [
    ({}, "conveyor"),
    ({platform.FP32_GEMM_OFF_ENV: "1"}, "onednn"),
    ({platform.KERNEL_ARCH_ENV: "avx2"}, "conveyor"),
    ({platform.KERNEL_ARCH_ENV: "generic"}, "onednn"),
    ({platform.KERNEL_ARCH_ENV: "-mavx2 -mfma"}, "conveyor"),
    ({platform.KERNEL_ARCH_ENV: "-msse4.2"}, "onednn"),
])
def test_fp32_gemm_path_is_conveyors_on_avx2_cpus_only(monkeypatch, env, want):
    _only_env(monkeypatch, env)
    zen3 = CpuInfo.of(CPUS["zen3"])
    assert platform.bf16_gemm_path(zen3) == "plain" and platform.fp32_gemm_path(zen3) == want
    monkeypatch.setattr(platform, "cpu_info", lambda: zen3)
    label = "conveyor_gemm" if want == "conveyor" else "prepacked"
    assert f" fp32={label}]" in platform.describe(CPU) or f" fp32={label} " in platform.describe(CPU)
    for name in ("zen4", "skylake_x", "sapphire_rapids", "sandy_bridge"):   # AVX-512 or no AVX2
        assert platform.fp32_gemm_path(CpuInfo.of(CPUS[name])) == "onednn", name
    # an AVX-512 CPU capped at AVX2 takes the AVX2 CPU's path
    assert platform.fp32_gemm_path(CpuInfo.of(CPUS["zen4"], "AVX2")) == want


def test_bf16_prepack_decision_agrees_with_onednn():
    """This machine, under whatever ONEDNN_MAX_CPU_ISA the run has: platform and oneDNN agree."""
    cpu, onednn = platform.cpu_info(), torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if onednn and not cpu.can_prepack_bf16 and not cpu.has_avx512:
        pytest.skip("oneDNN has bf16 through AVX-NE-CONVERT, which /proc/cpuinfo does not list")
    assert cpu.can_prepack_bf16 == onednn


_PROBE = """
import json, shutil, torch
from torch import nn
from conveyor import kernels, platform
from conveyor.errors import ConfigError
from conveyor.models.int8 import Int8Linear, check_supported, quantize_rows_reference, quantize_weight
from conveyor.models.packed import pack_linears
cpu, out = platform.cpu_info(), {}
out["flags"] = sorted(cpu.flags)
try:
    torch.ops.mkldnn._reorder_linear_weight(torch.randn(8, 16).bfloat16(), 4)
    out["onednn_bf16"] = True
except RuntimeError:
    out["onednn_bf16"] = False
model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8)).bfloat16()
x = torch.randn(5, 16).bfloat16()
want = model(x)
out["bf16_packed"] = pack_linears(model)
out["bf16_err"] = (model(x) - want).abs().max().item()
out["bf16_kernels"] = [getattr(m, "kernel", None) for m in model]
try:
    check_supported(torch.device("cpu"))
    lin = nn.Linear(96, 80)
    x = torch.randn(64, 96) * 2
    qw, ws = quantize_weight(lin.weight)
    qx, xs, xo = quantize_rows_reference(x)
    exact = ((qx.int() - 128).float() * xs[:, None] + xo[:, None]) @ (qw.float() * ws[:, None]).t()
    out["int8_err"] = (Int8Linear(lin.weight, None, False)(x) - exact).abs().max().item()
except ConfigError as exc:
    out["int8_refused"] = str(exc)
out["kernel_flags"] = kernels.arch_flags() if shutil.which("c++") else None
print(json.dumps(out))
"""


@pytest.mark.parametrize("cap", ["AVX2", "AVX512_CORE"])
def test_capped_run_takes_the_paths_that_work_under_the_cap(cap):
    """A fresh process under ONEDNN_MAX_CPU_ISA: platform masks what oneDNN masks, bf16 linears
    run (prepacked only where oneDNN can), int8 is exact with VNNI and refused without."""
    env = {**os.environ, platform.ISA_CAP_ENV: cap}
    env.pop(platform.KERNEL_ARCH_ENV, None)
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    want = CpuInfo.of(platform.cpu_info().host_flags, cap)
    assert got["flags"] == sorted(want.flags)
    assert got["onednn_bf16"] == want.can_prepack_bf16
    assert got["bf16_packed"] == (2 if want.can_prepack_bf16 else 0)
    assert got["bf16_err"] <= 0.05
    if want.can_prepack_bf16:   # conveyor's bf16 GEMM needs the avx512_bf16 build: not under these caps
        assert got["bf16_kernels"] == ["oneDNN", "oneDNN"]
    if want.has_vnni:
        assert got["int8_err"] < 1e-3
    else:
        assert "needs CPU feature vnni" in got["int8_refused"]
    if got["kernel_flags"] is not None:
        want_avx512 = want.kernel_arch in (KernelArch.AVX512, KernelArch.AVX512_BF16)
        assert ("-mavx512f" in got["kernel_flags"]) == want_avx512
        assert "-march=native" not in got["kernel_flags"]


def test_cli_refuses_int8_without_vnni_in_one_line(tmp_path):
    env = {**os.environ, platform.ISA_CAP_ENV: "AVX2"}
    cmd = [sys.executable, "-c", "import sys; from conveyor.cli import main; sys.exit(main())",
           "generate", "-q", "int8", "--attention-backend", "sdpa", "--max-tokens", "2", "Hello"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("error: --quantization int8 needs CPU feature vnni (avx512_vnni or "
                                "avx_vnni or amx_int8); ")
    assert errors[0].endswith("; drop --quantization int8 on this machine")
