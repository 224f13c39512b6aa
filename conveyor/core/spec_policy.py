"""How many drafts pay off: per-request acceptance and measured step costs decide.

The costs come from the engine's one step-cost fit (``core.step_cost.StepCostModel``: fitted on
the whole engine iteration, fed once per step by ``EngineCore``; the prefill budget uses the same
fit): ``predict`` prices the next step without drafts, ``token_seconds(j, c)`` what draft
position ``j`` of a request ``c`` tokens deep adds to it (all of the fit's token terms: the
attention term grows with ``c``). Draft position ``j`` of a request whose tokens are accepted
with probability ``alpha`` adds ``alpha ** j`` expected tokens. ``SpecPolicy.plan`` adds
positions, best gain per second first, while they raise the step's expected tokens per second,
so a request with low acceptance gets none, and a batch so large that a step's cost is mostly per
token gets none at all (before the fit is ready: one draft each). A fit that prices tokens at
nothing gets full drafts: the larger steps that follow are what corrects it (the reverse, one
draft each whenever a slope read 0, kept the steps too alike to ever measure one, and was seen
collapsing one-user speculation on a loaded machine).

Each request's ``alpha`` is a Beta estimate over its recent drafts whose prior is the engine's
recent rate over all requests (worth two trials), so a new request starts where its
predecessors were. It counts the positions verification reached (accepted, plus the one
rejected), the maximum-likelihood rate for this model. The counts decay so that a request
skipped for low acceptance is retried once its estimate drifts back towards the prior. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from conveyor.core.step_cost import StepFeatures

_DECAY = 0.9           # weight of older drafts in a request's acceptance estimate, per update
_POOLED_DECAY = 0.99   # the same for the engine-wide rate that is each new request's prior
_PRIOR_WEIGHT = 2.0    # pseudo-trials of that prior in a request's estimate


class StepCost(Protocol):
    """What the policy reads of ``core.step_cost.StepCostModel``."""

    @property
    def is_ready(self) -> bool: ...

    def predict(self, features: StepFeatures) -> float: ...

    def token_seconds(self, n: int, cached: int) -> float: ...


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

    def __init__(self, num_speculative_tokens: int, cost: StepCost | None):
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

    def plan(self, limits: dict[str, int], base: StepFeatures,
             contexts: dict[str, int]) -> dict[str, int]:
        """Drafts per request for the next step: ``limits`` holds each candidate's most drafts,
        ``base`` the step's features without any drafts, ``contexts`` each candidate's tokens in
        the KV cache before its next token."""
        if self.cost is None:
            return {rid: min(self.k, lim) for rid, lim in limits.items() if lim > 0}
        if not self.cost.is_ready:
            # nothing measured yet: one draft each, cheap at any batch size, and the varied step
            # sizes it makes are what the fit needs to become ready
            return {rid: 1 for rid, lim in limits.items() if lim > 0}
        positions = []       # (gain per second, gain, seconds, request), per draft position
        for rid, lim in limits.items():
            alpha, cached = self.alpha(rid), contexts.get(rid, 0)
            for j in range(1, min(self.k, lim) + 1):
                gain, cost = alpha ** j, max(0.0, self.cost.token_seconds(j, cached))
                positions.append((gain / cost if cost > 0 else float("inf"), gain, cost, rid))
        # within a request gain falls and cost rises with j: its positions stay in order
        positions.sort(key=lambda p: p[0], reverse=True)
        tokens, seconds = float(len(limits)), self.cost.predict(base)
        plan: dict[str, int] = {}
        for rate, gain, cost, rid in positions:
            # adding a position pays iff its gain per second beats the step's current rate
            if gain <= 0 or (seconds > 0 and rate <= tokens / seconds):
                break
            plan[rid] = plan.get(rid, 0) + 1
            tokens, seconds = tokens + gain, seconds + cost
        for rid in limits:
            if rid not in plan:
                self._decay(rid)
        return plan

    def _decay(self, request_id: str) -> None:
        acc = self._acceptance.get(request_id)
        if acc is not None:
            acc.add(0.0, 0.0, _DECAY)
