"""What structured outputs cost: N concurrent JSON-schema requests vs the same requests free.

One engine, one process, side by side: the same N chat prompts run unconstrained and constrained
by a JSON schema, alternating, ``--reps`` times each; every request generates exactly
``--max-tokens`` tokens (the schema asks for more items than fit, so the grammar never ends
early, and the free run ignores EOS), so both sides run the same batch shapes. Reported: output
tokens per second of each run and the constrained / free ratio (best run against best run,
and the median over pairs), and the wall time spent in the structured-outputs work of the
constrained runs (bitmask fill on the engine thread, mask application in the sampler, matcher
advance) as a share of their wall time: on a busy machine the ratio is noisy, that share much
less so. The first compile (llguidance tokenizer + schema) is timed apart and not in the runs.

    python scripts/bench_structured.py [--requests 32] [--max-tokens 64] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import conveyor.core.engine_core as engine_core
import conveyor.sampling.sampler as sampler
from conveyor import platform
from conveyor.structured.request_state import StructuredRequest
from conveyor.sampling_params import SamplingParams
from conveyor.engine.llm_engine import LLMEngine
from conveyor.structured import StructuredOutputsParams

SCHEMA = {"type": "object", "required": ["orders"], "properties": {"orders": {
    "type": "array", "minItems": 200, "items": {
        "type": "object", "required": ["item", "quantity", "express"],
        "properties": {"item": {"type": "string", "maxLength": 24},
                       "quantity": {"type": "integer", "minimum": 1},
                       "express": {"type": "boolean"}}}}}}


class Timer:
    """Wall seconds spent inside the wrapped functions."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed


@contextmanager
def timing_structured_work(timer: Timer):
    saved = (engine_core.grammar_bitmask, sampler.apply_grammar_mask, StructuredRequest.accept)
    engine_core.grammar_bitmask = timer.wrap(saved[0])
    sampler.apply_grammar_mask = timer.wrap(saved[1])
    StructuredRequest.accept = timer.wrap(saved[2])
    try:
        yield
    finally:
        engine_core.grammar_bitmask, sampler.apply_grammar_mask, StructuredRequest.accept = saved


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, int]:
    """(wall seconds, output tokens) of all prompts run together to completion."""
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(p, params, request_id=f"r{i}")
    tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens += sum(len(c.token_ids) for c in out.outputs)
    return time.perf_counter() - start, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    engine = LLMEngine.from_kwargs(dtype=args.dtype, max_num_seqs=args.requests,
                                   max_num_batched_tokens=2048)
    tok = engine.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content":
               f"List the orders of customer {i} as JSON."}]) for i in range(args.requests)]
    spec = StructuredOutputsParams(json=SCHEMA)
    start = time.perf_counter()
    engine.structured.service.submit(spec).result()
    print(f"first compile (tokenizer + schema): {time.perf_counter() - start:.2f} s", flush=True)
    free = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                 structured_outputs=spec)
    run(engine, prompts[:4], free)                      # warm-up (kernels, allocator)
    rates = {"free": [], "json": []}
    timer, json_wall = Timer(), 0.0
    for _ in range(args.reps):
        for name, params in (("free", free), ("json", constrained)):
            with timing_structured_work(timer) if name == "json" else _nothing():
                wall, tokens = run(engine, prompts, params)
            assert tokens == args.requests * args.max_tokens, tokens
            json_wall += wall if name == "json" else 0.0
            rates[name].append(tokens / wall)
            print(f"{name:5s} {tokens} tokens in {wall:.2f} s = {tokens / wall:.1f} tok/s",
                  flush=True)
    engine.check_invariants()
    print(f"structured work: {timer.seconds:.2f} s of {json_wall:.2f} s "
          f"({100 * timer.seconds / json_wall:.1f}%)")
    pairs = [j / f for f, j in zip(rates["free"], rates["json"])]
    print(f"json/free: best {max(rates['json']) / max(rates['free']):.3f}; median pair "
          f"{statistics.median(pairs):.3f}; per pair {' '.join(f'{r:.3f}' for r in pairs)}")
    print(platform.describe(engine.device))


@contextmanager
def _nothing():
    yield


if __name__ == "__main__":
    main()
