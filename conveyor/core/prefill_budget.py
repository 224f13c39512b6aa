"""How many tokens each prefill chunk may take in one step: the time budget and partial prefills.

``PrefillPolicy`` owns the engine's ``StepCostModel`` (``core.step_cost``) and, once per step,
hands the scheduler a ``StepPlan`` that caps every chunk it schedules. The scheduler still decides
*who* is served, in its order (priority, arrival, fair queueing); the plan only says *how much*:

- decodes are never starved: every running decode is charged to the step before any prefill,
  and prefills leave one token of the token budget per decode not yet scheduled;
- with ``target_itl_ms`` set, a chunk takes at most what the model predicts fits in the time
  left of the target divided by the learned ``Headroom`` (the p95 of measured / predicted
  iteration time, so the tail of what a client sees, not the mean, lands under the target) (before the model has seen steps of different sizes, a chunk is at most
  twice the largest step seen: it explores upwards); never more than twice the largest step
  seen, so the fit is not extrapolated far;
- a prompt still advances: the first prefill of a step gets at least ``MIN_PREFILL_TOKENS``
  whatever the time left, so time to first token stays bounded however tight the target;
- partial prefills (vLLM's spelling): at most ``max_num_partial_prefills`` chunks that leave
  their prompt unfinished per step, at most ``max_long_partial_prefills`` of them for prompts
  longer than ``long_prefill_token_threshold``; and while other prefills wait, a long prompt's
  chunk is at most that threshold, so it cannot take the whole budget from short ones.

A plan returning 0 for a request means "not this step". With chunked prefill off the plan only
reserves decode tokens (a prompt is prefilled whole or not at all). No torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from conveyor.config import SchedulerConfig
from conveyor.core.request import Request
from conveyor.core.step_cost import Headroom, StepCostModel, StepFeatures

logger = logging.getLogger("conveyor")

MIN_PREFILL_TOKENS = 16


@dataclass(frozen=True, slots=True)
class StepCostSnapshot:
    """The cost model and the budget, as ``/metrics`` shows them (data only)."""

    target_s: float | None
    coefficients: tuple[tuple[str, float], ...]     # seconds per step, token, row, context pair
    num_steps: int                                   # steps the fit has seen
    is_ready: bool
    last_predicted_s: float                          # the last measured step, as predicted
    last_measured_s: float
    mean_abs_error_s: float
    prefill_budget_tokens: int                       # the last step's chosen prefill budget
    headroom: float = 1.0                            # the target is divided by this


@dataclass(slots=True)
class PlanStats:
    """What the budget decided for one step (step log, ``/metrics``)."""

    target_s: float | None = None        # the step-time target, None without --target-itl-ms
    prefill_budget_tokens: int = 0       # a fresh prompt's chunk that fitted at step start
    predicted_s: float = 0.0             # the model's prediction for the step as scheduled


def _remaining(req: Request) -> int:
    return req.num_tokens - req.num_computed_tokens


def _is_decode(req: Request) -> bool:
    return _remaining(req) == 1 and req.num_output_tokens > 0


class StepPlan:
    """One step's caps; ``cap`` then (if scheduled) ``charge``, once per scheduled request."""

    def __init__(self, policy: "PrefillPolicy", running: list[Request], num_waiting: int,
                 token_budget: int):
        self.policy = policy
        cfg, model = policy.config, policy.model
        decodes = [r for r in running if _is_decode(r)]
        self.num_decodes_left = len(decodes)
        self.num_prefill_demand = len(running) - len(decodes) + num_waiting
        self.num_partial = self.num_long_partial = 0
        self.num_prefill_tokens = 0
        self._charged: dict[str, tuple] = {}   # request id -> what charge() took, for refund()
        self.seconds_left = None
        if policy.target_s is not None:
            overhead = model.coefficients["intercept"]
            overhead += sum(model.chunk_seconds(1, r.num_computed_tokens) for r in decodes)
            self.seconds_left = policy.target_s / policy.headroom.factor - overhead
        self.stats = PlanStats(policy.target_s)
        self.stats.prefill_budget_tokens = self._time_cap(
            max(0, token_budget - len(decodes)), 0) if cfg.enable_chunked_prefill else token_budget

    def cap(self, req: Request, n: int, token_budget_left: int) -> int:
        """The tokens ``req`` may compute this step, at most ``n`` (its remaining, already
        bounded by the token budget left)."""
        if _is_decode(req):
            return n
        n = min(n, max(0, token_budget_left - self.num_decodes_left))
        if not self.policy.config.enable_chunked_prefill or n <= 0:
            return n
        cfg = self.policy.config
        is_long = 0 < cfg.long_prefill_token_threshold < _remaining(req)
        if is_long and self.num_prefill_demand > 1:
            n = min(n, cfg.long_prefill_token_threshold)
        n = self._time_cap(n, req.num_computed_tokens)
        if n < _remaining(req):
            if self.num_partial >= cfg.max_num_partial_prefills:
                return 0
            if is_long and self.num_long_partial >= cfg.max_long_partial_prefills:
                return 0
        return n

    def _time_cap(self, n: int, cached: int) -> int:
        model = self.policy.model
        if self.seconds_left is None:
            return n
        limit = min(n, max(MIN_PREFILL_TOKENS, 2 * model.max_tokens_seen))
        if model.is_ready:
            limit = model.max_chunk(self.seconds_left, cached, limit)
        if self.num_prefill_tokens == 0:
            limit = max(limit, min(n, MIN_PREFILL_TOKENS))
        return limit

    def charge(self, req: Request, n: int) -> None:
        """``req`` computes ``n`` tokens this step (call before its progress is advanced)."""
        if _is_decode(req):          # its time was charged when the plan began
            self.num_decodes_left -= 1
            return
        partial = n < _remaining(req)
        long_cut = self.policy.config.long_prefill_token_threshold
        seconds = self.policy.model.chunk_seconds(n, req.num_computed_tokens)
        charge = (int(partial), int(partial and 0 < long_cut < _remaining(req)), n, seconds)
        self._apply(charge)
        self._charged[req.request_id] = charge

    def refund(self, request_id: str) -> None:
        """A request charged in this step was preempted before it ran: give its share back."""
        charge = self._charged.pop(request_id, None)
        if charge is not None:
            self._apply(tuple(-x for x in charge))

    def _apply(self, charge) -> None:
        partial, long_partial, tokens, seconds = charge
        self.num_partial += partial
        self.num_long_partial += long_partial
        self.num_prefill_tokens += tokens
        if self.seconds_left is not None:
            self.seconds_left -= seconds


class PrefillPolicy:
    """The engine's step-cost model and the per-step plans built on it."""

    def __init__(self, config: SchedulerConfig, model: StepCostModel | None = None):
        self.config = config
        self.model = model or StepCostModel()
        self.headroom = Headroom()
        ms = config.target_itl_ms
        self.target_s = None if ms is None else ms / 1000.0
        self.last_plan: StepPlan | None = None
        self._last_features: StepFeatures | None = None

    def begin_step(self, running: list[Request], num_waiting: int, token_budget: int) -> StepPlan:
        self.last_plan = StepPlan(self, running, num_waiting, token_budget)
        return self.last_plan

    def end_step(self, num_scheduled: dict[str, int], requests: dict[str, Request]) -> PlanStats:
        """The step as scheduled: remembers its features for ``observe`` and predicts it."""
        self._last_features = StepFeatures.of(
            (n, requests[rid].num_computed_tokens) for rid, n in num_scheduled.items())
        # The batch baselines schedule without a plan; their steps still train the model.
        stats = self.last_plan.stats if self.last_plan is not None else PlanStats(self.target_s)
        stats.predicted_s = self.model.predict(self._last_features)
        return stats

    def observe(self, seconds: float) -> None:
        """The last scheduled step took ``seconds`` (measured by the engine)."""
        f = self._last_features
        if f is None:
            return
        was_ready = self.model.is_ready
        self.model.observe(f, seconds)
        if was_ready:
            self.headroom.observe(self.model.last_predicted_s, seconds)
        self._last_features = None
        if logger.isEnabledFor(logging.DEBUG):
            budget = self.last_plan.stats.prefill_budget_tokens if self.last_plan else 0
            logger.debug("step cost: %d tokens, %d rows: predicted %.1f ms, measured %.1f ms; "
                         "prefill budget %d tokens, headroom %.2f", f.num_tokens, f.num_rows,
                         self.model.last_predicted_s * 1e3, seconds * 1e3, budget,
                         self.headroom.factor)

    def snapshot(self) -> StepCostSnapshot:
        m = self.model
        budget = self.last_plan.stats.prefill_budget_tokens if self.last_plan else 0
        return StepCostSnapshot(self.target_s, tuple(m.coefficients.items()), m.num_steps,
                                m.is_ready, m.last_predicted_s, m.last_measured_s,
                                m.mean_abs_error_s, budget, self.headroom.factor)
