"""Where one engine step spends its time, at 1, 8, 32 and 64 running requests.

usage: python scripts/profile_step.py [--batch-sizes 1,8,32,64] [--prompt-len 256] [--steps 20]
                                      [--dtype auto] [--attention-backend auto] [--json OUT]

For each batch size B: B requests with ``--prompt-len``-token prompts are prefilled, then
``--steps`` decode steps with all B running are timed. Two passes over the same steps:

1. wall clock per phase, with perf_counter wrappers only (no profiler): scheduling
   (``schedule`` + ``update_from_output``), input preparation (flat batch, metadata, copies),
   model forward, LM head, sampling, output processing (detokenize, stop strings);
2. torch.profiler over the forward, to split the forward's time into GEMMs (``aten::mm`` /
   ``addmm`` / ``linear``), attention (the paged kernel + KV writes) and the rest (norms, RoPE,
   activations, residual adds, framework overhead between ops).

The report multiplies the forward's wall time by the profiler's shares, so the printed times add
up to the measured step time. It is the table of BENCHMARKS.md's profile section.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import defaultdict

import torch

from conveyor import platform
from conveyor.runner import model_runner as mr
from conveyor.sampling_params import SamplingParams
from conveyor.engine.llm_engine import LLMEngine

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
            "aten::_weight_int8pack_mm", "mkldnn::_linear_pointwise", "conveyor_cpu::bf16_linear")
ATTN_OPS = ("conveyor_cpu::paged_attention", "aten::index_copy_", "aten::_scaled_dot_product",
            "conveyor_cpu::write_kv")


class PhaseTimer:
    """Accumulates wall time per phase name; ``wrap`` replaces a bound method by a timed one."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self._undo: list = []

    def wrap(self, obj, attr: str, phase: str) -> None:
        inner = getattr(obj, attr)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                self.totals[phase] += time.perf_counter() - t
        setattr(obj, attr, timed)
        self._undo.append((obj, attr, inner))

    def restore(self) -> None:
        for obj, attr, inner in reversed(self._undo):
            setattr(obj, attr, inner)
        self._undo.clear()


def _instrument(engine: LLMEngine, timer: PhaseTimer) -> None:
    sched, runner = engine.core.scheduler, engine.runner
    timer.wrap(sched, "schedule", "scheduling")
    timer.wrap(sched, "update_from_output", "scheduling")
    timer.wrap(runner.model, "forward", "forward")
    timer.wrap(runner.model, "compute_logits", "lm_head")
    timer.wrap(runner, "_sample", "sampling")
    timer.wrap(engine.output_processor, "process", "output_processing")


def _fill(engine: LLMEngine, batch: int, prompt_len: int, decode_room: int) -> None:
    params = SamplingParams(max_tokens=decode_room, ignore_eos=True, temperature=0.0)
    for i in range(batch):
        # distinct prompts: no prefix-cache sharing between requests
        engine.add_request([(7 * i + j) % 30000 + 100 for j in range(prompt_len)], params)
    while any(r.num_computed_tokens < r.num_tokens - 1 or r.num_output_tokens == 0
              for r in engine.core.scheduler.requests.values()):
        engine.step()


def profile_batch(engine: LLMEngine, batch: int, prompt_len: int, steps: int) -> dict:
    _fill(engine, batch, prompt_len, decode_room=3 * steps + 8)
    running = len(engine.core.scheduler.running)
    assert running == batch, f"expected {batch} running, got {running}"
    for _ in range(2):
        engine.step()                                            # warm-up
    timer = PhaseTimer()
    _instrument(engine, timer)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = (time.perf_counter() - t0) / steps
    timer.restore()
    phases = {k: v / steps for k, v in timer.totals.items()}
    # what the wrapped phases do not cover: flat batch building, host->device copies, runner state
    phases["input_prep"] = max(0.0, wall - sum(phases.values()))
    # forward split by the profiler
    shares = _forward_shares(engine, steps)
    fwd = phases.pop("forward")
    phases["gemm"] = fwd * shares["gemm"]
    phases["attention"] = fwd * shares["attention"]
    phases["other_model_ops"] = fwd * shares["other"]
    _drain(engine)
    return {"batch": batch, "step_ms": wall * 1e3,
            "phases_ms": {k: v * 1e3 for k, v in sorted(phases.items())}}


def _forward_shares(engine: LLMEngine, steps: int) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile
    n = max(3, steps // 4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            engine.step()
    cat = defaultdict(float)
    fwd_total = 0.0
    for evt in prof.key_averages():
        name, self_us = evt.key, evt.self_cpu_time_total
        if name in GEMM_OPS:
            cat["gemm"] += self_us
        elif name in ATTN_OPS:
            cat["attention"] += self_us
    # forward wall under the profiler: the sum of self times of everything inside model.forward is
    # hard to get from key_averages; use the profiled forward events' total instead
    lm_total = 0.0
    for evt in prof.events():
        if evt.name == "forward_marker":
            fwd_total += evt.cpu_time_total
        elif evt.name == "lm_head_marker":     # its GEMM is reported apart, as the LM head
            lm_total += evt.cpu_time_total
    total = fwd_total or sum(e.self_cpu_time_total for e in prof.key_averages())
    gemm, attn = max(0.0, cat["gemm"] - lm_total) / total, cat["attention"] / total
    return {"gemm": gemm, "attention": attn, "other": max(0.0, 1 - gemm - attn)}


def _drain(engine: LLMEngine) -> None:
    for rid in list(engine.core.scheduler.requests):
        engine.core.abort_requests([rid])
    engine.check_invariants()


@contextlib.contextmanager
def _forward_marker(engine: LLMEngine):
    model = engine.runner.model
    inner, inner_logits = model.forward, model.compute_logits

    def marked(*a, **k):
        with torch.profiler.record_function("forward_marker"):
            return inner(*a, **k)

    def marked_logits(*a, **k):
        with torch.profiler.record_function("lm_head_marker"):
            return inner_logits(*a, **k)
    model.forward, model.compute_logits = marked, marked_logits
    try:
        yield
    finally:
        model.forward, model.compute_logits = inner, inner_logits


def gemm_rate(model, dtype: torch.dtype, rows=(64, 512, 2048)) -> dict[int, float]:
    """GFLOP/s of the model's own layer GEMMs (all layers, as the forward runs them) at each
    row count: the measured ceiling the model-FLOPs arithmetic in BENCHMARKS.md divides by."""
    layers = model.model.layers
    width = {"qkv": model.config.hidden_size, "o": model.config.hidden_size,
             "gate_up": model.config.hidden_size, "down": model.config.intermediate_size}
    out = {}
    with torch.inference_mode():
        for m in rows:
            xs = {k: torch.randn(m, w).to(dtype) for k, w in width.items()}
            def run():
                for layer in layers:
                    layer.self_attn.qkv_proj(xs["qkv"])
                    layer.self_attn.o_proj(xs["o"])
                    layer.mlp.gate_up_proj(xs["gate_up"])
                    layer.mlp.down_proj(xs["down"])
            run()
            n = max(2, 64 * 8 // m)
            t = time.perf_counter()
            for _ in range(n):
                run()
            dt = (time.perf_counter() - t) / n
            weights = sum(mod.in_features * mod.out_features for layer in layers
                          for mod in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                      layer.mlp.gate_up_proj, layer.mlp.down_proj))
            out[m] = 2 * m * weights / dt / 1e9
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch-sizes", default="1,8,32,64")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--no-fused-ops", action="store_true",
                    help="plain-PyTorch norms/RoPE/KV write (the 'before' column)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    engine = LLMEngine.from_kwargs(model=args.model, dtype=args.dtype, max_num_seqs=max(sizes),
                                   max_num_batched_tokens=2048, enable_prefix_caching=False,
                                   attention_backend=args.attention_backend)
    if args.no_fused_ops:
        for module in engine.model.modules():
            if hasattr(module, "fused"):
                module.fused = False
    print(f"# {platform.describe(engine.device)} dtype={engine.dtype} "
          f"attention={engine.attention_backend} fused_ops={not args.no_fused_ops}")
    rows = []
    with _forward_marker(engine):
        for b in sizes:
            rows.append(profile_batch(engine, b, args.prompt_len, args.steps))
    cols = ["gemm", "attention", "other_model_ops", "lm_head", "sampling", "input_prep",
            "scheduling", "output_processing"]
    print("| running | step ms | tok/s | " + " | ".join(cols) + " | model math |")
    print("|---|---|---|" + "---|" * (len(cols) + 1))
    for r in rows:
        p, step = r["phases_ms"], r["step_ms"]
        math = (p["gemm"] + p["attention"] + p["lm_head"]) / step
        cells = [f"{p.get(c, 0):.2f} ({100 * p.get(c, 0) / step:.0f}%)" for c in cols]
        print(f"| {r['batch']} | {step:.2f} | {r['batch'] / step * 1e3:.0f} | " + " | ".join(cells)
              + f" | {100 * math:.0f}% |")
    rates = gemm_rate(engine.model, engine.dtype)
    print("\nlayer GEMMs (" + str(engine.dtype) + "), GFLOP/s by rows: " +
          ", ".join(f"{m}: {r:.0f}" for m, r in rates.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"platform": platform.describe(engine.device), "dtype": str(engine.dtype),
                       "rows": rows, "gemm_gflops": rates}, f, indent=1)


if __name__ == "__main__":
    main()
