"""The accuracy cost of serving in bf16 instead of fp32, on the default (or given) model.

usage: python scripts/bf16_accuracy.py [--model PATH] [--text FILE] [--max-tokens 64] [--int8]

1. Perplexity of a fixed text (default: this repository's docs/architecture.md, first 1,024
   tokens) under fp32 and bf16, from one prefill through the engine's own model and KV cache.
2. Greedy agreement: a fixed set of chat prompts generated greedily by an fp32 engine and a bf16
   engine; tokens that agree until the first divergence, over all tokens.
Prints one Markdown table (BENCHMARKS.md's bf16 accuracy rows); ``--int8`` adds a row for
``--quantization int8``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from conveyor.attention.backend import AttentionMetadata
from conveyor.sampling_params import SamplingParams
from conveyor.engine.llm_engine import LLMEngine

PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.",
    "Explain continuous batching in one paragraph.", "List three prime numbers above 100.",
    "Translate 'good morning' into Spanish and German.", "Why is the sky blue?",
    "Give a short recipe for pancakes.", "What does a paged KV cache do?",
    "Summarise the plot of Romeo and Juliet.", "Write a Python function that reverses a string.",
]


def perplexity(engine: LLMEngine, ids: list[int]) -> float:
    """exp(mean NLL of each next token) from one prefill of ``ids`` into blocks 0..n-1."""
    n, bs = len(ids), engine.config.cache.block_size
    blocks = -(-n // bs)
    assert blocks <= engine.num_kv_blocks, "text longer than the KV cache"
    md = AttentionMetadata(
        query_start_loc=torch.tensor([0, n]), seq_lens=torch.tensor([n]),
        block_tables=torch.arange(blocks).unsqueeze(0), slot_mapping=torch.arange(n),
        query_start_loc_cpu=[0, n], query_lens_cpu=[n], seq_lens_cpu=[n], max_query_len=n,
        max_seq_len=n)
    model = engine.runner.model
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(n), engine.runner.kv_caches, md)
        logp = torch.log_softmax(model.compute_logits(hidden[:-1]), dim=-1)          # [n-1, V]
        nll = -logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).mean().item()
    return math.exp(nll)


def greedy(engine: LLMEngine, max_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    tok = engine.tokenizer
    ids = [engine.add_request(tok.encode_chat([{"role": "user", "content": p}]), params)
           for p in PROMPTS]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[i] for i in ids]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--text", default=str(Path(__file__).resolve().parent.parent / "docs" /
                                          "architecture.md"))
    ap.add_argument("--text-tokens", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--int8", action="store_true",
                    help="also measure --quantization int8 (bf16 where the CPU has it, else fp32)")
    args = ap.parse_args(argv)
    variants = {"fp32 (reference)": {"dtype": "float32"}, "bf16": {"dtype": "bfloat16"}}
    if args.int8:
        variants["int8 GEMMs, dtype auto"] = {"dtype": "auto", "quantization": "int8"}
    rows, outputs = {}, {}
    for name, kw in variants.items():
        engine = LLMEngine.from_kwargs(model=args.model, max_num_seqs=len(PROMPTS),
                                       enable_prefix_caching=False, **kw)
        ids = engine.tokenizer.encode(Path(args.text).read_text())[:args.text_tokens]
        rows[name] = perplexity(engine, ids)
        outputs[name] = greedy(engine, args.max_tokens)
    base = "fp32 (reference)"
    print(f"| variant | perplexity ({len(ids)} tokens of {Path(args.text).name}) | greedy agreement |")
    print("|---|---|---|")
    print(f"| {base} | {rows[base]:.4f} | — |")
    for name in list(variants)[1:]:
        agree = total = 0
        for ref, low in zip(outputs[base], outputs[name]):
            total += len(ref)
            for a, b in zip(ref, low):
                if a != b:
                    break
                agree += 1
        identical = sum(a == b for a, b in zip(outputs[base], outputs[name]))
        print(f"| {name} | {rows[name]:.4f} ({100 * (rows[name] / rows[base] - 1):+.2f}%) | "
              f"{agree}/{total} tokens until first divergence; {identical}/{len(PROMPTS)} "
              "completions identical |")

if __name__ == "__main__":
    main()
