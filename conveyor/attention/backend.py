"""Attention over a paged KV cache, for one flat ragged batch.

The KV cache of one layer is a tensor ``[2, num_blocks, block_size, num_kv_heads, head_dim]``;
token ``t`` of a request lives in block ``block_table[t // block_size]`` at offset
``t % block_size``. ``slot_mapping[i] = block * block_size + offset`` says where the i-th token of
the flat batch writes its K and V.

Backends share one interface: ``forward(q, k, v, kv_cache, md) -> out``. ``ReferenceAttention``
loops over requests in plain PyTorch and is the ground truth faster backends are tested against.

A backend built with ``sliding_window=W`` (one per layer) lets the query at position p see keys
p - W + 1 .. p only (HF's sliding-window mask), whatever the cache still holds further back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionMetadata:
    """Where each request's queries and keys are. Built once per step by the runner.

    Flat batch layout (B requests, T tokens):  [ req0 tokens | req1 tokens | ... ]
                                              query_start_loc[0]  [1]      [2] ... [B] = T
    """

    query_start_loc: torch.Tensor     # [B + 1] int64, offsets of each request's queries
    seq_lens: torch.Tensor            # [B] int64, context length after this step (keys to attend)
    block_tables: torch.Tensor        # [B, max_blocks] int64, padded with 0
    slot_mapping: torch.Tensor        # [T] int64, KV write slot per token
    query_start_loc_cpu: list[int]    # [B + 1] host copies used for Python-side shapes
    query_lens_cpu: list[int]         # [B]
    seq_lens_cpu: list[int]           # [B]
    max_query_len: int
    max_seq_len: int

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_cpu)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter this step's K/V ([T, Hkv, D] each) into the paged cache."""
    _, num_blocks, block_size, h, d = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, h, d)
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int):
    """K and V ([seq_len, Hkv, D] each) of one request, in token order."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-seq_len // block_size)
    blocks = kv_cache[:, block_table[:num_blocks]]            # [2, nb, bs, Hkv, D]
    kv = blocks.flatten(1, 2)[:, :seq_len]                     # [2, seq_len, Hkv, D]
    return kv[0], kv[1]


def hidden_keys(q_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[n, S] True where the query at ``q_pos[i]`` must not see the key at ``key_pos[j]``: the
    future, and with a window the keys at or before ``q_pos - window``."""
    hidden = key_pos[None, :] > q_pos[:, None]
    if window is not None:
        hidden |= key_pos[None, :] <= q_pos[:, None] - window
    return hidden


class ReferenceAttention:
    """Plain-PyTorch paged attention, one request at a time. Slow, obviously right."""

    name = "reference"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                md: AttentionMetadata) -> torch.Tensor:
        # q: [T, Hq, D]; k, v: [T, Hkv, D]
        write_kv(kv_cache, k, v, md.slot_mapping)
        out = torch.empty_like(q)
        group = self.num_heads // self.num_kv_heads
        starts = md.query_start_loc_cpu
        for i in range(md.num_reqs):
            s, e, seq_len = starts[i], starts[i + 1], md.seq_lens_cpu[i]
            if e == s:
                continue
            keys, vals = gather_kv(kv_cache, md.block_tables[i], seq_len)   # [S, Hkv, D]
            keys = keys.to(q.dtype).repeat_interleave(group, dim=1)          # [S, Hq, D]
            vals = vals.to(q.dtype).repeat_interleave(group, dim=1)
            qi = q[s:e].transpose(0, 1)                                      # [Hq, n, D]
            scores = qi @ keys.permute(1, 2, 0) * self.scale                 # [Hq, n, S]
            q_pos = torch.arange(seq_len - (e - s), seq_len, device=q.device)
            mask = hidden_keys(q_pos, torch.arange(seq_len, device=q.device),
                               self.sliding_window)                          # [n, S]
            scores = scores.masked_fill(mask, float("-inf"))
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            out[s:e] = (probs @ vals.transpose(0, 1)).transpose(0, 1)        # [n, Hq, D]
        return out


class SplitAttention:
    """Vectorised paged attention: all decodes in one batched call, each prefill chunk on its own.

    Decode rows (one query each) gather their keys into ``[B, S_max]`` and run one masked batched
    matmul, with grouped-query heads handled by reshaping the queries (no K/V repetition). Prefill
    chunks (few per step) each run one SDPA call over their own gathered context, so a long prompt
    never pads the decode rows' queries.
    """

    name = "sdpa"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window

    def forward(self, q, k, v, kv_cache, md: AttentionMetadata) -> torch.Tensor:
        write_kv(kv_cache, k, v, md.slot_mapping)
        out = torch.empty_like(q)
        starts = md.query_start_loc_cpu
        decode_rows = [i for i in range(md.num_reqs) if md.query_lens_cpu[i] == 1]
        if decode_rows:
            self._decode(q, kv_cache, md, decode_rows, out)
        for i in range(md.num_reqs):
            if md.query_lens_cpu[i] > 1:
                s, e = starts[i], starts[i + 1]
                out[s:e] = self._prefill(q[s:e], kv_cache, md.block_tables[i], md.seq_lens_cpu[i])
        return out

    def _decode(self, q, kv_cache, md, rows, out) -> None:
        dev = q.device
        all_rows = len(rows) == md.num_reqs
        idx = None if all_rows else torch.tensor(rows, device=dev)
        seq_lens = md.seq_lens if all_rows else md.seq_lens[idx]                 # [B]
        tables = md.block_tables if all_rows else md.block_tables[idx]
        max_s = max(md.seq_lens_cpu[i] for i in rows)
        bs = kv_cache.shape[2]
        kv = kv_cache[:, tables[:, :-(-max_s // bs)]].flatten(2, 3)[:, :, :max_s]  # [2, B, S, Hkv, D]
        tok = md.query_start_loc[:-1] if all_rows else md.query_start_loc[idx]
        b, g = len(rows), self.num_heads // self.num_kv_heads
        qd = q[tok].view(b, self.num_kv_heads, g, self.head_dim)                 # [B, Hkv, G, D]
        keys = kv[0].to(q.dtype).permute(0, 2, 3, 1)                             # [B, Hkv, D, S]
        scores = torch.matmul(qd, keys) * self.scale                             # [B, Hkv, G, S]
        key_pos = torch.arange(max_s, device=dev)[None, :]
        pad = key_pos >= seq_lens[:, None]                                       # [B, S]
        if self.sliding_window is not None:
            pad |= key_pos < seq_lens[:, None] - self.sliding_window
        scores.masked_fill_(pad[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        vals = kv[1].to(q.dtype).transpose(1, 2)                                 # [B, Hkv, S, D]
        res = torch.matmul(probs, vals).reshape(b, self.num_heads, self.head_dim)  # [B, Hq, D]
        out[tok] = res

    def _prefill(self, q, kv_cache, block_table, seq_len) -> torch.Tensor:
        n = q.shape[0]
        keys, vals = gather_kv(kv_cache, block_table, seq_len)                   # [S, Hkv, D]
        q_pos = torch.arange(seq_len - n, seq_len, device=q.device)
        allowed = ~hidden_keys(q_pos, torch.arange(seq_len, device=q.device),
                               self.sliding_window)                              # [n, S]
        res = F.scaled_dot_product_attention(
            q.transpose(0, 1), keys.to(q.dtype).transpose(0, 1), vals.to(q.dtype).transpose(0, 1),
            attn_mask=allowed, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads)                      # [Hq, n, D]
        return res.transpose(0, 1)


def _cpu_attention(num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                   sliding_window: int | None = None):
    """The C++ kernel backend, or SplitAttention (one logged warning) where it cannot be built."""
    from conveyor.attention.cpu_kernel import make_cpu_attention   # lazy: may compile; avoids a cycle
    return make_cpu_attention(num_heads, num_kv_heads, head_dim, scale,
                              sliding_window=sliding_window)


BACKENDS = {"reference": ReferenceAttention, "sdpa": SplitAttention, "cpu": _cpu_attention}


def make_attention(name: str, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                   sliding_window: int | None = None):
    """Backend ``name`` for one layer; ``sliding_window``: that layer's window (None: causal)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name](num_heads, num_kv_heads, head_dim, scale, sliding_window)
