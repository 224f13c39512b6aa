"""What int8 would cost in accuracy, simulated: perplexity with fake-quantized layer GEMMs.

Every linear layer of the model except the LM head gets per-output-channel symmetric int8
weights; activations are quantized per call to u8 (asymmetric) with one scale for the whole
tensor (what oneDNN's qlinear takes) or one per token, or left alone (weight-only). Computed in
fp32 on the plain-PyTorch path, so it measures the rounding, not a kernel. Same text and
perplexity as ``bf16_accuracy.py``.

    python scripts/int8_accuracy.py [--model PATH] [--text FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

os.environ["CONVEYOR_DISABLE_PACKED_LINEAR"] = "1"       # plain nn.Linear: weights editable
sys.path.insert(0, str(Path(__file__).parent))

from bf16_accuracy import perplexity

from conveyor.engine.llm_engine import LLMEngine


def int8_weight(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(1, keepdim=True) / 127
    return (w / scale).round().clamp(-127, 127) * scale


def _u8(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    scale = (hi - lo).clamp_min(1e-8) / 255
    zero = (-lo / scale).round()
    return ((x / scale).round() + zero).clamp(0, 255).sub(zero).mul(scale)


def per_tensor(x: torch.Tensor) -> torch.Tensor:
    return _u8(x, x.min(), x.max())


def per_token(x: torch.Tensor) -> torch.Tensor:
    return _u8(x, x.amin(-1, keepdim=True), x.amax(-1, keepdim=True))


def per_token_symmetric(x: torch.Tensor) -> torch.Tensor:
    scale = (x.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-8)
    return (x / scale).round().clamp(-127, 127) * scale


def as_int8_engine(x: torch.Tensor) -> torch.Tensor:
    """What ``--quantization int8`` does (``models/int8.quantize_rows_reference``)."""
    from conveyor.models.int8 import quantize_rows_reference
    q, scale, offset = quantize_rows_reference(x)
    return ((q.float() - 128) * scale[:, None] + offset[:, None]).to(x.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--text", default=str(Path(__file__).parent.parent / "docs" / "architecture.md"))
    args = ap.parse_args()
    engine = LLMEngine.from_kwargs(model=args.model, dtype="float32", max_num_seqs=4)
    ids = engine.tokenizer.encode(Path(args.text).read_text(), add_special_tokens=False)[:1024]
    layers = [(n, m) for n, m in engine.runner.model.named_modules()
              if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    original = {n: m.weight.data.clone() for n, m in layers}
    base = perplexity(engine, ids)
    print(f"{len(ids)} tokens of {args.text}; {len(layers)} linear layers quantized\n")
    print("| variant | perplexity | vs fp32 |\n|---|---|---|")
    print(f"| fp32 | {base:.2f} | – |")
    variants = [("int8 weights only", None, ()), ("w8a8, one activation scale per tensor", per_tensor, ()),
                ("w8a8, one activation scale per token", per_token, ()),
                ("w8a8, per token, symmetric around 0", per_token_symmetric, ()),
                ("w8a8, per token, integer zero point, as --quantization int8", as_int8_engine, ()),
                ("w8a8 per tensor, down_proj left in fp32", per_tensor, ("down_proj",))]
    for label, act, skip in variants:
        hooks = []
        for n, m in layers:
            if any(k in n for k in skip):
                continue
            m.weight.data.copy_(int8_weight(original[n]))
            if act is not None:
                hooks.append(m.register_forward_pre_hook(lambda _m, a, f=act: (f(a[0]),)))
        ppl = perplexity(engine, ids)
        print(f"| {label} | {ppl:.2f} | {100 * (ppl / base - 1):+.1f}% |")
        for h in hooks:
            h.remove()
        for n, m in layers:
            m.weight.data.copy_(original[n])


if __name__ == "__main__":
    main()
