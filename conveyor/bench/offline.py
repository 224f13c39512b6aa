"""In-process load generator: drives an ``LLMEngine`` through a workload in wall-clock time.

Owns the step loop of ``conveyor bench offline`` / ``compare``: a request is added when its
arrival time comes (with that arrival time, so time spent waiting for a running step counts as
queueing), the engine steps whenever it has work, and the loop sleeps only when the engine is idle
and the next request has not arrived yet. Uses the engine's public API only: ``add_request``,
``step``, ``has_unfinished_requests``, ``step_log`` (the ``StepStats`` the engine keeps with
``record_steps=True``) and ``stats()`` (its typed ``EngineStats``), whose cumulative prefix-cache
and preemption counters' change over a run is reported as the run's ``engine_stats``.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

from tqdm import tqdm

from conveyor.bench.records import RequestRecord, StepSample, samples_from_step_log
from conveyor.bench.workloads import BenchRequest, Workload
from conveyor.core.stats import EngineStats
from conveyor.errors import ConveyorError
from conveyor.sampling_params import SamplingParams

_HOLD_S = 0.001   # poll interval while the engine holds requests without running a step


@dataclass(slots=True)
class RunResult:
    """One measured run: its label, per-request records, step samples (in-process only), config,
    and the offered load (``request_rate`` inf = all at once; None = arrivals from the file)."""

    label: str
    records: list[RequestRecord]
    steps: list[StepSample] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    wall_s: float = 0.0
    request_rate: float | None = None
    burstiness: float | None = None
    # In-process only: {"prefix_cache": {"queries", "hits", "hit_rate"}, "preemptions_by_mode":
    # {mode: count}}, each the change over this run; None when the engine keeps no counters.
    engine_stats: dict | None = None


def bench_params(max_tokens: int, ignore_eos: bool = True) -> SamplingParams:
    """Greedy; EOS ignored unless asked (then every request generates exactly ``max_tokens``)."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)


def warm_up(engine, num_requests: int = 2, prompt_len: int = 16, max_tokens: int = 4) -> None:
    """Run a few tiny requests to completion so one-time costs stay out of the measurement."""
    for i in range(num_requests):
        engine.add_request([11 + i] * prompt_len, bench_params(max_tokens), request_id=f"warmup-{i}")
    while engine.has_unfinished_requests():
        engine.step()


def engine_counters(engine) -> dict | None:
    """The engine's cumulative prefix-cache (tokens) and per-mode preemption counters, from its
    ``stats()``; None for an engine that reports none."""
    read = getattr(engine, "stats", None)
    if read is None:
        return None
    stats: EngineStats = read()
    spec = stats.spec_decode
    return {"queries": stats.prefix_cache_queries, "hits": stats.prefix_cache_hits,
            "by_mode": stats.preemptions,
            "spec": None if spec is None else (spec[0], spec[1], spec[2], list(spec[3]))}


def counters_delta(before: dict | None, after: dict | None) -> dict | None:
    """A run's ``engine_stats`` from ``engine_counters`` taken before and after it."""
    if before is None or after is None:
        return None
    queries, hits = after["queries"] - before["queries"], after["hits"] - before["hits"]
    modes = sorted(set(before["by_mode"]) | set(after["by_mode"]))
    return {"prefix_cache": {"queries": queries, "hits": hits,
                             "hit_rate": hits / queries if queries else None},
            "preemptions_by_mode": {m: after["by_mode"].get(m, 0) - before["by_mode"].get(m, 0)
                                    for m in modes},
            "spec_decode": spec_delta(before.get("spec"), after.get("spec"))}


def spec_delta(before, after) -> dict | None:
    """Speculative decoding over one run, in vLLM's names (None when it is off)."""
    if before is None or after is None:
        return None
    drafts, tokens, accepted = (a - b for a, b in zip(after[:3], before[:3]))
    per_pos = [a - (before[3][i] if i < len(before[3]) else 0) for i, a in enumerate(after[3])]
    return {"num_drafts": drafts, "num_draft_tokens": tokens, "num_accepted_tokens": accepted,
            "num_accepted_tokens_per_pos": per_pos,
            "acceptance_rate": accepted / tokens if tokens else None,
            "mean_accepted_length": 1 + accepted / drafts if drafts else None}


def run_offline(engine, workload: Workload, label: str = "offline", config: dict | None = None,
                progress: bool = True, id_prefix: str | None = None, clock=time.monotonic,
                sleep=time.sleep, send_priority: bool = True) -> RunResult:
    """Run ``workload`` through ``engine`` honouring arrival times; returns what was observed.

    Engine request ids are ``<id_prefix>/<request id>`` (``id_prefix`` defaults to ``label``), so
    several runs can share one engine.
    Requests the engine rejects (too long for the context, too big for the KV cache) are recorded
    as failed with the engine's message; the run goes on.
    ``send_priority=False`` submits every request at priority 0 (a first-come-first-served
    baseline) while records keep each request's priority class for the per-group breakdown.
    """
    prefix = f"{id_prefix if id_prefix is not None else label}/"
    pending = deque(sorted(workload.requests, key=lambda r: r.arrival_s))
    log = engine.step_log
    log_start = len(log) if log is not None else 0
    counters = engine_counters(engine)
    records: dict[str, RequestRecord] = {}
    bar = tqdm(total=len(pending), desc=label, unit="req", disable=not progress, leave=False)
    t0 = clock()
    while pending or engine.has_unfinished_requests():
        while pending and pending[0].arrival_s <= clock() - t0:
            rec = _submit(engine, pending.popleft(), prefix, t0, send_priority)
            records[rec.request_id] = rec
            bar.update(1 if rec.error else 0)
        wait = math.inf
        if engine.has_unfinished_requests():
            num_logged = len(log) if log is not None else 0
            outputs = engine.step()
            _collect(outputs, records, prefix, clock() - t0, bar)
            if (len(log) > num_logged) if log is not None else bool(outputs):
                continue
            wait = _HOLD_S   # requests held but no step ran (a static batch waiting to launch)
        if pending:
            wait = min(wait, pending[0].arrival_s - (clock() - t0))
        sleep(max(0.0, wait))
    wall = clock() - t0
    bar.close()
    steps = samples_from_step_log(log[log_start:], t0, _max_num_seqs(engine)) if log is not None else []
    ordered = [records[r.request_id] for r in workload.requests]
    return RunResult(label, ordered, steps, dict(config or {}), wall,
                     engine_stats=counters_delta(counters, engine_counters(engine)))


def _submit(engine, req: BenchRequest, prefix: str, t0: float, send_priority: bool) -> RequestRecord:
    rec = RequestRecord(req.request_id, req.prompt_len, req.max_tokens, req.arrival_s,
                        tenant=req.tenant, priority=req.priority)
    prompt = req.prompt_token_ids if req.prompt_token_ids is not None else req.prompt
    try:
        engine.add_request(prompt, bench_params(req.max_tokens, req.ignore_eos), request_id=prefix + req.request_id,
                           arrival_time=t0 + req.arrival_s,
                           priority=req.priority if send_priority else 0, tenant=req.tenant)
    except ConveyorError as e:
        rec.error = str(e)
    return rec


def _collect(outputs, records: dict[str, RequestRecord], prefix: str, now: float, bar) -> None:
    for out in outputs:
        rec = records.get(out.request_id.removeprefix(prefix))
        if rec is None:
            continue
        comp = out.outputs[0]
        if comp.delta_token_ids:
            if rec.first_token is None:
                rec.first_token = now
            rec.chunk_times.append(now)
        rec.output_len = len(comp.token_ids)
        if out.finished:
            rec.finish = now
            rec.num_preemptions = out.metrics.num_preemptions
            rec.cached_tokens = out.num_cached_tokens
            if comp.finish_reason in ("abort", "error"):
                rec.error = out.error or f"finished with reason {comp.finish_reason!r}"
            bar.update(1)


def _max_num_seqs(engine) -> int:
    config = getattr(engine, "config", None)
    return config.scheduler.max_num_seqs if config is not None else 1
