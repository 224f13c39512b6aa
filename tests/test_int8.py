"""``--quantization int8``: the C++ quantize / rescale ops against their torch references, the int8
linear against float math on the same integers, a whole tiny model int8 vs fp32 on ragged
batches, and an int8 engine end to end (outputs close to fp32, every KV block back). The int8
GEMMs run only on CPUs with VNNI (they skip naming it elsewhere); without it int8 is refused."""

from __future__ import annotations

import pytest
import torch
from cpu_features import requires_cpu
from test_fused_ops import _ragged_inputs, tiny_arch
from torch import nn

from conveyor import platform
from conveyor.attention import cpu_kernel
from conveyor.errors import ConfigError
from conveyor.models.int8 import (
    Int8Linear,
    check_supported,
    dequantize_rows_reference,
    int8_supported,
    quantize_linears,
    quantize_rows_reference,
    quantize_weight,
)
from conveyor.models.llama import LlamaForCausalLM
from conveyor.models.packed import num_parameters, pack_linears
from conveyor.models.rope import RotaryEmbedding

needs_kernel = pytest.mark.skipif(not cpu_kernel.is_available(), reason="C++ kernel not built here")
needs_onednn_int8 = pytest.mark.skipif(not int8_supported(), reason="no oneDNN qlinear in this torch")
needs_vnni = requires_cpu("vnni")
DTYPES = [torch.float32, torch.bfloat16]
TEXTS = ["The capital of France is", "One, two, three, four,", "def add(a, b):\n    return"]


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_rows_op_equals_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(41, 700, generator=gen) * torch.rand(41, 1, generator=gen) * 8
    wide[4] += 5.0                                         # a row far from zero: the midpoint
    wide[5] = 0.25                                         # a constant row: scale 1, q = 128
    wide[6, 20] = 1e4                                      # one outlier dominates its row
    x = wide.to(dtype)[:, 13:589]                          # strided rows
    q = torch.empty(x.shape, dtype=torch.uint8)
    scale, offset = torch.empty(41), torch.empty(41)
    torch.ops.conveyor_cpu.quantize_rows_int8(q, scale, offset, x)
    want_q, want_scale, want_offset = quantize_rows_reference(x)
    assert torch.equal(q, want_q) and torch.equal(scale, want_scale)
    assert torch.equal(offset, want_offset)
    assert q[6, 20 - 13] == 255 and q[5].unique().numel() == 1    # outlier; constant row
    back = (q.int() - 128).float() * scale[:, None] + offset[:, None]   # within half a step
    assert ((back - x.float()).abs() <= scale[:, None] * 0.5001 + 1e-5).all()
    zeros = torch.zeros(2, 576, dtype=dtype)                            # 0 is exact
    qz, sz, oz = quantize_rows_reference(zeros)
    assert ((qz.int() - 128).float() * sz[:, None] + oz[:, None] == 0).all()


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_rows_op_matches_reference(dtype):
    gen = torch.Generator().manual_seed(1)
    y = (torch.randn(23, 300, generator=gen) * 50)[:, :200]
    scale, offset = torch.rand(23, generator=gen) * 0.03, torch.randn(23, generator=gen)
    colsum = torch.randn(200, generator=gen) * 4
    want, got = torch.empty(23, 200, dtype=dtype), torch.empty(23, 200, dtype=dtype)
    dequantize_rows_reference(want, y, scale, offset, colsum)
    torch.ops.conveyor_cpu.dequantize_rows(got, y, scale, offset, colsum)
    if dtype == torch.float32:      # a fused multiply-add may round once where torch rounds twice
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        inplace = y.contiguous()
        torch.ops.conveyor_cpu.dequantize_rows(inplace, inplace, scale, offset, colsum)
        torch.testing.assert_close(inplace, want, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-3)


@needs_kernel
def test_quantize_ops_check_their_arguments():
    x, f = torch.randn(4, 8), torch.empty(4)
    with pytest.raises(RuntimeError, match="uint8"):
        torch.ops.conveyor_cpu.quantize_rows_int8(torch.empty(4, 8, dtype=torch.int8), f, f, x)
    with pytest.raises(RuntimeError, match="scales and offsets"):
        torch.ops.conveyor_cpu.quantize_rows_int8(torch.empty(4, 8, dtype=torch.uint8), f,
                                                  torch.empty(3), x)
    with pytest.raises(RuntimeError, match="colsum"):
        torch.ops.conveyor_cpu.dequantize_rows(x, x, f, f, torch.empty(7))
    with pytest.raises(RuntimeError, match="y fp32"):
        torch.ops.conveyor_cpu.dequantize_rows(x, x.bfloat16(), f, f, torch.empty(8))


@needs_onednn_int8
@needs_vnni
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 64, 130])
def test_int8_linear_is_integer_math_on_the_quantized_values(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    lin = nn.Linear(96, 80, bias=True)
    with torch.no_grad():
        lin.weight.normal_(0, 0.3, generator=gen)
        lin.bias.normal_(0, 0.1, generator=gen)
    lin = lin.to(dtype)
    x = (torch.randn(rows, 96, generator=gen) * 2).to(dtype)
    fused = cpu_kernel.is_available()
    got = Int8Linear(lin.weight, lin.bias, fused)(x)
    # the same integers multiplied in fp32
    qw, ws = quantize_weight(lin.weight)
    qx, xs, xo = quantize_rows_reference(x)
    dequant_w = qw.float() * ws[:, None]
    exact = ((qx.int() - 128).float() * xs[:, None] + xo[:, None]) @ dequant_w.t() + lin.bias.float()
    assert got.dtype == dtype and got.shape == (rows, 80)
    if dtype == torch.float32:
        torch.testing.assert_close(got.float(), exact, rtol=1e-4, atol=1e-4)
    else:   # one bf16 rounding of the result
        torch.testing.assert_close(got.float(), exact, rtol=8e-3, atol=1e-3)
    # and near the float layer: the quantization error only
    err = (got.float() - lin(x).float()).abs().max().item()
    assert err < 0.05 * lin(x).float().abs().max().item()
    if fused:   # the torch reference path gives the same answer
        plain = Int8Linear(lin.weight, lin.bias, fused=False)(x)
        torch.testing.assert_close(plain.float(), got.float(), rtol=8e-3, atol=1e-3)


@needs_onednn_int8
@needs_vnni
@pytest.mark.parametrize("seed", [0, 1])
def test_int8_model_stays_close_to_fp32_on_ragged_batches(seed):
    cfg = tiny_arch()
    torch.manual_seed(seed)
    ref = LlamaForCausalLM(cfg, "reference", fused_ops=False).eval()
    for p in ref.parameters():
        p.data.normal_(0, 0.2)
    fused = cpu_kernel.is_available()
    q8 = LlamaForCausalLM(cfg, "cpu" if fused else "reference", fused_ops=fused).eval()
    q8.load_state_dict(ref.state_dict())
    for module in list(ref.modules()) + list(q8.modules()):
        if isinstance(module, RotaryEmbedding):
            module.reset_tables(cfg)
    params = num_parameters(q8)
    assert quantize_linears(q8, fused) == cfg.num_layers * 4          # every layer GEMM, no head
    pack_linears(q8)
    assert not isinstance(q8.lm_head, Int8Linear)
    assert num_parameters(q8) == params + (cfg.vocab_size * cfg.hidden_size
                                           if type(q8.lm_head) is not nn.Linear else 0)
    ids, positions, caches, md = _ragged_inputs(cfg, torch.float32, seed)
    with torch.inference_mode():
        want = ref.compute_logits(ref(ids, positions, [c.clone() for c in caches], md))
        got = q8.compute_logits(q8(ids, positions, caches, md))
    assert (got - want).abs().max().item() < 0.1 * want.abs().max().item()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.9


@needs_onednn_int8
@needs_vnni
def test_int8_engine_runs_close_to_fp32_and_frees_every_block():
    from engine_helpers import NUM_BLOCKS, greedy

    from conveyor.engine.llm_engine import LLMEngine
    kw = {"max_num_seqs": 4, "max_num_batched_tokens": 32, "num_blocks": NUM_BLOCKS, "max_model_len": 384}
    outs = {}
    for name, extra in (("fp32", {}), ("int8", {"quantization": "int8"})):
        engine = LLMEngine.from_kwargs(dtype="float32", **kw, **extra)
        for i, text in enumerate(TEXTS):
            engine.add_request(engine.tokenizer.encode(text), greedy(12), request_id=f"r{i}")
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
        outs[name] = done
        engine.check_invariants()
        assert engine.core.kv_manager.pool.num_free_blocks == NUM_BLOCKS
    assert all(len(t) == 12 for t in outs["int8"].values())
    # greedy agreement on the first tokens of plain-text prompts (int8 is not expected to be
    # token-identical all the way)
    agree = sum(outs["int8"][r][:2] == outs["fp32"][r][:2] for r in outs["fp32"])
    assert agree >= 2


def test_unknown_quantization_is_a_clear_error():
    from conveyor.engine.llm_engine import engine_config_from_kwargs
    with pytest.raises(ConfigError, match="quantization must be one of"):
        engine_config_from_kwargs(quantization="fp4")


@pytest.mark.parametrize("cpu", ["zen3", "skylake_x", "alder_lake"])
def test_int8_is_refused_where_the_gemm_would_saturate(monkeypatch, cpu):
    """Without VNNI oneDNN's u8 x s8 GEMM saturates (vpmaddubsw sums in int16): refused at start
    in one line naming the feature, before any weight is read; with avx_vnni it runs."""
    from test_platform import CPUS

    from conveyor.engine.llm_engine import LLMEngine
    from conveyor.weights import loader
    monkeypatch.setattr(platform, "cpu_info", lambda: platform.CpuInfo.of(CPUS[cpu]))
    model = nn.Sequential(nn.Linear(8, 8))
    if cpu == "alder_lake":
        check_supported(torch.device("cpu"))
        return
    with pytest.raises(ConfigError, match="--quantization int8 needs CPU feature vnni"):
        check_supported(torch.device("cpu"))
    with pytest.raises(ConfigError, match="vnni"):
        quantize_linears(model)
    assert type(model[0]) is nn.Linear
    monkeypatch.setattr(loader, "load_checkpoint", lambda path: pytest.fail("weights read"))
    with pytest.raises(ConfigError, match="vnni"):
        LLMEngine.from_kwargs(attention_backend="sdpa", dtype="float32", quantization="int8",
                              num_blocks=8)


def test_int8_is_refused_off_the_cpu_and_in_float16():
    from conveyor.engine.llm_engine import engine_config_from_kwargs
    with pytest.raises(ConfigError, match="CPU only"):
        check_supported(torch.device("meta"))
    with pytest.raises(ConfigError, match="float32 or bfloat16, not float16"):
        engine_config_from_kwargs(quantization="int8", dtype="float16")
