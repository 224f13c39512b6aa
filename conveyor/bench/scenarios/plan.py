"""``conveyor bench scenario NAME``: seeded experiments, each a few in-process runs side by side.

Owns each scenario's run plan; its parameters live in ``scenario_params``, its findings (the few
numbers the scenario exists to show) in ``findings``. See docs/bench.md.

- Every run gets a fresh engine (the shared engine kwargs + the run's overrides), warmed up
  before its clock starts, so no run inherits another's prefix cache, queue or counters.
- ``request_rate=None`` means "saturate": a calibration engine first runs one full batch
  (``max_num_seqs`` requests of the scenario's lengths, random token ids, so nothing of it can
  become a prefix hit) and the offered rate is ``load`` x the requests/s it measured.
- Workloads are pure functions of the parameters, the seed and the measured rate.
"""

from __future__ import annotations

import gc
import math
from dataclasses import asdict, dataclass, field
from typing import Callable

from conveyor.bench.arrivals import ArrivalProcess, with_arrivals
from conveyor.bench.scenarios.findings import (fairness_findings, prefix_findings, preemption_findings,
                                     priority_findings)
from conveyor.bench.offline import RunResult, run_offline, warm_up
from conveyor.bench.scenarios.params import (FairnessParams, PreemptionParams, PrefixParams,
                                            PriorityParams)
from conveyor.bench.scenarios.workloads import (TENANT_B, count_for, priority_workload,
                                               tenant_subset, two_tenant_workload)
from conveyor.bench.suite import jsonable, kv_budget_blocks
from conveyor.bench.workloads import (LengthDist, Workload, WorkloadError, shared_prefix_workload,
                                      synthetic_workload)


@dataclass(slots=True)
class ScenarioResult:
    """A scenario's runs (in order), what it was asked (params) and made (workload spec), and
    its findings (``findings``); params and findings hold plain JSON values."""

    name: str
    params: dict
    workload_spec: dict
    runs: list[RunResult]
    findings: dict = field(default_factory=dict)


@dataclass(slots=True)
class ScenarioContext:
    """What every scenario needs: an engine factory (engine kwargs -> engine), the shared engine
    kwargs, the tokenizer prompts are cut with, the workload seed, and whether to show progress."""

    make_engine: Callable[[dict], object]
    base_kwargs: dict
    tokenizer: object = None
    seed: int = 0
    progress: bool = True

    def run(self, label: str, overrides: dict, workload: Workload, rate: float | None,
            burstiness: float | None = None, send_priority: bool = True) -> RunResult:
        """One measured run on a fresh, warmed-up engine, which is freed afterwards."""
        kwargs = {**self.base_kwargs, **overrides}
        engine = self.make_engine(kwargs)
        warm_up(engine)
        config = dict(jsonable(kwargs), priorities_sent=send_priority)
        run = run_offline(engine, workload, label, config=config, progress=self.progress,
                          send_priority=send_priority)
        run.request_rate, run.burstiness = rate, burstiness
        del engine
        gc.collect()
        return run

    def capacity(self, prompt_len: LengthDist, output_len: LengthDist) -> float:
        """Requests/s of one full closed batch of these lengths (see the module docstring)."""
        engine = self.make_engine(self.base_kwargs)
        warm_up(engine)
        n = int(self.base_kwargs.get("max_num_seqs") or 16)
        probe = synthetic_workload(n, prompt_len, output_len, None, self.seed + 1, self.vocab_size)
        run = run_offline(engine, probe, "calibration", progress=False)
        del engine
        gc.collect()
        done = [r.finish for r in run.records if r.success]
        if not done or max(done) <= 0:
            raise WorkloadError("calibration failed (no request completed); pass --request-rate")
        return len(done) / max(done)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size if self.tokenizer is not None else 32000

    def synthetic(self, n: int, prompt_len: str | int, output_len: str | int) -> Workload:
        return synthetic_workload(n, LengthDist.parse(prompt_len), LengthDist.parse(output_len),
                                  self.tokenizer, self.seed, self.vocab_size)


def _offered_rate(ctx: ScenarioContext, p) -> tuple[float, float | None]:
    """(offered requests/s, measured capacity or None when the rate was given)."""
    if p.request_rate is not None:
        return p.request_rate, None
    if not p.load > 0:
        raise WorkloadError(f"--load must be positive, got {p.load}")
    capacity = ctx.capacity(LengthDist.parse(p.prompt_len), LengthDist.parse(p.output_len))
    return p.load * capacity, capacity


def run_fairness(ctx: ScenarioContext, p: FairnessParams) -> ScenarioResult:
    """Tenant B alone; A (rate_ratio x B's rate) + B first come first served; A + B fair."""
    rate, capacity = _offered_rate(ctx, p)
    base = ctx.synthetic(count_for(p.num_prompts, p.duration, rate), p.prompt_len, p.output_len)
    both = two_tenant_workload(base, rate, p.rate_ratio, p.burstiness, ctx.seed)
    rate_b = rate / (p.rate_ratio + 1)
    runs = [ctx.run("B-alone", {"fair_scheduling": False}, tenant_subset(both, TENANT_B), rate_b,
                    p.burstiness),
            ctx.run("A+B-fcfs", {"fair_scheduling": False}, both, rate, p.burstiness),
            ctx.run("A+B-fair", {"fair_scheduling": True}, both, rate, p.burstiness)]
    return ScenarioResult("fairness", {}, both.spec, runs, fairness_findings(runs, rate, capacity))


def run_priority(ctx: ScenarioContext, p: PriorityParams) -> ScenarioResult:
    """The same mixed-priority stream without priorities (fcfs), then with them (priority)."""
    rate, capacity = _offered_rate(ctx, p)
    base = ctx.synthetic(count_for(p.num_prompts, p.duration, rate), p.prompt_len, p.output_len)
    work = priority_workload(with_arrivals(base, ArrivalProcess(rate, p.burstiness), ctx.seed),
                             p.high_share, ctx.seed)
    runs = [ctx.run("fcfs", {}, work, rate, p.burstiness, send_priority=False),
            ctx.run("priority", {}, work, rate, p.burstiness)]
    return ScenarioResult("priority", {}, work.spec, runs, priority_findings(runs, rate, capacity))


def run_prefix(ctx: ScenarioContext, p: PrefixParams) -> ScenarioResult:
    """A shared system prompt + distinct questions, with prefix caching off, then on."""
    base = shared_prefix_workload(p.num_prompts, p.prefix_len, LengthDist.parse(p.question_len),
                                  LengthDist.parse(p.output_len), ctx.tokenizer, ctx.seed,
                                  ctx.vocab_size)
    work = with_arrivals(base, ArrivalProcess(p.request_rate), ctx.seed)
    runs = [ctx.run("prefix-cache-off", {"enable_prefix_caching": False}, work, p.request_rate),
            ctx.run("prefix-cache-on", {"enable_prefix_caching": True}, work, p.request_rate)]
    return ScenarioResult("prefix", {}, work.spec, runs, prefix_findings(runs))


def run_preemption(ctx: ScenarioContext, p: PreemptionParams) -> ScenarioResult:
    """More requests than a small KV pool holds, once per preemption mode."""
    modes = [m.strip() for m in p.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - {"recompute", "swap", "auto"})
    if not modes or unknown:
        raise WorkloadError(f"--modes takes recompute, swap and/or auto, got {p.modes!r}")
    base = ctx.synthetic(p.num_prompts, p.prompt_len, p.output_len)
    work = with_arrivals(base, ArrivalProcess(p.request_rate), ctx.seed)
    num_blocks = kv_budget_blocks(work, p.kv_budget_requests, int(ctx.base_kwargs.get("block_size") or 16))
    pool = {"num_blocks": num_blocks, "kv_cache_bytes": None}
    runs = [ctx.run(mode, {**pool, "preemption_mode": mode}, work, p.request_rate) for mode in modes]
    spec = dict(work.spec, kv_budget_requests=p.kv_budget_requests, num_kv_blocks=num_blocks)
    return ScenarioResult("preemption", {}, spec, runs, preemption_findings(runs))


SCENARIOS: dict[str, Callable] = {
    "fairness": run_fairness,
    "priority": run_priority,
    "prefix": run_prefix,
    "preemption": run_preemption,
}


def run_scenario(name: str, ctx: ScenarioContext, params) -> ScenarioResult:
    """Run scenario ``name`` with ``params`` (an instance of its parameters class)."""
    if name not in SCENARIOS:
        raise WorkloadError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    result = SCENARIOS[name](ctx, params)
    result.params = dict(_json_values(asdict(params)), seed=ctx.seed)
    result.findings = _json_values(result.findings)
    return result


def _json_values(values: dict) -> dict:
    """Non-finite floats as strings ("inf"), as everywhere in reports."""
    return {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in values.items()}
