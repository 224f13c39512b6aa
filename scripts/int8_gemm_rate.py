"""What int8 GEMMs would buy on this CPU: SmolLM2's four layer GEMM shapes, GFLOP/s by rows.

Columns: conveyor's bf16 path (oneDNN, prepacked: ``models/packed.PackedLinear``); conveyor's
``--quantization int8`` path (``models/int8.Int8Linear``: fused per-token quantize, oneDNN int8
GEMM, fused dequantize, bf16 in and out); oneDNN's
u8 x s8 linear (VNNI where present) with per-channel weight scales, with the per-call dynamic
activation quantization done in torch ops, and the same GEMM alone on already-quantized inputs;
torch's int8 weight-only matmul. Weights are random: this measures speed, not accuracy.

    python scripts/int8_gemm_rate.py [--rows 1,16,64,512,2048]
"""

from __future__ import annotations

import argparse
import time

import torch

from conveyor import platform
from conveyor.kernels import is_available
from conveyor.models.int8 import Int8Linear, quantize_weight
from conveyor.models.packed import PackedLinear

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]   # qkv, o, gate_up, down (out, in)


def _rate(fn, flops: float) -> float:
    fn()
    reps = max(3, int(2e9 / flops))
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return flops * reps / (time.perf_counter() - t0) / 1e9


def _quantized(rows: int):
    out = []
    for n, k in SHAPES:
        qw, scale = quantize_weight(torch.randn(n, k))
        out.append((torch.ops.onednn.qlinear_prepack(qw, [rows, k]), scale,
                    torch.zeros(n, dtype=torch.int64), k))
    return out


def rates(rows: int) -> dict[str, float]:
    flops = sum(2.0 * rows * n * k for n, k in SHAPES)
    x = {k: torch.randn(rows, k).to(torch.bfloat16) for k in (576, 1536)}
    packed = [(PackedLinear(torch.nn.Linear(k, n, bias=False).to(torch.bfloat16)), k)
              for n, k in SHAPES]
    q = _quantized(rows)
    qx = {k: torch.randint(0, 255, (rows, k), dtype=torch.uint8) for k in (576, 1536)}
    w8 = [(torch.randint(-128, 127, (n, k), dtype=torch.int8), torch.rand(n).to(torch.bfloat16), k)
          for n, k in SHAPES]

    def qlinear(xq, s, w, ws, wz):
        return torch.ops.onednn.qlinear_pointwise(xq, s, 128, w, ws, wz, None, 1.0, 0,
                                                  torch.bfloat16, "none", [], "")

    def w8a8():
        for w, ws, wz, k in q:
            s = float(x[k].abs().max()) / 127 + 1e-8
            xq = torch.clamp((x[k].float() / s).round() + 128, 0, 255).to(torch.uint8)
            qlinear(xq, s, w, ws, wz)

    int8 = [(Int8Linear(lin.weight, None, is_available()), k)
            for lin, k in ((torch.nn.Linear(k, n, bias=False).to(torch.bfloat16), k)
                           for n, k in SHAPES)]
    return {
        "bf16 prepacked": _rate(lambda: [lin(x[k]) for lin, k in packed], flops),
        "conveyor Int8Linear": _rate(lambda: [lin(x[k]) for lin, k in int8], flops),
        "int8 w8a8 + quantize": _rate(w8a8, flops),
        "int8 w8a8 GEMM only": _rate(lambda: [qlinear(qx[k], 0.05, w, ws, wz)
                                              for w, ws, wz, k in q], flops),
        "int8 weight-only": _rate(lambda: [torch._weight_int8pack_mm(x[k], w, s)
                                           for w, s, k in w8], flops),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,16,64,512,2048")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"# {platform.describe(torch.device('cpu'))}")
    table = {int(r): rates(int(r)) for r in args.rows.split(",")}
    cols = list(next(iter(table.values())))
    print("| rows | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for r, res in table.items():
        print(f"| {r} | " + " | ".join(f"{res[c]:.0f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
