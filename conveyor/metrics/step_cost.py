"""Prometheus gauges of the step-cost model and the prefill budget (``core.prefill_budget``).

Read at scrape time from the engine snapshot's ``step_cost`` (a ``StepCostSnapshot``): the fitted
coefficients, the last step's predicted and measured seconds, the fit's recent error, the target
(only with ``--target-itl-ms``) and the prefill budget the last step chose. Nothing is yielded
before the engine's first snapshot.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from conveyor.core.prefill_budget import StepCostSnapshot


class StepCostCollector(Collector):
    def __init__(self, prefix: str, read: Callable[[], StepCostSnapshot | None]):
        self._prefix = prefix
        self._read = read

    def collect(self):
        snap = self._read()
        if snap is None:
            return
        p = self._prefix
        coef = GaugeMetricFamily(p + "step_cost_coefficient_seconds",
                                 "Fitted step cost: seconds per step (intercept), per token, per "
                                 "request row and per attention (query, key) pair.",
                                 labels=["term"])
        for term, value in snap.coefficients:
            coef.add_metric([term], value)
        yield coef
        gauges = (
            ("step_time_predicted_seconds", "The last measured step's time as the model "
             "predicted it before it ran.", snap.last_predicted_s),
            ("step_time_measured_seconds", "The last measured step's time.", snap.last_measured_s),
            ("step_cost_mean_abs_error_seconds", "Recent mean |predicted - measured| step time.",
             snap.mean_abs_error_s),
            ("step_cost_fitted_steps", "Steps the cost model has been fitted on.", snap.num_steps),
            ("step_cost_model_ready", "1 once the fit has seen enough steps of different sizes.",
             int(snap.is_ready)),
            ("prefill_budget_tokens", "Prefill tokens a fresh prompt could take in the last step "
             "(the chosen budget).", snap.prefill_budget_tokens),
            ("step_cost_headroom_ratio", "The step-time target is divided by this: the tracked "
             "p95 of measured / predicted iteration time, in [1, 3].", snap.headroom))
        for name, doc, value in gauges:
            yield GaugeMetricFamily(p + name, doc, value=value)
        if snap.target_s is not None:
            yield GaugeMetricFamily(p + "step_time_target_seconds",
                                    "The step-time target (--target-itl-ms).", value=snap.target_s)
