"""The C++ extension's dispatch is decided once, when a model is built (``kernels.decide``):
which path each (backend, dtype, device, head size) takes, that the layers hold the decision,
and that a model built for a dtype the kernel cannot take runs the reference path with the same
numbers as the reference model."""

from __future__ import annotations

import logging

import pytest
import torch
from test_fused_ops import _ragged_inputs, tiny_arch

from conveyor import kernels
from conveyor.attention.backend import SplitAttention
from conveyor.attention.cpu_kernel import CpuAttention
from conveyor.models.llama import Attention, LlamaForCausalLM, RMSNorm
from conveyor.models.rope import RotaryEmbedding

needs_kernel = pytest.mark.skipif(not kernels.is_available(), reason="C++ kernel not built here")


def _loader(works: bool) -> kernels.KernelLoader:
    def build():
        if not works:
            raise kernels.KernelUnavailable("no C++ compiler")
    return kernels.KernelLoader(build=build)


@pytest.mark.parametrize("backend,dtype,device,head_dim,works,want", [
    ("cpu", torch.float32, "cpu", 64, True, ("cpu", True)),
    ("cpu", torch.bfloat16, "cpu", 128, True, ("cpu", True)),
    ("cpu", torch.float16, "cpu", 64, True, ("sdpa", False)),     # dtype the ops do not take
    ("cpu", torch.float32, "meta", 64, True, ("sdpa", False)),    # not the CPU
    ("cpu", torch.float32, "cpu", 64, False, ("sdpa", False)),    # no extension here
    ("cpu", torch.float32, "cpu", 80, True, ("sdpa", True)),      # no kernel for the head size
    ("sdpa", torch.float32, "cpu", 64, True, ("sdpa", False)),
    ("reference", torch.float32, "cpu", 64, True, ("reference", False)),
])
def test_decide(backend, dtype, device, head_dim, works, want):
    d = kernels.decide(backend, dtype, device, head_dim, loader=_loader(works))
    assert (d.attention_backend, d.fused_ops) == want
    assert (d.reason is None) == (d.attention_backend == backend)


def test_forced_fused_ops_and_one_warning_per_reason(caplog):
    loader = _loader(True)
    assert kernels.decide("reference", torch.float32, "cpu", 64, True, loader).fused_ops is True
    assert kernels.decide("cpu", torch.float32, "cpu", 64, False, loader).fused_ops is False
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            kernels.decide("cpu", torch.float16, "cpu", 64, loader=loader)
    assert len([r for r in caplog.records if "float16" in r.getMessage()]) == 1


def _layers(model):
    return [m for m in model.modules() if isinstance(m, (Attention, RMSNorm))]


@needs_kernel
def test_the_model_holds_the_decision():
    cfg = tiny_arch(head_dim=32)
    fast = LlamaForCausalLM(cfg, "cpu", dtype=torch.float32, device="cpu")
    assert fast.dispatch == kernels.KernelDispatch("cpu", True)
    assert all(m.fused for m in _layers(fast))
    assert all(isinstance(m.attn, CpuAttention) for m in fast.modules() if isinstance(m, Attention))
    half = LlamaForCausalLM(cfg, "cpu", dtype=torch.float16, device="cpu")
    assert half.dispatch.attention_backend == "sdpa" and not half.dispatch.fused_ops
    assert not any(m.fused for m in _layers(half))
    assert all(isinstance(m.attn, SplitAttention) for m in half.modules()
               if isinstance(m, Attention))


def test_a_model_the_kernel_cannot_take_matches_the_reference_model():
    """float16 with the "cpu" backend asked for: built on the torch paths, same numbers as a
    model built on them explicitly (nothing falls through to a C++ op at run time)."""
    cfg = tiny_arch(head_dim=32)
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg, "sdpa", fused_ops=False).eval()
    for p in ref.parameters():
        p.data.normal_(0, 0.2)
    ref = ref.to(torch.float16)
    asked = LlamaForCausalLM(cfg, "cpu", dtype=torch.float16).to(torch.float16).eval()
    asked.load_state_dict(ref.state_dict())
    for module in list(ref.modules()) + list(asked.modules()):
        if isinstance(module, RotaryEmbedding):
            module.reset_tables(cfg)
    ids, positions, caches, md = _ragged_inputs(cfg, torch.float16, 0)
    other = [c.clone() for c in caches]
    with torch.inference_mode():
        want, got = ref(ids, positions, caches, md), asked(ids, positions, other, md)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(caches, other))


@needs_kernel
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_the_fast_path_matches_the_reference_model(dtype, tol):
    """A head size the kernel has: C++ attention and fused ops vs the reference, same weights."""
    cfg = tiny_arch(head_dim=32)
    torch.manual_seed(1)
    ref = LlamaForCausalLM(cfg, "reference", fused_ops=False).eval()
    for p in ref.parameters():
        p.data.normal_(0, 0.2)
    ref = ref.to(dtype)
    fast = LlamaForCausalLM(cfg, "cpu", dtype=dtype).to(dtype).eval()
    assert fast.dispatch == kernels.KernelDispatch("cpu", True)
    fast.load_state_dict(ref.state_dict())
    for module in list(ref.modules()) + list(fast.modules()):
        if isinstance(module, RotaryEmbedding):
            module.reset_tables(cfg)
    ids, positions, caches, md = _ragged_inputs(cfg, dtype, 1)
    other = [c.clone() for c in caches]
    with torch.inference_mode():
        want, got = ref(ids, positions, caches, md), fast(ids, positions, other, md)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
