"""conveyor's bf16 GEMM (``csrc/bf16_gemm.cpp``), or with ``--dtype float32`` its fp32 GEMM for
AVX2 CPUs (``csrc/fp32_gemm.cpp``), against oneDNN's prepacked one, side by side in one process:
the GEMMs alone, then whole engine steps.

    PYTHONPATH=. python scripts/bench_bf16_gemm.py [--rows 1,3,6,9,17,64,512] [--batches 1,5,32]
        [--dtype bfloat16|float32]

1. The layer GEMMs of the default model's shapes (30 layers of qkv, o, gate_up and down, each
   layer its own weights, so they stream from memory as in a real step), at each row count,
   the two kernels alternating; median milliseconds for all 120 GEMMs.
2. Two engines on the default model, one per kernel (``CONVEYOR_DISABLE_BF16_GEMM=1``, or
   ``CONVEYOR_DISABLE_FP32_GEMM=1``, builds the oneDNN one), stepping alternately: ``B`` requests of 300 prompt tokens decoding 120 tokens
   each; median decode step at each batch size ``B``. Then a 2,000-token prefill on each.

Prints one JSON line per measurement and a markdown table with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from conveyor import platform
from conveyor.engine.llm_engine import LLMEngine
from conveyor.kernels import LOADER
from conveyor.sampling_params import SamplingParams

SHAPES = [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536)]
LAYERS = 30
_NO_BIAS = torch.empty(0)
# dtype -> (pack, linear, the off switch, the extension's probe)
KERNELS = {
    "bfloat16": ("pack_bf16_weight", "bf16_linear", "CONVEYOR_DISABLE_BF16_GEMM", "has_bf16_gemm"),
    "float32": ("pack_fp32_weight", "fp32_linear", "CONVEYOR_DISABLE_FP32_GEMM", "has_fp32_gemm"),
}
DTYPE = "bfloat16"


def gemms(rows: list[int], reps: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, DTYPE)
    pack, linear = (getattr(torch.ops.conveyor_cpu, name) for name in KERNELS[DTYPE][:2])
    raw = [[torch.randn(n, k, generator=gen).to(dtype) for _, n, k in SHAPES]
           for _ in range(LAYERS)]
    ours = [[pack(w) for w in ws] for ws in raw]
    onednn = [[torch.ops.mkldnn._reorder_linear_weight(w, 64) for w in ws] for ws in raw]
    del raw

    def run(kind: str, m: int) -> float:
        xs = {k: torch.randn(m, k, generator=gen).to(dtype) for k in (576, 1536)}
        t0 = time.perf_counter()
        for layer in range(LAYERS):
            for (_, n, k), a, b in zip(SHAPES, ours[layer], onednn[layer]):
                if kind == "conveyor":
                    out = torch.empty(m, n, dtype=dtype)
                    linear(out, xs[k], a, _NO_BIAS)
                else:
                    torch.ops.mkldnn._linear_pointwise(xs[k], b, None, "none", [], "")
        return time.perf_counter() - t0

    times = {(kind, m): [] for kind in ("conveyor", "oneDNN") for m in rows}
    for rep in range(reps):
        for m in rows:
            for kind in (("conveyor", "oneDNN") if rep % 2 == 0 else ("oneDNN", "conveyor")):
                times[(kind, m)].append(run(kind, m))
    out = []
    for m in rows:
        a = statistics.median(times[("conveyor", m)])
        b = statistics.median(times[("oneDNN", m)])
        out.append({"part": "layer GEMMs", "rows": m, "conveyor_ms": round(a * 1e3, 2),
                    "onednn_ms": round(b * 1e3, 2), "ratio": round(a / b, 3)})
        print(json.dumps(out[-1]), flush=True)
    return out


def _engine(disable: bool, **kw) -> LLMEngine:
    switch = KERNELS[DTYPE][2]
    if disable:
        os.environ[switch] = "1"
    try:
        return LLMEngine.from_kwargs(model=None, dtype=DTYPE, **kw)
    finally:
        os.environ.pop(switch, None)


def steps(batches: list[int]) -> list[dict]:
    out = []
    for b in batches:
        engines = {"conveyor": _engine(False, max_num_seqs=b),
                   "oneDNN": _engine(True, max_num_seqs=b)}
        kinds = {name: sorted({m.kernel for m in e.runner.model.modules() if hasattr(m, "kernel")})
                 for name, e in engines.items()}
        times: dict[str, list[float]] = {name: [] for name in engines}
        for rep in range(2):
            for e in engines.values():
                for i in range(b):
                    e.add_request(list(range(1000 + i, 1300 + i)), SamplingParams(
                        temperature=0.0, max_tokens=120, ignore_eos=True), request_id=f"{rep}-{i}")
            while any(e.has_unfinished_requests() for e in engines.values()):
                for name, e in engines.items():
                    if e.has_unfinished_requests():
                        t0 = time.perf_counter()
                        e.step()
                        if e.last_step_stats.num_scheduled_tokens == b:   # decode steps only
                            times[name].append(time.perf_counter() - t0)
        for e in engines.values():
            e.check_invariants()
        a, c = statistics.median(times["conveyor"]), statistics.median(times["oneDNN"])
        out.append({"part": "decode step", "batch": b, "conveyor_ms": round(a * 1e3, 2),
                    "onednn_ms": round(c * 1e3, 2), "ratio": round(a / c, 3), "kernels": kinds})
        print(json.dumps(out[-1]), flush=True)
        for e in engines.values():
            e.shutdown()
    engines = {"conveyor": _engine(False, max_num_seqs=2, max_num_batched_tokens=2048,
                                   enable_prefix_caching=False),
               "oneDNN": _engine(True, max_num_seqs=2, max_num_batched_tokens=2048,
                                 enable_prefix_caching=False)}
    times = {name: [] for name in engines}
    for rep in range(5):
        for name, e in engines.items():
            e.add_request(list(range(1000 + rep, 3000 + rep)), SamplingParams(
                temperature=0.0, max_tokens=1), request_id=f"p{rep}")
            t0 = time.perf_counter()
            while e.has_unfinished_requests():
                e.step()
            times[name].append(time.perf_counter() - t0)
    a, c = statistics.median(times["conveyor"]), statistics.median(times["oneDNN"])
    out.append({"part": "prefill", "tokens": 2000, "conveyor_ms": round(a * 1e3, 1),
                "onednn_ms": round(c * 1e3, 1), "ratio": round(a / c, 3)})
    print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1,2,3,6,7,9,12,17,32,64,128,512")
    p.add_argument("--batches", default="1,5,32")
    p.add_argument("--reps", type=int, default=11)
    p.add_argument("--dtype", choices=sorted(KERNELS), default="bfloat16")
    args = p.parse_args()
    global DTYPE
    DTYPE = args.dtype
    if not LOADER.available() or not getattr(torch.ops.conveyor_cpu, KERNELS[DTYPE][3])(_NO_BIAS):
        raise SystemExit(f"error: this machine's kernel build has no {DTYPE} GEMM (bf16 needs "
                         "AVX512_BF16, fp32 AVX2 and FMA)")
    want = platform.bf16_gemm_path() if DTYPE == "bfloat16" else platform.fp32_gemm_path()
    if want != "conveyor":
        print(f"note: platform would not use conveyor's {DTYPE} GEMM on this CPU ({want})")
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    rows = gemms([int(x) for x in args.rows.split(",")], args.reps)
    rows += steps([int(x) for x in args.batches.split(",")])
    print(f"\nMeasured {started} UTC on {platform.describe()}; dtype {DTYPE}\n")
    print("| part | size | conveyor ms | oneDNN ms | conveyor / oneDNN |\n|---|---|---|---|---|")
    for r in rows:
        size = (f"{r['rows']} rows" if "rows" in r else
                f"batch {r['batch']}" if "batch" in r else f"{r['tokens']} tokens")
        print(f"| {r['part']} | {size} | {r['conveyor_ms']} | {r['onednn_ms']} | {r['ratio']} |")


if __name__ == "__main__":
    main()
