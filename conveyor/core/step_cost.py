"""A step's cost in seconds, measured on the machine the engine runs on and kept up to date.

A step computes some requests' chunks; request ``i`` computes ``n_i`` tokens after ``c_i``
already in its KV cache. The model is linear in four features of the step::

    seconds = intercept + per_token * sum(n_i) + per_row * len(i)
              + per_context_token * sum(n_i * (c_i + (n_i + 1) / 2))

(the last sum counts the (query, key) pairs attention scores). The engine feeds every executed
step's features and measured time to ``observe``; the fit is exponentially weighted least squares
(older steps count less, so a machine whose speed drifts is followed), solved with the
coefficients kept >= 0 (a step never gets cheaper by adding work). No torch, no numpy.

What is fitted is the engine's whole iteration, not only the model runner's step: the engine
feeds the time from one step's start to the next's (``EngineCore.step``), so output processing,
detokenization, the hand-back to the event loop and the GIL that loop holds meanwhile are all in
the coefficients (per row, mostly). This one fit serves both the prefill budget
(``core.prefill_budget``) and adaptive speculation (``core.spec_policy``, through ``predict``
and ``token_seconds``).

``Headroom`` keeps what the mean fit cannot: a high quantile of measured / predicted, tracked
online and clamped to ``[1, MAX_HEADROOM]``, so the budget aims the step's *p95*, not its mean, at
the target.

Contract: ``predict`` returns 0 before the first observation; ``is_ready`` says when enough steps
of different sizes were seen for the budget to trust it (``core.prefill_budget`` explores before).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

NUM_FEATURES = 4
FEATURE_NAMES = ("intercept", "per_token", "per_row", "per_context_token")
# Features are scaled to similar magnitudes before the solve (tokens in thousands, rows in tens,
# attention pairs in millions) so the ridge term treats them alike.
_SCALE = (1.0, 1e-3, 1e-1, 1e-6)
_RIDGE = 1e-9          # relative to the largest diagonal entry: only breaks exact collinearity
_ERROR_DECAY = 0.05    # the error gauge follows the last ~20 steps
MIN_READY_STEPS = 8
MIN_READY_TOKEN_SPAN = 64    # the steps seen must differ by at least this many tokens
HEADROOM_QUANTILE = 0.95     # the quantile of measured / predicted the headroom tracks
HEADROOM_RATE = 0.05         # log-space step of the quantile tracker
MAX_HEADROOM = 3.0           # the correction never shrinks the target below a third


@dataclass(frozen=True, slots=True)
class StepFeatures:
    """What a step computes, in the model's terms (all counts, no time)."""

    num_tokens: int = 0
    num_rows: int = 0
    num_context_pairs: float = 0.0

    @classmethod
    def of(cls, chunks) -> "StepFeatures":
        """``chunks``: (tokens computed, tokens already cached) per scheduled request."""
        tokens = rows = 0
        pairs = 0.0
        for n, cached in chunks:
            tokens += n
            rows += 1
            pairs += context_pairs(n, cached)
        return cls(tokens, rows, pairs)

    def vector(self) -> tuple[float, ...]:
        raw = (1.0, float(self.num_tokens), float(self.num_rows), self.num_context_pairs)
        return tuple(x * s for x, s in zip(raw, _SCALE))


def context_pairs(n: int, cached: int) -> float:
    """(query, key) pairs attention scores for ``n`` new tokens after ``cached`` ones."""
    return n * (cached + (n + 1) / 2)


class StepCostModel:
    """Online, exponentially weighted, non-negative least squares fit of step seconds."""

    def __init__(self, forgetting: float = 0.995):
        """forgetting: weight kept by past steps at each new one (0.995: ~200 steps' memory)."""
        if not 0.0 < forgetting <= 1.0:
            raise ValueError("forgetting must be in (0, 1]")
        self.forgetting = forgetting
        self._gram = [[0.0] * NUM_FEATURES for _ in range(NUM_FEATURES)]   # sum w x x^T
        self._moment = [0.0] * NUM_FEATURES                                # sum w x y
        self._coef = [0.0] * NUM_FEATURES          # scaled features' coefficients
        self.num_steps = 0
        self._min_tokens: int | None = None
        self.max_tokens_seen = 0                   # the largest step observed, in tokens
        self.last_predicted_s = 0.0                # for the last observed step, before the update
        self.last_measured_s = 0.0
        self.mean_abs_error_s = 0.0                # exponentially weighted |predicted - measured|

    # ------------------------------------------------------------------ fit
    def observe(self, features: StepFeatures, seconds: float) -> None:
        """Add one executed step and its measured seconds; the coefficients are refitted."""
        if seconds < 0 or features.num_tokens <= 0:
            return
        x = features.vector()
        predicted = self.predict(features)
        self.last_predicted_s, self.last_measured_s = predicted, seconds
        if self.num_steps:
            err = abs(predicted - seconds)
            self.mean_abs_error_s += _ERROR_DECAY * (err - self.mean_abs_error_s)
        lam = self.forgetting
        for i in range(NUM_FEATURES):
            self._moment[i] = lam * self._moment[i] + x[i] * seconds
            row = self._gram[i]
            for j in range(NUM_FEATURES):
                row[j] = lam * row[j] + x[i] * x[j]
        self.num_steps += 1
        self._min_tokens = min(self._min_tokens or features.num_tokens, features.num_tokens)
        self.max_tokens_seen = max(self.max_tokens_seen, features.num_tokens)
        self._coef = _nonnegative_solve(self._gram, self._moment)

    @property
    def is_ready(self) -> bool:
        """Enough steps, of different enough sizes, to extrapolate from."""
        span = self.max_tokens_seen - (self._min_tokens or 0)
        return self.num_steps >= MIN_READY_STEPS and span >= MIN_READY_TOKEN_SPAN

    # ------------------------------------------------------------------ use
    def predict(self, features: StepFeatures) -> float:
        """Predicted seconds of a step with these features (0 before any observation)."""
        return sum(c * x for c, x in zip(self._coef, features.vector()))

    def token_seconds(self, n: int, cached: int) -> float:
        """Marginal seconds of one more token in a chunk of ``n`` tokens after ``cached`` (the
        row is already in the step): what a request's next draft position costs, for
        ``core.spec_policy``. All of the fit's token terms count: with one request at a time the
        rows never vary, and the non-negative solve may put a step's whole per-token slope on
        the attention term, so the ``per_token`` coefficient alone can read 0."""
        # the raw coefficients, not ``coefficients``' dict: the policy asks once per draft position
        return (self._coef[1] * _SCALE[1]
                + self._coef[3] * _SCALE[3] * (cached + n + 1))

    @property
    def coefficients(self) -> dict[str, float]:
        """Seconds per unit of each raw feature (per step, token, row, context pair)."""
        return {name: c * s for name, c, s in zip(FEATURE_NAMES, self._coef, _SCALE)}

    def chunk_seconds(self, n: int, cached: int) -> float:
        """Marginal seconds of adding a chunk of ``n`` tokens after ``cached`` as a new row."""
        k = self.coefficients
        return k["per_token"] * n + k["per_row"] + k["per_context_token"] * context_pairs(n, cached)

    def max_chunk(self, seconds: float, cached: int, limit: int) -> int:
        """The largest n <= limit whose ``chunk_seconds(n, cached)`` fits in ``seconds`` (0 if none)."""
        if limit <= 0 or seconds <= 0:
            return 0
        if self.chunk_seconds(limit, cached) <= seconds:
            return limit
        lo, hi = 0, limit          # chunk_seconds is increasing in n: bisect
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.chunk_seconds(mid, cached) <= seconds:
                lo = mid
            else:
                hi = mid - 1
        return lo


class Headroom:
    """Online ``HEADROOM_QUANTILE`` quantile of measured / predicted step time, in
    ``[1, MAX_HEADROOM]`` (a stochastic-approximation tracker in log space: an observation above
    the estimate raises it by ``rate * q``, one below lowers it by ``rate * (1 - q)``, so it
    settles where a fraction ``q`` of ratios lie below). Bounded by construction: it cannot drift
    past the clamp however the machine behaves, and it recovers once ratios fall again."""

    def __init__(self, quantile: float = HEADROOM_QUANTILE, rate: float = HEADROOM_RATE,
                 ceiling: float = MAX_HEADROOM):
        self.quantile, self.rate = quantile, rate
        self._log_max = math.log(ceiling)
        self._log = 0.0
        self.num_observed = 0

    @property
    def factor(self) -> float:
        """The target is divided by this (1.0 until a step ran longer than predicted)."""
        return math.exp(self._log)

    def observe(self, predicted_s: float, measured_s: float) -> None:
        if predicted_s <= 0 or measured_s < 0:
            return
        self.num_observed += 1
        above = math.log(max(measured_s, 1e-12) / predicted_s) > self._log
        self._log += self.rate * (self.quantile if above else self.quantile - 1.0)
        self._log = min(max(self._log, 0.0), self._log_max)


def _nonnegative_solve(gram, moment) -> list[float]:
    """argmin over w >= 0 of w^T G w - 2 m^T w (+ a tiny ridge): an active set that drops the
    most negative coefficient and re-solves, at most NUM_FEATURES times."""
    active = list(range(NUM_FEATURES))
    while active:
        w = _solve([[gram[i][j] for j in active] for i in active], [moment[i] for i in active])
        worst = min(range(len(active)), key=lambda k: w[k])
        if w[worst] >= 0:
            coef = [0.0] * NUM_FEATURES
            for k, i in enumerate(active):
                coef[i] = w[k]
            return coef
        active.pop(worst)
    return [0.0] * NUM_FEATURES


def _solve(a, b) -> list[float]:
    """Gaussian elimination with partial pivoting on a small ridge-regularized system."""
    n = len(b)
    ridge = _RIDGE * max((a[i][i] for i in range(n)), default=0.0) + 1e-300
    m = [list(a[i]) + [b[i]] for i in range(n)]
    for i in range(n):
        m[i][i] += ridge
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[piv] = m[piv], m[col]
        if m[col][col] == 0:
            continue
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for i in reversed(range(n)):
        s = m[i][n] - sum(m[i][j] * x[j] for j in range(i + 1, n))
        x[i] = s / m[i][i] if m[i][i] else 0.0
    return x
