"""How many drafts pay off: per-request acceptance and measured step costs decide.

A step that computes ``n`` tokens is modelled as costing ``a + b * n`` seconds, read from the
engine's one step-cost fit (``core.step_cost.StepCostModel.linear_cost``: fitted on the whole
engine iteration, fed once per step by ``EngineCore``; the prefill budget uses the same fit).
Draft position ``i`` of a request whose tokens are accepted with probability ``alpha`` adds
``alpha ** i`` expected tokens for ``b`` seconds. ``SpecPolicy.plan`` adds positions, best first,
while they raise the step's expected tokens per second, so a request with low acceptance gets
none, and a batch so large that a step's cost is mostly per token gets none at all (before any
cost is measured: one draft each).

Each request's ``alpha`` is a Beta estimate over its recent drafts whose prior is the engine's
recent rate over all requests (worth two trials), so a new request starts where its
predecessors were. It counts the positions verification reached (accepted, plus the one
rejected), the maximum-likelihood rate for this model. The counts decay so that a request
skipped for low acceptance is retried once its estimate drifts back towards the prior. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

_DECAY = 0.9           # weight of older drafts in a request's acceptance estimate, per update
_POOLED_DECAY = 0.99   # the same for the engine-wide rate that is each new request's prior
_PRIOR_WEIGHT = 2.0    # pseudo-trials of that prior in a request's estimate


class LinearStepCost(Protocol):
    """Seconds a step of ``num_tokens`` tokens costs as ``(fixed, per_token)``; None = unknown."""

    def linear_cost(self) -> tuple[float, float] | None: ...


@dataclass(slots=True)
class _Acceptance:
    accepted: float = 0.0
    drafted: float = 0.0

    def alpha(self, prior: float) -> float:
        """Posterior mean under a Beta prior of mean ``prior`` worth ``_PRIOR_WEIGHT`` trials."""
        return (self.accepted + _PRIOR_WEIGHT * prior) / (self.drafted + _PRIOR_WEIGHT)

    def add(self, accepted: float, trials: float, decay: float) -> None:
        self.accepted = self.accepted * decay + accepted
        self.drafted = self.drafted * decay + trials


class SpecPolicy:
    """Per-request acceptance tracking and the per-step draft plan."""

    def __init__(self, num_speculative_tokens: int, cost: LinearStepCost | None):
        """cost None: not adaptive (every request gets ``num_speculative_tokens``)."""
        self.k = num_speculative_tokens
        self.cost = cost
        self._acceptance: dict[str, _Acceptance] = {}
        self._pooled = _Acceptance()     # every request's drafts: a new request's prior

    def record(self, request_id: str, num_drafted: int, num_accepted: int) -> None:
        """One verified draft. Positions after the first rejection were never tried (their
        outcome is unknown, not a failure), so only the positions reached count as trials: the
        accepted ones and the rejected one, if any. (Counting every drafted position biases
        ``alpha`` low, by far for long drafts: 24 drafted, 5 accepted is 5 of 6 trials.)"""
        trials = num_accepted + (num_accepted < num_drafted)
        self._acceptance.setdefault(request_id, _Acceptance()).add(num_accepted, trials, _DECAY)
        self._pooled.add(num_accepted, trials, _POOLED_DECAY)

    def alpha(self, request_id: str) -> float:
        prior = self._pooled.alpha(0.5)          # the engine's recent rate (0.5 before any)
        return self._acceptance.get(request_id, _Acceptance()).alpha(prior)

    def forget(self, request_id: str) -> None:
        self._acceptance.pop(request_id, None)

    def plan(self, limits: dict[str, int], num_base_tokens: int) -> dict[str, int]:
        """Drafts per request for the next step: ``limits`` holds each candidate's most drafts,
        ``num_base_tokens`` the tokens the step computes without any drafts."""
        if self.cost is None:
            return {rid: min(self.k, lim) for rid, lim in limits.items() if lim > 0}
        fit = self.cost.linear_cost()
        if fit is None or fit[1] <= 0:
            # nothing measured yet: one draft each, cheap at any batch size, and the varied step
            # sizes it makes are what the fit needs to become ready
            return {rid: 1 for rid, lim in limits.items() if lim > 0}
        fixed, per_token = fit
        gains = sorted(((self.alpha(rid) ** i, rid) for rid, lim in limits.items()
                        for i in range(1, min(self.k, lim) + 1)), reverse=True)
        tokens, seconds = float(len(limits)), fixed + per_token * num_base_tokens
        plan: dict[str, int] = {}
        for gain, rid in gains:
            # adding a position pays iff its gain per second beats the step's current rate
            if seconds <= 0 or gain / per_token <= tokens / seconds:
                break
            plan[rid] = plan.get(rid, 0) + 1
            tokens, seconds = tokens + gain, seconds + per_token
        for rid in limits:
            if rid not in plan:
                self._decay(rid)
        return plan

    def _decay(self, request_id: str) -> None:
        acc = self._acceptance.get(request_id)
        if acc is not None:
            acc.add(0.0, 0.0, _DECAY)
