"""The CPU fast paths against their plain-PyTorch references: the fused C++ element-wise ops
(RMSNorm, residual add + RMSNorm, RoPE, KV write, SwiGLU, row argmax), conveyor's bf16 GEMM and oneDNN-prepacked
linears, and a whole model
with both switched on vs off on ragged batches (chunked prefills, decodes, block tables with
holes, lengths that are not multiples of the block size), in fp32 and bf16; bf16 linears are
prepacked only where ``platform`` says oneDNN can (``bf16_prepack``), and run plain elsewhere."""

from __future__ import annotations

import pytest
import torch
from cpu_features import requires_cpu
from torch import nn

from conveyor import platform
from conveyor.attention import cpu_kernel
from conveyor.attention.backend import write_kv
from conveyor.models.config import ArchConfig
from conveyor.models.llama import LlamaForCausalLM, RMSNorm
from conveyor.models.packed import (PackedLinear, conveyor_gemm_takes, num_parameters, pack_linears,
                                    packing_supported)
from conveyor.models.rope import RotaryEmbedding
from test_attention import random_batch

needs_kernel = pytest.mark.skipif(not cpu_kernel.is_available(), reason="C++ kernel not built here")
needs_onednn = pytest.mark.skipif(not packing_supported(torch.device("cpu"), torch.float32),
                                  reason="no oneDNN in this torch build")
DTYPES = [torch.float32, torch.bfloat16]
PACKED_DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=requires_cpu("bf16_prepack"))]
ops = torch.ops.conveyor_cpu if cpu_kernel.is_available() else None


def tiny_arch(**kw) -> ArchConfig:
    base = dict(architecture="llama", vocab_size=300, hidden_size=64, intermediate_size=96,
                num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=True)
    base.update(kw)
    return ArchConfig(**base)


def close(a: torch.Tensor, b: torch.Tensor, dtype) -> None:
    """fp32: equal up to summation order; bf16: at most one rounding step apart."""
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(a.float(), b.float(), rtol=1.6e-2, atol=1e-2)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_reference_on_strided_rows(dtype):
    gen = torch.Generator().manual_seed(0)
    wide = (torch.randn(37, 100, generator=gen) * 3).to(dtype)
    x = wide[:, 10:74]                                          # row stride 100, not contiguous
    norm = RMSNorm(64, 1e-5).to(dtype)
    norm.weight.data = torch.randn(64, generator=gen).to(dtype)
    out = torch.empty(37, 64, dtype=dtype)
    ops.rms_norm(out, x, norm.weight, 1e-5)
    close(out, norm(x), dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_matches_reference(dtype):
    gen = torch.Generator().manual_seed(1)
    x, res = (torch.randn(2, 29, 64, generator=gen) * 2).to(dtype).unbind(0)
    norm = RMSNorm(64, 1e-6).to(dtype)
    norm.weight.data = torch.randn(64, generator=gen).to(dtype)
    want_x, want_res = norm(x.clone(), res.clone())             # reference path (fused=False)
    x2, res2 = x.clone(), res.clone()
    ops.fused_add_rms_norm(x2, res2, norm.weight, 1e-6)
    assert torch.equal(res2, want_res)                          # the add rounds exactly like torch
    close(x2, want_x, dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaling", [(), (("factor", 8.0), ("high_freq_factor", 4.0),
                                          ("low_freq_factor", 1.0),
                                          ("original_max_position_embeddings", 64),
                                          ("rope_type", "llama3"))])
def test_rotary_embedding_matches_reference_in_place_on_qkv_rows(dtype, scaling):
    cfg = tiny_arch(rope_scaling=scaling)
    rope = RotaryEmbedding(cfg)
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(23, (hq + 2 * hkv) * d, generator=gen).to(dtype)
    positions = torch.randint(0, cfg.max_position_embeddings, (23,), generator=gen)
    q, k = qkv[:, :hq * d].view(23, hq, d), qkv[:, hq * d:(hq + hkv) * d].view(23, hkv, d)
    want_q, want_k = rope(positions, q, k)
    v_before = qkv[:, (hq + hkv) * d:].clone()
    ops.rotary_embedding(qkv, positions, rope.cos, rope.sin, hq, hkv)
    close(qkv[:, :hq * d].view(23, hq, d), want_q, dtype)
    close(qkv[:, hq * d:(hq + hkv) * d].view(23, hkv, d), want_k, dtype)
    assert torch.equal(qkv[:, (hq + hkv) * d:], v_before)         # v untouched


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_matches_reference_and_checks_slots(dtype):
    q, k, v, kv, md = random_batch(3, dtype)
    hq, hkv, d = q.shape[1], k.shape[1], k.shape[2]
    qkv = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)
    want = kv.clone()
    write_kv(want, k, v, md.slot_mapping)
    ops.write_kv(kv, qkv, md.slot_mapping, hq, hkv)
    assert torch.equal(kv, want)
    bad = md.slot_mapping.clone()
    bad[0] = kv.shape[1] * kv.shape[2]
    with pytest.raises(RuntimeError, match="slot out of range"):
        ops.write_kv(kv, qkv, bad, hq, hkv)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_reference(dtype):
    gen = torch.Generator().manual_seed(4)
    wide = (torch.randn(19, 2 * 96 + 8, generator=gen) * 6).to(dtype)
    x = wide[:, 8:]                                             # strided rows
    x[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -0.0]).to(dtype)   # saturating / zero inputs
    out = torch.empty(19, 96, dtype=dtype)
    ops.silu_and_mul(out, x)
    gate, up = x.split(96, dim=-1)
    close(out, torch.nn.functional.silu(gate) * up, dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [3, 7, 64, 1000, 49152])
def test_argmax_rows_equals_torch_argmax_and_finiteness(dtype, vocab):
    """Token per row = torch.argmax (first maximum) and finite = no NaN/inf, on strided rows:
    random rows, ties (first one wins, across and within 64-blocks), a constant row, signed
    zeros, and rows with NaN, +inf and -inf (where torch's own rule, NaN above all, holds)."""
    from conveyor.runner.row_sampling import argmax_rows
    gen = torch.Generator().manual_seed(vocab)
    wide = torch.randn(14, vocab + 3, generator=gen)
    x = wide[:, 1:1 + vocab]                                     # row stride vocab + 3
    last = vocab - 1
    x[1, last // 2] = x[1, last] = 10.0                          # a tie: the first wins
    x[2] = 0.5                                                   # constant: index 0
    x[3] = -1.0
    x[3, last] = 0.0
    x[3, last // 3] = -0.0                                       # -0.0 == 0.0: the first
    x[4, last] = float("nan")
    x[5, last // 2] = float("inf")
    x[6, 0] = float("-inf")
    x[7] = float("-inf")
    x[8, last] = float("inf")
    x[8, last // 2] = float("nan")                               # NaN before or after an inf
    x[9, 0] = float("inf")
    x[9, last] = float("nan")
    x[10, last // 4] = x[10, last // 4 + 1] = 20.0               # adjacent tie (one block)
    x = x.to(dtype)
    tokens = torch.full((14,), -1, dtype=torch.long)
    finite = torch.zeros(14, dtype=torch.bool)
    ops.argmax_rows(tokens, finite, x)
    assert tokens.tolist() == x.argmax(dim=-1).tolist()
    assert finite.tolist() == x.float().isfinite().all(dim=-1).tolist()
    assert argmax_rows(x, fused=True) == argmax_rows(x, fused=False)   # the runner's two paths
    with pytest.raises(RuntimeError, match="int64"):
        ops.argmax_rows(torch.empty(14, dtype=torch.int32), finite, x)
    with pytest.raises(RuntimeError, match="bool"):
        ops.argmax_rows(tokens, torch.empty(13, dtype=torch.bool), x)


@needs_onednn
@pytest.mark.parametrize("dtype", PACKED_DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_packed_linear_equals_f_linear(dtype, bias, rows):
    gen = torch.Generator().manual_seed(rows)
    lin = nn.Linear(96, 200, bias=bias).to(dtype)
    x = torch.randn(rows, 96, generator=gen).to(dtype)
    with torch.inference_mode():
        want = lin(x)
        packed = PackedLinear(lin)
        got, got_strided = packed(x), packed(x.t().contiguous().t())   # non-contiguous input too
    # same values up to summation order (F.linear may pick another kernel, e.g. gemv for 1 row)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_strided, want, **tol)


needs_bf16_gemm = pytest.mark.skipif(
    ops is None or not ops.has_bf16_gemm(torch.empty(0)),
    reason="the C++ extension here has no bf16 GEMM (needs the avx512_bf16 kernel build)")


def _bf16_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 sums of the same bf16 inputs, the bias added in fp32, rounded to bf16 once."""
    y = x.float() @ w.float().t()
    return (y if bias is None else y + bias.float()).to(torch.bfloat16)


@needs_bf16_gemm
@pytest.mark.parametrize("n, k", [(200, 96), (64, 64), (70, 130), (16, 32), (960, 576), (576, 1536)])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 64, 133, 301])
@pytest.mark.parametrize("bias", [None, torch.float32, torch.bfloat16])
def test_bf16_gemm_equals_fp32_sums_of_the_same_inputs(n, k, rows, bias):
    """Every row count up to 13 (one x pointer per row up to 6, the pair-interleaved copy for
    7-12, 6-row chunks beyond), a partial last chunk, several row tiles at K=1536 (133: a last
    tile of 7), output widths that are not a multiple of the 32-column groups (and an odd number
    of groups), and both bias dtypes: one bf16 rounding from the reference's fp32 sums."""
    gen = torch.Generator().manual_seed(rows * 1000 + n)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    b = None if bias is None else torch.randn(n, generator=gen).to(bias)
    wide = torch.randn(rows, k + 10, generator=gen).to(torch.bfloat16)
    x = wide[:, 4:4 + k]                                  # row stride k + 10: not contiguous
    packed = ops.pack_bf16_weight(w)
    assert tuple(packed.shape) == ((n + 31) // 32, k // 2, 32, 2)
    out = torch.full((rows, n), float("nan"), dtype=torch.bfloat16)
    ops.bf16_linear(out, x, packed, torch.empty(0) if b is None else b)
    want = _bf16_reference(x, w, b)
    # one rounding apart: a bf16 ulp is 2**-7 relative; sums of ~k terms differ by order only
    torch.testing.assert_close(out.float(), want.float(), rtol=8e-3, atol=1e-3 * k ** 0.5)
    assert torch.isfinite(out).all()


@needs_bf16_gemm
def test_bf16_gemm_is_batch_invariant():
    """A row's output is bitwise the same whatever rows share its call (every path sums a row's
    feature pairs in one order): 1-6 rows, the interleaved 7-12, 6-row chunks and row tiles."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(200, 1536, generator=gen).to(torch.bfloat16)
    packed = ops.pack_bf16_weight(w)
    x = torch.randn(140, 1536, generator=gen).to(torch.bfloat16)

    def run(rows):
        out = torch.empty(rows.shape[0], 200, dtype=torch.bfloat16)
        ops.bf16_linear(out, rows, packed, torch.empty(0))
        return out

    alone = torch.cat([run(x[i:i + 1]) for i in range(140)])
    for m in (2, 6, 7, 12, 13, 31, 140):
        assert torch.equal(run(x[:m]), alone[:m]), m


@needs_bf16_gemm
def test_bf16_gemm_refuses_what_it_cannot_take():
    w = torch.randn(8, 16).to(torch.bfloat16)
    packed = ops.pack_bf16_weight(w)
    x, out = torch.randn(3, 16).to(torch.bfloat16), torch.empty(3, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="K must be even"):
        ops.pack_bf16_weight(torch.randn(8, 15).to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="must be bf16"):
        ops.bf16_linear(out, x.float(), packed, torch.empty(0))
    with pytest.raises(RuntimeError, match="do not match"):
        ops.bf16_linear(out, torch.randn(3, 18).to(torch.bfloat16), packed, torch.empty(0))
    with pytest.raises(RuntimeError, match="do not match"):
        ops.bf16_linear(torch.empty(3, 70, dtype=torch.bfloat16), x, packed, torch.empty(0))
    with pytest.raises(RuntimeError, match="bias"):
        ops.bf16_linear(out, x, packed, torch.randn(9))
    ops.bf16_linear(out, x, packed, torch.empty(0))       # still fine after the refusals
    torch.testing.assert_close(out.float(), _bf16_reference(x, w, None).float(), rtol=8e-3, atol=4e-3)


needs_fp32_gemm = pytest.mark.skipif(
    ops is None or not ops.has_fp32_gemm(torch.empty(0)),
    reason="the C++ extension here has no fp32 GEMM (needs an AVX2+FMA kernel build)")


@needs_fp32_gemm
@pytest.mark.parametrize("n, k", [(200, 96), (64, 64), (70, 130), (16, 33), (960, 576), (576, 1536)])
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 12, 13, 64, 301])
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_gemm_equals_an_fp32_gemm(n, k, rows, bias):
    """Every row count of the 6-row chunks and a partial last one, several row tiles at K=1536,
    K not a multiple of the 256-feature blocks (odd, too), output widths that are not a multiple
    of the 16-column groups: fp32 sums equal to a float64 reference up to fp32 rounding."""
    gen = torch.Generator().manual_seed(rows * 1000 + n + k)
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    wide = torch.randn(rows, k + 10, generator=gen)
    x = wide[:, 4:4 + k]                                  # row stride k + 10: not contiguous
    packed = ops.pack_fp32_weight(w)
    assert tuple(packed.shape) == ((n + 15) // 16, k, 16)
    out = torch.full((rows, n), float("nan"))
    ops.fp32_linear(out, x, packed, torch.empty(0) if b is None else b)
    want = x.double() @ w.double().T + (0 if b is None else b.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5 * k ** 0.5)


@needs_fp32_gemm
def test_fp32_gemm_is_batch_invariant_and_refuses_what_it_cannot_take():
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(70, 600, generator=gen)
    packed = ops.pack_fp32_weight(w)
    x = torch.randn(150, 600, generator=gen)

    def run(rows):
        out = torch.empty(rows.shape[0], 70)
        ops.fp32_linear(out, rows, packed, torch.empty(0))
        return out

    alone = torch.cat([run(x[i:i + 1]) for i in range(150)])
    for m in (2, 6, 7, 12, 13, 150):
        assert torch.equal(run(x[:m]), alone[:m]), m
    out = torch.empty(3, 70)
    with pytest.raises(RuntimeError, match="fp32"):
        ops.fp32_linear(out, x[:3].to(torch.bfloat16), packed, torch.empty(0))
    with pytest.raises(RuntimeError, match="shapes"):
        ops.fp32_linear(out, torch.randn(3, 64), packed, torch.empty(0))
    with pytest.raises(RuntimeError, match="bias"):
        ops.fp32_linear(out, x[:3], packed, torch.randn(9))
    ops.fp32_linear(out, x[:3], packed, torch.empty(0))    # still fine after the refusals
    assert torch.equal(out, alone[:3])


def _conveyor_and_onednn(lin: nn.Linear, x: torch.Tensor, off_switch: str, monkeypatch):
    """``lin`` packed for conveyor's GEMM and, with ``off_switch`` set, for oneDNN: their
    outputs on ``x``."""
    with torch.inference_mode():
        ours = PackedLinear(lin)
        monkeypatch.setenv(off_switch, "1")
        theirs = PackedLinear(lin)
        monkeypatch.delenv(off_switch)
        assert (ours.kernel, theirs.kernel) == ("conveyor", "oneDNN")
        return ours(x), theirs(x)


@needs_fp32_gemm
def test_fp32_linears_take_conveyors_gemm_on_avx2_cpus_unless_disabled(monkeypatch):
    """An AVX2 CPU without AVX-512 (a Zen 3): fp32 layers go to conveyor's GEMM and equal
    oneDNN's; ``CONVEYOR_DISABLE_FP32_GEMM=1`` keeps oneDNN; with AVX-512 oneDNN stays."""
    zen3 = platform.CpuInfo.of({"avx", "avx2", "fma", "f16c"})
    monkeypatch.setattr(platform, "cpu_info", lambda: zen3)
    lin = nn.Linear(96, 200, bias=True)
    x = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(4))
    got, want = _conveyor_and_onednn(lin, x, "CONVEYOR_DISABLE_FP32_GEMM", monkeypatch)
    assert got.shape == want.shape == (2, 5, 200) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(platform, "cpu_info", lambda: platform.CpuInfo.of(
        {"avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"}))
    assert PackedLinear(lin).kernel == "oneDNN"


@needs_bf16_gemm
def test_packed_bf16_linears_take_conveyors_gemm_here_unless_disabled(monkeypatch):
    """On this CPU bf16 layers go to conveyor's GEMM, and equal oneDNN's packed result (3-D input
    too); ``CONVEYOR_DISABLE_BF16_GEMM=1`` keeps oneDNN; odd K always keeps oneDNN, fp32 where
    ``platform`` says so."""
    gen = torch.Generator().manual_seed(3)
    lin = nn.Linear(96, 200, bias=True).to(torch.bfloat16)
    x = torch.randn(2, 5, 96, generator=gen).to(torch.bfloat16)
    got, want = _conveyor_and_onednn(lin, x, "CONVEYOR_DISABLE_BF16_GEMM", monkeypatch)
    assert got.shape == want.shape == (2, 5, 200)
    torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=8e-3)
    assert not conveyor_gemm_takes(torch.randn(8, 15).to(torch.bfloat16))
    fp32_here = platform.fp32_gemm_path() == "conveyor"     # an AVX2 CPU without AVX-512
    assert conveyor_gemm_takes(torch.randn(8, 16)) == fp32_here
    assert PackedLinear(nn.Linear(16, 8)).kernel == ("conveyor" if fp32_here else "oneDNN")


@needs_onednn
def test_bf16_linears_stay_plain_where_onednn_cannot_prepack_them(monkeypatch):
    """A Zen 3 (AVX2, no AVX-512): oneDNN refuses the bf16 reorder there, so bf16 layers keep
    ``nn.Linear`` (and still compute); fp32 layers are packed as everywhere."""
    monkeypatch.setattr(platform, "cpu_info",
                        lambda: platform.CpuInfo.of({"avx", "avx2", "fma", "f16c"}))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 64, generator=gen)
    for dtype, want_packed in ((torch.bfloat16, 0), (torch.float32, 2)):
        model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 32)).to(dtype)
        with torch.inference_mode():
            want = model(x.to(dtype))
            assert pack_linears(model) == want_packed
            close(model(x.to(dtype)), want, dtype)
    assert not packing_supported(torch.device("cpu"), torch.bfloat16)


def _ragged_inputs(cfg: ArchConfig, dtype, seed: int):
    """A ragged batch over a random paged cache, as the runner builds it."""
    from test_attention import Shape
    shape = Shape(hq=cfg.num_heads, hkv=cfg.num_kv_heads, d=cfg.head_dim, bs=16)
    q, _, _, kv, md = random_batch(seed, dtype, shape)
    gen = torch.Generator().manual_seed(seed)
    t = q.shape[0]
    ids = torch.randint(0, cfg.vocab_size, (t,), generator=gen)
    positions = torch.cat([torch.arange(s - n, s) for n, s in zip(md.query_lens_cpu, md.seq_lens_cpu)])
    caches = [(torch.randn(kv.shape, generator=gen) * 0.5).to(dtype) for _ in range(cfg.num_layers)]
    return ids, positions, caches, md


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_model_matches_plain_model_on_ragged_batches(dtype, seed):
    """fused ops + prepacked linears + C++ attention vs plain PyTorch + reference attention."""
    cfg = tiny_arch()
    torch.manual_seed(seed)
    plain = LlamaForCausalLM(cfg, "reference", fused_ops=False).to(dtype).eval()
    for p in plain.parameters():
        p.data.normal_(0, 0.2)
    fast = LlamaForCausalLM(cfg, "cpu", fused_ops=True).to(dtype).eval()
    fast.load_state_dict(plain.state_dict())
    for module in list(plain.modules()) + list(fast.modules()):
        if isinstance(module, RotaryEmbedding):
            module.reset_tables(cfg)
    params_before = num_parameters(fast)
    if packing_supported(torch.device("cpu"), dtype):
        assert pack_linears(fast) == cfg.num_layers * 4 + 1
        assert num_parameters(fast) == params_before + cfg.vocab_size * cfg.hidden_size  # tied head
    ids, positions, caches, md = _ragged_inputs(cfg, dtype, seed)
    fast_caches = [c.clone() for c in caches]
    with torch.inference_mode():
        want = plain(ids, positions, caches, md)
        got = fast(ids, positions, fast_caches, md)
        want_logits, got_logits = plain.compute_logits(want), fast.compute_logits(got)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
        for a, b in zip(fast_caches, caches):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    else:   # bf16 roundings compound over layers; the logits must still agree closely
        assert (got_logits - want_logits).abs().max().item() < 0.15
        assert (got_logits.argmax(-1) == want_logits.argmax(-1)).float().mean().item() >= 0.9
