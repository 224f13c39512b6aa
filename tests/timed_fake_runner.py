"""A fake clock and a fake runner whose every step costs a known time on that clock.

The cost is computed here from the ``SchedulerOutput`` alone (each request's chunk and the tokens
it had computed before it), independently of ``core.step_cost``, so a test of the fit compares
the engine's model with a truth it did not produce.
"""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.core.outputs import ModelRunnerOutput, SchedulerOutput

from fake_runner import FakeRunner


class FakeClock:
    """Monotonic seconds that only move when told to."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


@dataclass(frozen=True)
class StepCost:
    """Seconds of a step: intercept + per token + per row + per (query, key) attention pair."""

    intercept: float = 2e-3
    per_token: float = 50e-6
    per_row: float = 300e-6
    per_context_token: float = 20e-9

    def of(self, sched: SchedulerOutput) -> float:
        before = {r.request_id: r.num_computed_tokens for r in sched.new_requests}
        before.update({c.request_id: c.num_computed_tokens for c in sched.cached_requests})
        seconds = self.intercept
        for rid, n in sched.num_scheduled_tokens.items():
            pairs = sum(before[rid] + k + 1 for k in range(n))      # token k sees all before it
            seconds += self.per_token * n + self.per_row + self.per_context_token * pairs
        return seconds


class TimedFakeRunner(FakeRunner):
    """``FakeRunner`` whose ``execute`` advances ``clock`` by ``cost.of(step)``."""

    def __init__(self, block_size: int, clock: FakeClock, cost: StepCost = StepCost(),
                 vocab: int = 1000):
        super().__init__(block_size, vocab)
        self.clock = clock
        self.cost = cost
        self.step_seconds: list[float] = []

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        if sched.total_num_scheduled_tokens:
            seconds = self.cost.of(sched)
            self.step_seconds.append(seconds)
            self.clock.advance(seconds)
        return super().execute(sched)
