"""Replay speculative proposers offline against recorded greedy outputs, to compare settings in
seconds instead of benchmark runs.

    PYTHONPATH=. python scripts/spec_replay.py scripts/workloads/grounded_chats.jsonl \
        --config '{"method":"ngram","num_speculative_tokens":16,"prompt_lookup_max":8,"prompt_lookup_min":1}' \
        --config '{"method":"ngram","num_speculative_tokens":4,"prompt_lookup_max":4,"prompt_lookup_min":2}'

Greedy drafts are accepted exactly while they equal the output the model gives without them
(token-identical in fp32), so one greedy generation per request (no speculation, the rows'
``ignore_eos``) fixes every step's outcome: a step accepts the longest prefix of the draft that
matches the recorded continuation, then adds one token. Each configuration is replayed with the
real proposer (``spec_decode.build_proposer``) and, when adaptive, the real ``SpecPolicy`` (one
for the run, as in the engine) fed one request at a time (one user), and priced with a step cost
``a + b * tokens`` fitted on timed single-request steps of 1 to 17 tokens (``--step-cost A,B`` in milliseconds overrides
it). Prints, per configuration, the predicted tokens per second against
no speculation, the acceptance rate and the mean accepted length. A prediction, not a
measurement: ``scripts/bench_spec.py`` measures; this ranks settings before you measure them.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from conveyor.bench.datasets import load_workload_file
from conveyor.config import SpeculativeConfig
from conveyor.core.spec_policy import SpecPolicy
from conveyor.core.step_cost import StepFeatures
from conveyor.engine.llm_engine import LLMEngine
from conveyor.sampling_params import SamplingParams
from conveyor.spec_decode import build_proposer


class _FixedCost:
    """A step costs ``fixed + per_token * tokens`` (``core.spec_policy.StepCost``)."""

    is_ready = True

    def __init__(self, fixed_s: float, per_token_s: float):
        self.fit = (fixed_s, per_token_s)

    def predict(self, features: StepFeatures) -> float:
        return self.fit[0] + self.fit[1] * features.num_tokens

    def token_seconds(self, n: int, cached: int) -> float:
        return self.fit[1]


def record(model: str | None, path: str) -> tuple[list[tuple[list[int], list[int]]], tuple]:
    """(prompt, greedy output) per request, and the measured (fixed, per-token) step cost."""
    engine = LLMEngine.from_kwargs(model=model, max_num_seqs=1, speculative_config=_CALIBRATE)
    fit = calibrate(engine)
    engine.core.scheduler.spec, engine.runner.proposer = None, None    # record without drafts
    workload = load_workload_file(path, engine.tokenizer)
    pairs = []
    for req in workload.requests:
        out = _generate(engine, req.prompt_token_ids, SamplingParams(
            temperature=0.0, max_tokens=req.max_tokens, ignore_eos=req.ignore_eos),
            f"replay-{req.request_id}")
        pairs.append((req.prompt_token_ids, out))
    engine.check_invariants()
    return pairs, fit


_CALIBRATE = '{"method":"ngram","num_speculative_tokens":16,"prompt_lookup_max":8,' \
             '"prompt_lookup_min":1,"adaptive":false}'


def _generate(engine, prompt: list[int], params: SamplingParams, rid: str) -> list[int]:
    engine.add_request(prompt, params, request_id=rid)
    out: list[int] = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            out += o.outputs[0].delta_token_ids
    return out


def calibrate(engine) -> tuple[float, float]:
    """Least-squares ``a + b * tokens`` over timed single-request decode steps of 1 to 17
    tokens: a looping prompt makes the n-gram drafts (and so the step sizes) vary."""
    runner, execute, samples = engine.runner, engine.runner.execute, []

    def timed(sched):
        t0 = time.perf_counter()
        out = execute(sched)
        if not sched.new_requests and sched.total_num_scheduled_tokens:
            samples.append((sched.total_num_scheduled_tokens, time.perf_counter() - t0))
        return out

    runner.execute = timed
    try:
        loop = [(7 * i) % 97 + 100 for i in range(40)]
        for i in range(4):
            _generate(engine, loop * 3, SamplingParams(temperature=0.0, max_tokens=96,
                                                       ignore_eos=True), f"calibrate-{i}")
    finally:
        runner.execute = execute
    samples = samples[len(samples) // 4:]             # after the warm-up
    n = len(samples)
    mx = sum(x for x, _ in samples) / n
    my = sum(y for _, y in samples) / n
    var = sum((x - mx) ** 2 for x, _ in samples)
    b = sum((x - mx) * (y - my) for x, y in samples) / var if var else 0.0
    return my - b * mx, b


def replay(pairs, config: SpeculativeConfig, cost: tuple[float, float]) -> dict:
    fixed, per_token = cost
    proposer = build_proposer(config)
    off = on = 0.0
    drafts = draft_tokens = accepted = 0
    policy = SpecPolicy(config.num_speculative_tokens,
                        _FixedCost(fixed, per_token) if config.adaptive else None)
    for i, (prompt, output) in enumerate(pairs):
        rid = f"r{i}"
        off += (len(output) - 1) * (fixed + per_token)    # the first token comes with prefill
        pos = 1
        while pos < len(output):
            limit = len(output) - pos - 1                 # room for the drafts plus one token
            ctx = len(prompt) + pos
            k = policy.plan({rid: limit}, StepFeatures.of([(1, ctx - 1)]), {rid: ctx}).get(rid, 0) \
                if limit > 0 else 0
            d = proposer.propose({rid: (prompt + output[:pos], k)}, {rid: ""}).get(rid, []) \
                if k else []
            a = 0
            while a < len(d) and d[a] == output[pos + a]:
                a += 1
            if d:
                policy.record(rid, len(d), a)
                drafts, draft_tokens, accepted = drafts + 1, draft_tokens + len(d), accepted + a
            on += fixed + per_token * (1 + len(d))
            pos += a + 1
        proposer.drop(rid, finished=True)
        policy.forget(rid)
    return {"predicted_vs_off": round(off / on, 3) if on else None,
            "acceptance_rate": round(accepted / draft_tokens, 3) if draft_tokens else None,
            "mean_accepted_length": round(1 + accepted / drafts, 2) if drafts else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workload", help="JSONL workload (conveyor's replay format)")
    p.add_argument("--config", action="append", required=True,
                   help="a --speculative-config JSON (ngram or suffix); repeat to compare")
    p.add_argument("--model", default=None)
    p.add_argument("--step-cost", default=None, help="A,B: fixed and per-token milliseconds")
    p.add_argument("--recording", default=None,
                   help="JSON file: reuse the recorded outputs and fit if it exists, else save them")
    args = p.parse_args()
    configs = [SpeculativeConfig.from_json(c) for c in args.config]
    for c in configs:
        if c.method == "draft_model":
            p.error("draft_model drafts depend on the draft model's run; measure them with "
                    "scripts/bench_spec.py")
    if args.recording and os.path.exists(args.recording):
        with open(args.recording) as f:
            saved = json.load(f)
        pairs, fit = [tuple(x) for x in saved["pairs"]], saved["fit"]
    else:
        pairs, fit = record(args.model, args.workload)
        if args.recording:
            with open(args.recording, "w") as f:
                json.dump({"pairs": pairs, "fit": fit}, f)
    if args.step_cost:
        a, b = (float(x) / 1000 for x in args.step_cost.split(","))
        fit = (a, b)
    if fit is None:
        p.error("the engine has no step-cost fit yet; pass --step-cost A,B (milliseconds)")
    print(json.dumps({"step_cost_ms": [round(fit[0] * 1000, 2), round(fit[1] * 1000, 3)],
                      "requests": len(pairs), "output_tokens": sum(len(o) for _, o in pairs)}))
    for text, config in zip(args.config, configs):
        print(json.dumps({"config": json.loads(text), **replay(pairs, config, fit)}))


if __name__ == "__main__":
    main()
