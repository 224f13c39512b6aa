"""Time one attention layer call of every backend, side by side, on SmolLM2-135M shapes.

Cases: decode batches (1, 8, 32, 64 rows, contexts drawn from 300..700), one fresh 512-token
prefill, and a mixed step (a 512-token chunk after 512 cached tokens, plus 32 decode rows).
Backends run round-robin inside each repeat, so machine noise hits all of them alike; the table
holds medians. Each call gets the next of several KV caches (like successive layers), so K/V
come from memory rather than a warm cache, as in a real forward pass. "cpu K/V GB/s" is the
bytes of K/V the step must read once over the cpu backend's time: the figure to hold against
memory bandwidth for decode rows (prefill is compute-bound).

    python scripts/bench_attention.py [--repeats 15] [--threads N] [--backends reference,sdpa,cpu]

On a machine whose cores are shared with other work, run with OMP_WAIT_POLICY=passive (or
--threads 1): spinning OpenMP threads that lose their core stall every parallel op, torch's too.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from conveyor.attention import cpu_kernel
from conveyor.attention.backend import AttentionMetadata, make_attention
from conveyor.platform import describe

HQ, HKV, D, BS = 9, 3, 64, 16          # SmolLM2-135M
COLD_BYTES = 256 << 20                  # total KV bytes cycled through, well above the L3 size


def make_step(decode_ctx: list[int], prefills: list[tuple[int, int]], seed: int = 0):
    """Metadata for decode rows (context lengths) + prefill chunks ((cached, new) tokens), with
    shuffled block tables. Returns (md, num_blocks)."""
    rng = random.Random(seed)
    q_lens = [n for _, n in prefills] + [1] * len(decode_ctx)
    seq_lens = [c + n for c, n in prefills] + list(decode_ctx)
    blocks_needed = [-(-s // BS) for s in seq_lens]
    free = list(range(sum(blocks_needed)))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(nb)] for nb in blocks_needed]
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    slots = [t[p // BS] * BS + p % BS
             for n, s, t in zip(q_lens, seq_lens, tables) for p in range(s - n, s)]
    width = max(blocks_needed)
    md = AttentionMetadata(
        torch.tensor(starts), torch.tensor(seq_lens),
        torch.tensor([t + [0] * (width - len(t)) for t in tables]), torch.tensor(slots),
        starts, q_lens, seq_lens, max(q_lens), max(seq_lens))
    return md, sum(blocks_needed)


def cases(seed: int = 0) -> dict[str, tuple]:
    rng = random.Random(seed)
    out = {f"decode x{b}": make_step([rng.randint(300, 700) for _ in range(b)], [])
           for b in (1, 8, 32, 64)}
    out["prefill 512"] = make_step([], [(0, 512)])
    out["mixed 512+32"] = make_step([rng.randint(300, 700) for _ in range(32)], [(512, 512)])
    return out


def time_case(md, num_blocks, dtype, backends, repeats) -> dict[str, float]:
    """Median seconds per layer call of each backend."""
    gen = torch.Generator().manual_seed(0)
    t = md.query_start_loc_cpu[-1]
    q = torch.randn(t, HQ, D, generator=gen).to(dtype)                      # [T, Hq, D]
    k = torch.randn(t, HKV, D, generator=gen).to(dtype)                     # [T, Hkv, D]
    v = torch.randn(t, HKV, D, generator=gen).to(dtype)
    one = torch.randn(2, num_blocks, BS, HKV, D, generator=gen).to(dtype)   # one layer's cache
    layers = [one.clone() for _ in range(max(1, COLD_BYTES // one.nbytes))]
    attn = {name: make_attention(name, HQ, HKV, D, D ** -0.5) for name in backends}
    for a in attn.values():                                               # warm-up
        a.forward(q, k, v, layers[0], md)
    times = {name: [] for name in backends}
    for rep in range(repeats):
        for name, a in attn.items():
            kv = layers[rep % len(layers)]
            start = time.perf_counter()
            a.forward(q, k, v, kv, md)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def kv_bytes(md, dtype) -> int:
    return sum(md.seq_lens_cpu) * HKV * D * 2 * torch.finfo(dtype).bits // 8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--backends", default="reference,sdpa,cpu")
    p.add_argument("--dtypes", default="float32,bfloat16")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = args.backends.split(",")
    print(describe())
    if "cpu" in backends:
        start = time.perf_counter()
        ready = cpu_kernel.is_available()
        print(f"cpu kernel {'ready' if ready else 'UNAVAILABLE (cpu = sdpa fallback)'} "
              f"in {time.perf_counter() - start:.1f}s (build or cache load)")
    print("| case | dtype | " + " | ".join(f"{b} ms" for b in backends)
          + " | sdpa/cpu | cpu K/V GB/s |")
    print("|---" * (len(backends) + 4) + "|")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for label, (md, num_blocks) in cases().items():
            med = time_case(md, num_blocks, dtype, backends, args.repeats)
            cells = " | ".join(f"{med[b] * 1e3:.3f}" for b in backends)
            ratio = f"{med['sdpa'] / med['cpu']:.1f}x" if {"sdpa", "cpu"} <= med.keys() else "-"
            bw = f"{kv_bytes(md, dtype) / med['cpu'] / 1e9:.1f}" if "cpu" in med else "-"
            print(f"| {label} | {dtype_name} | {cells} | {ratio} | {bw} |", flush=True)


if __name__ == "__main__":
    main()
