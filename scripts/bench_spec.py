"""Speculative decoding side by side in one sitting: every workload with speculation off and on,
alternating on one engine, then llama.cpp's server with and without its n-gram speculation.

    PYTHONPATH=. python scripts/bench_spec.py \
        --speculative-config '{"method":"suffix","num_speculative_tokens":16,"prompt_lookup_max":8,"prompt_lookup_min":1}' \
        --grounded scripts/workloads/grounded_chats.jsonl --rounds 3 \
        --peer /work/shared/peers/workload_small.jsonl --peer-concurrency 32 64 \
        --llama-server ~/.cache/conveyor-peers/llama.cpp-*/bin/llama-server

Grounded chats run one request at a time (one user), each request without and with speculation
back to back (the order alternating), so machine drift hits both alike; the peer workload all
at once with up to ``--peer-concurrency`` requests running (one engine per value,
``max_num_seqs``), four runs a round in the order off, spec, spec, off (spec first in odd
rounds), each variant's round being the mean of its two runs. Everything is
greedy (``bench_params``); the peer workload ignores EOS (every system does the same work), the
grounded chats end where the answer ends (their rows say ``"ignore_eos": false``: a user is not
served the tokens after EOS). Greedy outputs are identical with and without speculation, so both
variants generate the same tokens in fp32; in bf16 the multi-token verifying step rounds
differently from a one-token step, so a near-tie can flip and a chat's answer differ (how many
chats kept the same length, and the tokens each variant generated, are printed). Each run's requests carry their own tenant, so no run hits another run's prefix cache.
llama.cpp gets the same token ids over ``/v1/completions`` (a fresh server per variant, one
slot); its ``timings`` give draft and accepted counts. Prints one JSON line per run, then a
markdown table with the machine, its load, the date and this command; over several rounds, the
spread of the per-round ratios too (mean, a 95% interval from Student's t, min and max).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request

from conveyor import platform
from conveyor.bench.datasets import load_workload_file
from conveyor.bench.metrics import summarize
from conveyor.bench.offline import run_offline, warm_up
from conveyor.bench.workloads import Workload
from conveyor.engine.llm_engine import LLMEngine
from conveyor.weights.loader import resolve_model_path

LLAMA_SPEC = "--spec-type ngram-simple --spec-ngram-simple-size-n 3 --spec-ngram-simple-size-m 4"
_SPEC_KEYS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")


def _switch(engine, saved, on: bool) -> None:
    engine.core.scheduler.spec = saved[0] if on else None
    engine.runner.proposer = saved[1] if on else None


def _own_tenant(workload: Workload, label: str) -> Workload:
    return Workload(workload.name, [dataclasses.replace(r, tenant=label, arrival_s=0.0)
                                    for r in workload.requests], workload.spec)


def _add_spec(total: dict, spec: dict | None) -> None:
    for key in _SPEC_KEYS:
        total[key] = total.get(key, 0) + ((spec or {}).get(key) or 0)


def _interleaved(engine, saved, workload: Workload, label: str, rnd: int):
    """One user: each request runs alone, without and with speculation back to back (which goes
    first alternates by request and round), so both variants see the same machine drift. Returns
    per variant (output tok/s over the time requests were in flight, records, spec counters)."""
    out = {False: ([], {}), True: ([], {})}
    for i, req in enumerate(_own_tenant(workload, label).requests):
        first = (i + rnd) % 2 == 1
        for on in (first, not first):
            _switch(engine, saved, on)
            tag = f"{label}-{'spec' if on else 'off'}"
            run = run_offline(engine, Workload(workload.name, [req]), tag, progress=False,
                              id_prefix=f"{tag}-{req.request_id}")
            out[on][0].extend(run.records)
            _add_spec(out[on][1], (run.engine_stats or {}).get("spec_decode"))
    _switch(engine, saved, True)
    result = {}
    for on, (records, spec) in out.items():
        busy = sum(r.finish - r.arrival for r in records if r.success)
        result[on] = (sum(r.output_len for r in records if r.success) / busy, records, spec)
    return result


def _all_at_once(engine, workload: Workload, label: str):
    run = run_offline(engine, _own_tenant(workload, label), label, progress=False)
    spec = {}
    _add_spec(spec, (run.engine_stats or {}).get("spec_decode"))
    return summarize(run.records).output_throughput, run.records, spec


def _row(workload: str, variant: str, rate: float, base: float | None, spec: dict | None,
         wall: float) -> dict:
    drafts, tokens = (spec or {}).get("num_drafts"), (spec or {}).get("num_draft_tokens")
    accepted = (spec or {}).get("num_accepted_tokens")
    return {"workload": workload, "variant": variant, "output_tok_s": round(rate, 2),
            "vs_off": None if not base else round(rate / base, 3),
            "acceptance_rate": round(accepted / tokens, 3) if tokens else None,
            "mean_accepted_length": round(1 + accepted / drafts, 2) if drafts else None,
            "wall_s": round(wall, 1), "spec": spec}


def _conveyor_pair(engine, name: str, workload: Workload, runner, rnd: int, rows: list) -> None:
    saved = (engine.core.scheduler.spec, engine.runner.proposer)
    if runner is _interleaved:
        t0 = time.monotonic()
        results = _interleaved(engine, saved, workload, f"{name}-{rnd}", rnd)
        wall = {on: (time.monotonic() - t0) / 2 for on in (False, True)}   # shared, split
    else:   # ABBA (BAAB in odd rounds): drift over the four runs hits both variants alike
        runs: dict[bool, list] = {False: [], True: []}
        wall = {False: 0.0, True: 0.0}
        first = rnd % 2 == 1
        for on in (first, not first, not first, first):
            _switch(engine, saved, on)
            t0 = time.monotonic()
            runs[on].append(runner(engine, workload,
                                   f"{name}-{'spec' if on else 'off'}-{rnd}-{len(runs[on])}"))
            wall[on] += time.monotonic() - t0
        _switch(engine, saved, True)
        results = {}
        for on, (a, b) in runs.items():
            spec: dict = {}
            _add_spec(spec, a[2])
            _add_spec(spec, b[2])
            results[on] = ((a[0] + b[0]) / 2, a[1], spec)
    base = results[False][0]
    for on in (False, True):
        rate, records, spec = results[on]
        row = _row(name, f"conveyor {'spec' if on else 'off'}", rate, None if not on else base,
                   spec if on else None, wall[on])
        rows.append(row)
        print(json.dumps({"run": f"{name}-{'spec' if on else 'off'}-{rnd}", **row}), flush=True)
    lengths = {on: [r.output_len for r in results[on][1]] for on in (False, True)}
    same = sum(a == b for a, b in zip(lengths[False], lengths[True]))
    print(json.dumps({"workload": name, "round": rnd, "same_lengths": f"{same}/{len(lengths[False])}",
                      "output_tokens": {"off": sum(lengths[False]), "spec": sum(lengths[True])}}),
          flush=True)


def _engine(args, max_num_seqs: int) -> LLMEngine:
    extra = {"dtype": args.dtype} if args.dtype else {}
    engine = LLMEngine.from_kwargs(model=args.model, max_num_seqs=max_num_seqs,
                                   speculative_config=args.speculative_config, **extra)
    warm_up(engine)
    return engine


def _replace(engine, args, max_num_seqs: int, fresh: bool) -> LLMEngine:
    """``engine``, or (``fresh``) a new one with ``max_num_seqs`` after checking and shutting
    down the old one."""
    if not fresh:
        return engine
    engine.check_invariants()
    engine.shutdown()
    return _engine(args, max_num_seqs)


def _post(url: str, body: dict, timeout: float = 600.0) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _llama_run(server: str, gguf: str, extra: str, workload: Workload, port: int):
    """(output tok/s one request at a time, draft tokens, accepted tokens) on a fresh server."""
    cmd = [server, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", "1",
           "-c", "4096", "-t", str(os.cpu_count() or 1), "--alias", "default", *shlex.split(extra)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(base + "/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        _post(base + "/v1/completions", {"prompt": "Hello", "max_tokens": 4, "temperature": 0})
        busy = tokens = drafts = accepted = 0
        for req in workload.requests:
            t0 = time.monotonic()
            out = _post(base + "/v1/completions", {
                "prompt": req.prompt_token_ids, "max_tokens": req.max_tokens, "temperature": 0,
                "ignore_eos": req.ignore_eos, "cache_prompt": False})
            busy += time.monotonic() - t0
            tokens += out["usage"]["completion_tokens"]
            timings = out.get("timings") or {}
            drafts += timings.get("draft_n", 0)
            accepted += timings.get("draft_n_accepted", 0)
        return tokens / busy, drafts, accepted
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _llama_pair(args, workload: Workload, rows: list) -> None:
    gguf, base = args.llama_gguf or resolve_model_path(args.model), None
    variants = [("llama.cpp off", "")] + [
        (f"llama.cpp `{extra}`", extra) for extra in (args.llama_spec_args or [LLAMA_SPEC])]
    for variant, extra in variants:
        t0 = time.monotonic()
        rate, drafts, accepted = _llama_run(args.llama_server, gguf, extra, workload, args.port)
        row = _row("grounded", variant, rate, base, None, time.monotonic() - t0)
        if extra:
            row["acceptance_rate"] = round(accepted / drafts, 3) if drafts else None
            row["spec"] = {"num_draft_tokens": drafts, "num_accepted_tokens": accepted}
        base = rate if base is None else base
        rows.append(row)
        print(json.dumps({"run": variant, **row}), flush=True)


def _pooled(rows: list[dict]) -> list[dict]:
    """One row per (workload, variant) over all rounds: the mean output tok/s, its ratio to the
    mean of the same system's "off" variant, and acceptance from the summed counters."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["workload"], r["variant"]), []).append(r)
    out = []
    for (workload, variant), rs in groups.items():
        rate = sum(r["output_tok_s"] for r in rs) / len(rs)
        off = groups.get((workload, variant.split(" ")[0] + " off"))
        base = sum(r["output_tok_s"] for r in off) / len(off) if off and off is not rs else None
        spec: dict = {}
        for r in rs:
            for key, value in (r.get("spec") or {}).items():
                if isinstance(value, (int, float)):
                    spec[key] = spec.get(key, 0) + value
        row = _row(workload, variant, rate, base, spec or None, sum(r["wall_s"] for r in rs))
        if spec and "num_drafts" not in spec:          # llama.cpp: no per-draft count
            row["mean_accepted_length"] = None
        ratios = [r["vs_off"] for r in rs if r.get("vs_off")]
        out.append({**row, "rounds": len(rs), "round_ratios": _spread(ratios)})
    return out


_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228}   # Student's t, two-sided 95%, by degrees of freedom


def _spread(ratios: list[float]) -> dict | None:
    """Mean, 95% half-width (Student's t over the rounds), min and max of per-round ratios."""
    if len(ratios) < 2:
        return None
    n, sd = len(ratios), statistics.stdev(ratios)
    return {"mean": round(statistics.mean(ratios), 3),
            "ci95": round(_T95.get(n - 1, 1.96) * sd / n ** 0.5, 3),
            "min": round(min(ratios), 3), "max": round(max(ratios), 3)}


def _table(rows: list[dict], load: tuple, started: str, args) -> str:
    out = [f"Measured {started} UTC on {platform.describe()}; load average (1/5/15 min) "
           f"{load[0][0]:.2f}/{load[0][1]:.2f}/{load[0][2]:.2f} at the start, "
           f"{load[1][0]:.2f}/{load[1][1]:.2f}/{load[1][2]:.2f} at the end. "
           f"Speculative config: `{args.speculative_config}`"
           + (f"; llama.cpp model `{os.path.basename(args.llama_gguf or resolve_model_path(args.model))}`."
              if args.llama_server else "."),
           "", "    " + shlex.join(["python", *sys.argv]), "",
           "| workload | variant | output tok/s | × off | acceptance rate | mean accepted length "
           "| wall s |", "|---|---|---|---|---|---|---|"]
    fmt = lambda v, suffix="": "—" if v is None else f"{v}{suffix}"  # noqa: E731
    for r in rows:
        out.append(f"| {r['workload']} | {r['variant']} | {r['output_tok_s']} | "
                   f"{fmt(r['vs_off'], '×')} | {fmt(r['acceptance_rate'])} | "
                   f"{fmt(r['mean_accepted_length'])} | {r['wall_s']} |")
    if args.rounds > 1:
        out += ["", f"Over all {args.rounds} rounds (mean output tok/s; × off: the ratio of the "
                "means; per round: the rounds' own ratios, mean ± 95% interval, min-max):", "",
                out[4][:-len("| wall s |")] + "| per round × off | wall s |",
                out[5] + "---|"]
        for r in _pooled(rows):
            sp = r["round_ratios"]
            spread = "—" if sp is None else \
                f"{sp['mean']} ± {sp['ci95']} ({sp['min']}-{sp['max']})"
            out.append(f"| {r['workload']} | {r['variant']} | {round(r['output_tok_s'], 2)} | "
                       f"{fmt(r['vs_off'], '×')} | {fmt(r['acceptance_rate'])} | "
                       f"{fmt(r['mean_accepted_length'])} | {spread} | {round(r['wall_s'], 1)} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--speculative-config", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default=None, help="the engine's dtype (default: auto)")
    p.add_argument("--grounded", default=None, help="JSONL of chats run one at a time")
    p.add_argument("--peer", default=None, help="JSONL run all at once")
    p.add_argument("--peer-concurrency", type=int, nargs="+", default=[32, 64])
    p.add_argument("--peer-prompts", type=int, default=None)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--llama-server", default=None, help="llama-server binary (grounded chats)")
    p.add_argument("--llama-spec-args", action="append", default=None,
                   help=f"llama-server speculation flags; repeat to compare (default: {LLAMA_SPEC})")
    p.add_argument("--llama-gguf", default=None,
                   help="the GGUF llama-server loads (default: conveyor's model file)")
    p.add_argument("--port", type=int, default=18437)
    args = p.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    load0, rows = os.getloadavg(), []
    engine = _engine(args, args.peer_concurrency[0])
    grounded = load_workload_file(args.grounded, engine.tokenizer) if args.grounded else None
    peer = load_workload_file(args.peer, engine.tokenizer, args.peer_prompts) if args.peer else None
    for rnd in range(args.rounds):
        if grounded:
            # every round on a fresh engine of the same shape (the first concurrency's)
            engine = _replace(engine, args, args.peer_concurrency[0], rnd > 0)
            _conveyor_pair(engine, "grounded", grounded, _interleaved, rnd, rows)
        for conc in args.peer_concurrency if peer else ():
            engine = _replace(engine, args, conc, engine.config.scheduler.max_num_seqs != conc)
            _conveyor_pair(engine, f"peer @{conc}", peer, _all_at_once, rnd, rows)
        if grounded and args.llama_server:
            _llama_pair(args, grounded, rows)
    engine.check_invariants()
    print(_table(rows, (load0, os.getloadavg()), started, args))


if __name__ == "__main__":
    main()
