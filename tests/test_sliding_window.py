"""Sliding-window attention: every backend against the reference on random ragged paged batches
(decodes, chunked prefills, fresh prompts), the reference against dense windowed attention, and
the C++ kernel never reading keys that left the window."""

from __future__ import annotations

import pytest
import torch

from conveyor.attention.backend import AttentionMetadata, make_attention
from test_attention import (BS, D, FAST, HKV, HQ, SHAPES, TOLERANCES, Shape,
                            check_against_reference, needs_kernel, random_batch)

WINDOWS = [1, 5, 17, 64]


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("dtype,tol", TOLERANCES)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("seed", range(3))
def test_windowed_backend_matches_reference(name, dtype, tol, window, seed):
    check_against_reference(name, *random_batch(seed, dtype), Shape(), tol, window=window)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("shape_name", ["smollm2_long", "gqa8_d256"])
def test_windowed_model_shapes_match_reference(name, shape_name):
    shape = SHAPES[shape_name]
    check_against_reference(name, *random_batch(3, torch.float32, shape), shape, 2e-5, window=100)


def test_windowed_reference_matches_dense_sliding_attention():
    torch.manual_seed(0)
    n, window = 30, 7
    q, k, v = torch.randn(n, HQ, D), torch.randn(n, HKV, D), torch.randn(n, HKV, D)
    table = [5, 2, 9, 0]
    md = AttentionMetadata(torch.tensor([0, n]), torch.tensor([n]), torch.tensor([table]),
                           torch.tensor([table[p // BS] * BS + p % BS for p in range(n)]),
                           [0, n], [n], [n], n, n)
    kv = torch.zeros(2, 12, BS, HKV, D)
    got = make_attention("reference", HQ, HKV, D, D ** -0.5, window).forward(q, k, v, kv, md)
    i = torch.arange(n)
    allowed = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    kk, vv = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1), attn_mask=allowed).transpose(0, 1)
    torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype,tol", TOLERANCES)
def test_cpu_kernel_never_reads_keys_before_the_window(dtype, tol):
    """NaN in every cached key/value before each request's window changes nothing."""
    window = 9
    q, k, v, kv, md = random_batch(5, dtype, Shape(max_cached=120), kinds=("decode", "chunk"))
    ref = make_attention("reference", HQ, HKV, D, D ** -0.5, window).forward(q, k, v, kv.clone(), md)
    poisoned = kv.clone()
    for i, seq in enumerate(md.seq_lens_cpu):
        first_visible = seq - md.query_lens_cpu[i] - window + 1
        for pos in range(max(0, first_visible)):
            block = int(md.block_tables[i, pos // BS])
            poisoned[:, block, pos % BS] = float("nan")
    got = make_attention("cpu", HQ, HKV, D, D ** -0.5, window).forward(q, k, v, poisoned, md)
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)
