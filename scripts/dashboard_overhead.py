"""What the dashboard costs a running server, at N running requests (default 64).

Measures (1) ``BeltFeed.on_step``, the only dashboard work on the engine thread, on a step with N
slots held; (2) one dashboard frame built from a full belt (BELT_STEPS steps x N slots), which
runs on the event loop every ``FRAME_INTERVAL_S`` per open page and competes for the GIL; and
(3) unless --no-model, the real decode step time of the default model at N running, to put the
two in proportion. Usage: python scripts/dashboard_overhead.py [--running 64] [--no-model]
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

from conveyor.core.outputs import StepStats
from conveyor.metrics.belt import BELT_STEPS
from conveyor.metrics.prometheus import ServingMetrics
from conveyor.server.dashboard import FRAME_INTERVAL_S, build_frame


def fake_engine(n: int) -> SimpleNamespace:
    ids = [f"cmpl-{i:032x}" for i in range(n)]
    stats = StepStats(max_num_seqs=n, num_running=n, num_scheduled_tokens=n, num_decode_tokens=n,
                      slot_of={rid: i for i, rid in enumerate(ids)}, useful_request_ids=list(ids),
                      decode_request_ids=list(ids),
                      tenant_slots={f"t{t}": len(ids[t::3]) for t in range(min(3, n))})
    return SimpleNamespace(last_step_stats=stats)


def time_feed(n: int, reps: int = 5000) -> tuple[float, float, float]:
    """(on_step µs, first frame ms, later frame ms) with N slots held."""
    metrics = ServingMetrics(lambda: None)
    engine = fake_engine(n)
    t0 = time.perf_counter()
    for _ in range(reps):
        now = time.monotonic()
        metrics.on_step(engine, now - 0.05, now)
    on_step_us = (time.perf_counter() - t0) / reps * 1e6
    for rid in engine.core.scheduler.requests:       # a minute of latencies, as under load
        metrics.recent.next_token(time.monotonic(), 0.05)
    state = SimpleNamespace(metrics=metrics, engine=None, model_name="m", load_error=None,
                            draining=False)
    assert len(metrics.belt.belt()) == BELT_STEPS
    frame_ms = []
    last = metrics.belt.totals.num_steps - 1
    for after in (-1, last - 5):       # the first frame (whole belt), a later one (5 new steps)
        t0 = time.perf_counter()
        for _ in range(50):
            json.dumps(build_frame(state, after)[0])
        frame_ms.append((time.perf_counter() - t0) / 50 * 1e3)
    return on_step_us, frame_ms[0], frame_ms[1]


def decode_step_ms(n: int, steps: int = 8) -> float:
    from conveyor.sampling_params import SamplingParams
    from conveyor.engine.llm_engine import LLMEngine
    engine = LLMEngine.from_kwargs(max_num_seqs=n, max_num_batched_tokens=4096, max_model_len=512)
    params = SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True)
    for i in range(n):
        engine.add_request([100 + (i * 7 + j) % 5000 for j in range(32)], params)
    while engine.core.scheduler.last_stats.num_decode_tokens < n:
        engine.step()                                   # prefill until everyone decodes
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--running", type=int, default=64)
    p.add_argument("--no-model", action="store_true")
    args = p.parse_args()
    on_step_us, first_ms, frame_ms = time_feed(args.running)
    print(f"on_step (engine thread) at {args.running} running: {on_step_us:.1f} us per step")
    print(f"first frame ({BELT_STEPS} steps x {args.running} slots): {first_ms:.2f} ms, once")
    print(f"later frame (5 new steps): {frame_ms:.2f} ms, every "
          f"{FRAME_INTERVAL_S} s per open page = {100 * frame_ms / 1e3 / FRAME_INTERVAL_S:.2f}% "
          "of the event loop")
    if not args.no_model:
        step_ms = decode_step_ms(args.running)
        print(f"decode step, default model, {args.running} running: {step_ms:.1f} ms; on_step adds "
              f"{100 * on_step_us / 1e3 / step_ms:.3f}% to it; frames hold the GIL "
              f"{100 * frame_ms / 1e3 / FRAME_INTERVAL_S:.2f}% of the time per open page, so "
              "they slow steps by at most that")


if __name__ == "__main__":
    main()
