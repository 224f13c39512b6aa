"""Every attention backend against the plain-PyTorch reference on random ragged paged batches,
plus the "cpu" backend's fallbacks and edge cases."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import pytest
import torch

from conveyor.attention import cpu_kernel
from conveyor.attention.backend import BACKENDS, AttentionMetadata, SplitAttention, make_attention
from conveyor.attention.select import default_backend

HQ, HKV, D, BS = 6, 2, 32, 8
FAST = sorted(set(BACKENDS) - {"reference"})
TOLERANCES = [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)]
needs_kernel = pytest.mark.skipif(not cpu_kernel.is_available(), reason="C++ kernel not built here")


@dataclass(frozen=True)
class Shape:
    """Model and cache geometry plus how big the random requests get."""

    hq: int = HQ
    hkv: int = HKV
    d: int = D
    bs: int = BS
    max_cached: int = 70
    max_new: int = 40
    max_reqs: int = 7


def random_batch(seed: int, dtype, shape: Shape = Shape(), kinds=("decode", "chunk", "fresh")):
    """Requests mixing decodes, chunked prefills (context already cached) and fresh prompts;
    block tables are random (with holes) and lengths are not multiples of the block size."""
    rng = random.Random(seed)
    q_lens, seq_lens = [], []
    for _ in range(rng.randint(1, shape.max_reqs)):
        kind = rng.choice(kinds)
        cached = 0 if kind == "fresh" else rng.randint(1, shape.max_cached)
        n = 1 if kind == "decode" else rng.randint(2, shape.max_new)
        q_lens.append(n)
        seq_lens.append(cached + n)
    num_blocks = sum(-(-s // shape.bs) for s in seq_lens) + 8
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-s // shape.bs))] for s in seq_lens]
    md = make_metadata(q_lens, seq_lens, tables, shape.bs)
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, num_blocks + 1, shape.bs, shape.hkv, shape.d, generator=gen).to(dtype)
    t = md.query_start_loc_cpu[-1]
    q = torch.randn(t, shape.hq, shape.d, generator=gen).to(dtype)
    k = torch.randn(t, shape.hkv, shape.d, generator=gen).to(dtype)
    v = torch.randn(t, shape.hkv, shape.d, generator=gen).to(dtype)
    return q, k, v, kv, md


def make_metadata(q_lens, seq_lens, tables, bs) -> AttentionMetadata:
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    slots = [table[pos // bs] * bs + pos % bs
             for n, seq, table in zip(q_lens, seq_lens, tables) for pos in range(seq - n, seq)]
    width = max(len(t) for t in tables)
    return AttentionMetadata(
        torch.tensor(starts), torch.tensor(seq_lens),
        torch.tensor([t + [0] * (width - len(t)) for t in tables]), torch.tensor(slots),
        starts, list(q_lens), list(seq_lens), max(q_lens), max(seq_lens))


def check_against_reference(name, q, k, v, kv, md, shape: Shape, tol, window=None):
    ref_kv = kv.clone()
    scale = shape.d ** -0.5
    heads = (shape.hq, shape.hkv, shape.d, scale, window)
    ref = make_attention("reference", *heads).forward(q, k, v, ref_kv, md)
    got = make_attention(name, *heads).forward(q, k, v, kv, md)
    assert torch.equal(kv, ref_kv)                      # identical KV writes
    assert got.dtype == q.dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("dtype,tol", TOLERANCES)
@pytest.mark.parametrize("seed", range(12))
def test_backend_matches_reference(name, dtype, tol, seed):
    check_against_reference(name, *random_batch(seed, dtype), Shape(), tol)


SHAPES = {
    "smollm2_long": Shape(9, 3, 64, 16, max_cached=1500, max_new=70, max_reqs=10),
    "bs32_d128": Shape(8, 2, 128, 32, max_cached=700, max_new=50, max_reqs=6),
    "mha": Shape(4, 4, 64, 16, max_cached=300, max_new=40),
    "gqa8_d256": Shape(16, 2, 256, 16, max_cached=200, max_new=24, max_reqs=4),
}


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("dtype,tol", TOLERANCES)
@pytest.mark.parametrize("shape_name", sorted(SHAPES))
@pytest.mark.parametrize("seed", range(3))
def test_model_shapes_match_reference(name, dtype, tol, shape_name, seed):
    shape = SHAPES[shape_name]
    check_against_reference(name, *random_batch(seed, dtype, shape), shape, tol)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("dtype,tol", TOLERANCES)
def test_many_decode_rows_match_reference(name, dtype, tol):
    shape = Shape(9, 3, 64, 16, max_cached=600, max_reqs=40)
    check_against_reference(name, *random_batch(5, dtype, shape, kinds=("decode",)), shape, tol)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("q_dtype,kv_dtype", [(torch.float32, torch.bfloat16),
                                              (torch.bfloat16, torch.float32)])
def test_query_and_cache_dtypes_may_differ(name, q_dtype, kv_dtype):
    q, k, v, kv, md = random_batch(3, q_dtype)
    check_against_reference(name, q, k, v, kv.to(kv_dtype), md, Shape(), 3e-2)


@pytest.mark.parametrize("name", FAST)
def test_strided_query_view_and_empty_requests(name):
    """q as a view into a fused qkv projection; a request with no queries this step."""
    q, k, v, kv, md = random_batch(4, torch.float32)
    t = q.shape[0]
    qkv = torch.randn(t, (HQ + 2 * HKV) * D)
    qkv[:, :HQ * D] = q.reshape(t, -1)
    q_view = qkv[:, :HQ * D].view(t, HQ, D)                                 # non-contiguous
    empty = make_metadata([0] + md.query_lens_cpu, [5] + md.seq_lens_cpu,
                          [[0]] + md.block_tables.tolist(), BS)
    check_against_reference(name, q_view, k, v, kv, empty, Shape(), 2e-5)


@needs_kernel
def test_cpu_kernel_is_deterministic_across_thread_counts():
    shape = Shape(9, 3, 64, 16, max_cached=600, max_reqs=12)
    q, k, v, kv, md = random_batch(7, torch.float32, shape)
    attn = make_attention("cpu", 9, 3, 64, 0.125)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = attn.forward(q, k, v, kv, md)
        torch.set_num_threads(2)
        two = attn.forward(q, k, v, kv, md)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@needs_kernel
def test_cpu_kernel_rejects_out_of_range_blocks():
    q, k, v, kv, md = random_batch(1, torch.float32)
    md.block_tables[0, 0] = kv.shape[1]                                      # past the cache
    md.slot_mapping = md.slot_mapping.clamp(max=0)
    with pytest.raises(RuntimeError, match="bad block"):
        make_attention("cpu", HQ, HKV, D, D ** -0.5).forward(q, k, v, kv, md)


def test_cpu_backend_falls_back_with_one_warning(caplog):
    def no_compiler():
        raise cpu_kernel.KernelUnavailable("no C++ compiler")

    loader = cpu_kernel.KernelLoader(build=no_compiler)
    with caplog.at_level(logging.WARNING, logger=cpu_kernel.__name__):
        first = cpu_kernel.make_cpu_attention(HQ, HKV, D, 0.1, loader=loader)
        second = cpu_kernel.make_cpu_attention(HQ, HKV, D, 0.1, loader=loader)
    assert isinstance(first, SplitAttention) and isinstance(second, SplitAttention)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert not loader.available()


@needs_kernel
def test_cpu_backend_falls_back_for_unsupported_head_dim():
    assert isinstance(make_attention("cpu", 4, 2, 80, 0.1), SplitAttention)
    assert make_attention("cpu", 4, 2, 64, 0.1).name == "cpu"


def test_default_backend():
    assert default_backend("meta") == "sdpa"
    assert default_backend(torch.device("cpu")) == ("cpu" if cpu_kernel.is_available() else "sdpa")


def test_reference_matches_dense_causal_attention():
    """The reference itself against plain dense attention of one fresh prompt."""
    torch.manual_seed(0)
    n = 21
    q, k, v = torch.randn(n, HQ, D), torch.randn(n, HKV, D), torch.randn(n, HKV, D)
    table = [5, 2, 9]
    md = AttentionMetadata(torch.tensor([0, n]), torch.tensor([n]), torch.tensor([table]),
                           torch.tensor([table[p // BS] * BS + p % BS for p in range(n)]),
                           [0, n], [n], [n], n, n)
    kv = torch.zeros(2, 12, BS, HKV, D)
    got = make_attention("reference", HQ, HKV, D, D ** -0.5).forward(q, k, v, kv, md)
    kk, vv = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1), is_causal=True).transpose(0, 1)
    torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)
