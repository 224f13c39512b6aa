"""How many drafts pay off: per-request acceptance and measured step costs decide.

A step that computes ``n`` tokens is modelled as costing ``a + b * n`` seconds, read from the
engine's one step-cost fit (``core.step_cost.StepCostModel.linear_cost``: fitted on the whole
engine iteration, fed once per step by ``EngineCore``; the prefill budget uses the same fit). Draft position ``i`` of a
request whose tokens are accepted with probability ``alpha`` adds ``alpha ** i`` expected tokens
for ``b`` seconds. ``SpecPolicy.plan`` adds positions, best first, while they raise the step's
expected tokens per second, so a request with low acceptance gets none, and a batch so large that
a step's cost is mostly per token gets none at all. Each request's ``alpha`` is a Beta(1, 1)
estimate over its recent drafts; the counts decay so that a request skipped for low acceptance is
retried once its estimate drifts back towards the prior. The estimate counts the positions
verification reached (accepted, plus the one rejected), the maximum-likelihood rate for this
model. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

_DECAY = 0.9           # weight of older drafts in a request's acceptance estimate, per update


class LinearStepCost(Protocol):
    """Seconds a step of ``num_tokens`` tokens costs as ``(fixed, per_token)``; None = unknown."""

    def linear_cost(self) -> tuple[float, float] | None: ...


@dataclass(slots=True)
class _Acceptance:
    accepted: float = 0.0
    drafted: float = 0.0

    @property
    def alpha(self) -> float:
        return (self.accepted + 1) / (self.drafted + 2)


class SpecPolicy:
    """Per-request acceptance tracking and the per-step draft plan."""

    def __init__(self, num_speculative_tokens: int, cost: LinearStepCost | None):
        """cost None: not adaptive (every request gets ``num_speculative_tokens``)."""
        self.k = num_speculative_tokens
        self.cost = cost
        self._acceptance: dict[str, _Acceptance] = {}

    def record(self, request_id: str, num_drafted: int, num_accepted: int) -> None:
        """One verified draft. Positions after the first rejection were never tried (their
        outcome is unknown, not a failure), so only the positions reached count as trials: the
        accepted ones and the rejected one, if any. (Counting every drafted position biases
        ``alpha`` low, by far for long drafts: 24 drafted, 5 accepted is 5 of 6 trials.)"""
        acc = self._acceptance.setdefault(request_id, _Acceptance())
        acc.accepted = acc.accepted * _DECAY + num_accepted
        acc.drafted = acc.drafted * _DECAY + num_accepted + (num_accepted < num_drafted)

    def alpha(self, request_id: str) -> float:
        return self._acceptance.get(request_id, _Acceptance()).alpha

    def forget(self, request_id: str) -> None:
        self._acceptance.pop(request_id, None)

    def plan(self, limits: dict[str, int], num_base_tokens: int) -> dict[str, int]:
        """Drafts per request for the next step: ``limits`` holds each candidate's most drafts,
        ``num_base_tokens`` the tokens the step computes without any drafts."""
        if self.cost is None:
            return {rid: min(self.k, lim) for rid, lim in limits.items() if lim > 0}
        fit = self.cost.linear_cost()
        if fit is None or fit[1] == 0:
            return {rid: min(self.k, lim) for rid, lim in limits.items() if lim > 0}
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
            acc.accepted *= _DECAY
            acc.drafted *= _DECAY
