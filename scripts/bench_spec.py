"""Speculative decoding side by side in one sitting: one engine (one model load), every workload
run with speculation off and on, alternating, so a shared machine's load hits both alike.

    python scripts/bench_spec.py --speculative-config '{"method":"ngram",...}' \
        --grounded scripts/workloads/grounded_chats.jsonl \
        --peer ../shared/peers/workload_small.jsonl --max-num-seqs 32

Grounded chats run one request at a time (one user); the peer workload all at once (up to
``--max-num-seqs`` concurrent). Both are greedy with EOS ignored (``bench_params``), so both
variants generate the same number of tokens (checked; token identity is the tests' job). Prints
one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import time

from conveyor.bench.datasets import load_workload_file
from conveyor.bench.metrics import summarize
from conveyor.bench.offline import run_offline, warm_up
from conveyor.bench.workloads import Workload
from conveyor.engine.llm_engine import LLMEngine


def _switch(engine, saved, on: bool) -> None:
    engine.core.scheduler.spec = saved[0] if on else None
    engine.runner.proposer = saved[1] if on else None


def _one_at_a_time(engine, workload: Workload, label: str):
    records, spec = [], {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0}
    for req in workload.requests:
        req.arrival_s = 0.0
        run = run_offline(engine, Workload(workload.name, [req]), label, progress=False,
                          id_prefix=f"{label}-{req.request_id}")
        records += run.records
        for key in spec:
            spec[key] += ((run.engine_stats or {}).get("spec_decode") or {}).get(key, 0)
    busy = sum(r.finish - r.arrival for r in records if r.success)
    tokens = sum(r.output_len for r in records if r.success)
    return tokens / busy, records, spec


def _all_at_once(engine, workload: Workload, label: str):
    run = run_offline(engine, workload, label, progress=False)
    summary = summarize(run.records)
    return summary.output_throughput, run.records, (run.engine_stats or {}).get("spec_decode")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--speculative-config", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--grounded", default=None)
    p.add_argument("--peer", default=None)
    p.add_argument("--peer-prompts", type=int, default=None)
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    engine = LLMEngine.from_kwargs(model=args.model, max_num_seqs=args.max_num_seqs,
                                   speculative_config=args.speculative_config)
    warm_up(engine)
    saved = (engine.core.scheduler.spec, engine.runner.proposer)
    jobs = []
    if args.grounded:
        jobs.append(("grounded", load_workload_file(args.grounded, engine.tokenizer),
                     _one_at_a_time))
    if args.peer:
        jobs.append(("peer", load_workload_file(args.peer, engine.tokenizer, args.peer_prompts),
                     _all_at_once))
    for rnd in range(args.rounds):
        for name, workload, runner in jobs:
            tokens = {}
            for on in (False, True):
                _switch(engine, saved, on)
                label = f"{name}-{'spec' if on else 'off'}-{rnd}"
                t0 = time.monotonic()
                rate, records, spec = runner(engine, workload, label)
                tokens[on] = [r.output_len for r in records]
                print(json.dumps({"run": label, "output_tok_s": round(rate, 2),
                                  "wall_s": round(time.monotonic() - t0, 1), "spec": spec}),
                      flush=True)
            print(json.dumps({"workload": name, "round": rnd,
                              "same_lengths": tokens[False] == tokens[True]}), flush=True)
    engine.check_invariants()


if __name__ == "__main__":
    main()
