"""Every attention backend against the plain-PyTorch reference on random ragged paged batches."""

from __future__ import annotations

import random

import pytest
import torch

from conveyor.attention.backend import BACKENDS, AttentionMetadata, make_attention

HQ, HKV, D, BS, NUM_BLOCKS = 6, 2, 32, 8, 96


def random_batch(seed: int, dtype):
    """Requests mixing decodes, chunked prefills (context already cached) and fresh prompts;
    block tables are random (with holes) and lengths are not multiples of the block size."""
    rng = random.Random(seed)
    free = list(range(NUM_BLOCKS))
    rng.shuffle(free)
    q_lens, seq_lens, tables = [], [], []
    for _ in range(rng.randint(1, 7)):
        kind = rng.choice(["decode", "chunk", "fresh"])
        cached = 0 if kind == "fresh" else rng.randint(1, 70)
        n = 1 if kind == "decode" else rng.randint(2, 40)
        seq = cached + n
        nb = -(-seq // BS)
        tables.append([free.pop() for _ in range(nb)])
        q_lens.append(n)
        seq_lens.append(seq)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    slots = []
    for n, seq, table in zip(q_lens, seq_lens, tables):
        for pos in range(seq - n, seq):
            slots.append(table[pos // BS] * BS + pos % BS)
    width = max(len(t) for t in tables)
    md = AttentionMetadata(
        torch.tensor(starts), torch.tensor(seq_lens),
        torch.tensor([t + [0] * (width - len(t)) for t in tables]), torch.tensor(slots),
        starts, q_lens, seq_lens, max(q_lens), max(seq_lens))
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, NUM_BLOCKS + 1, BS, HKV, D, generator=gen).to(dtype)
    t = starts[-1]
    q = torch.randn(t, HQ, D, generator=gen).to(dtype)
    k = torch.randn(t, HKV, D, generator=gen).to(dtype)
    v = torch.randn(t, HKV, D, generator=gen).to(dtype)
    return q, k, v, kv, md


@pytest.mark.parametrize("name", sorted(set(BACKENDS) - {"reference"}))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("seed", range(12))
def test_backend_matches_reference(name, dtype, tol, seed):
    q, k, v, kv, md = random_batch(seed, dtype)
    ref_kv = kv.clone()
    ref = make_attention("reference", HQ, HKV, D, D ** -0.5).forward(q, k, v, ref_kv, md)
    got = make_attention(name, HQ, HKV, D, D ** -0.5).forward(q, k, v, kv, md)
    assert torch.equal(kv, ref_kv)                      # identical KV writes
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)


def test_reference_matches_dense_causal_attention():
    """The reference itself against plain dense attention of one fresh prompt."""
    torch.manual_seed(0)
    n = 21
    q, k, v = torch.randn(n, HQ, D), torch.randn(n, HKV, D), torch.randn(n, HKV, D)
    table = [5, 2, 9]
    md = AttentionMetadata(torch.tensor([0, n]), torch.tensor([n]), torch.tensor([table]),
                           torch.tensor([table[p // BS] * BS + p % BS for p in range(n)]),
                           [0, n], [n], [n], n, n)
    kv = torch.zeros(2, NUM_BLOCKS + 1, BS, HKV, D)
    got = make_attention("reference", HQ, HKV, D, D ** -0.5).forward(q, k, v, kv, md)
    kk, vv = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1), is_causal=True).transpose(0, 1)
    torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)
