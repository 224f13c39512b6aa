"""Parameters of each ``conveyor bench scenario``, with their documented defaults.

Owns the single source of the scenarios' defaults: the CLI builds one flag per field (``--field-name``,
help from the field's metadata) and leaves unset flags to these defaults. Imports nothing heavy,
so building the command line stays fast. ``request_rate=None`` means "saturate" (see
``scenarios``); ``num_prompts=None`` means "as many as ``duration`` seconds of arrivals bring".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def rate_or_auto(text: str) -> float | str:
    """'auto' (measure the engine, offer load x its capacity) or a rate in requests/s (or inf)."""
    return "auto" if text.strip().lower() == "auto" else float(text)


def _f(default, help: str, type=None):
    meta = {"help": help} if type is None else {"help": help, "type": type}
    return field(default=default, metadata=meta)


_COUNT = "requests in all (default: duration x offered rate)"
_DURATION = "seconds of arrivals, when --num-prompts is not given"
_RATE = "total offered requests/s, or auto: --load x the capacity measured on one full batch"
_LOAD = "offered load relative to the measured capacity (request rate auto)"


@dataclass(slots=True)
class FairnessParams:
    """tenant A at rate_ratio x tenant B's rate: B alone, A+B first come first served, A+B fair"""

    num_prompts: int | None = _f(None, _COUNT, int)
    duration: float = _f(60.0, _DURATION)
    request_rate: float | None = _f(None, _RATE, rate_or_auto)
    load: float = _f(1.2, _LOAD)
    rate_ratio: float = _f(10.0, "tenant A's request rate / tenant B's")
    prompt_len: str = _f("32", "prompt tokens (a length spec, as for bench offline)")
    output_len: str = _f("32", "output tokens (a length spec)")
    burstiness: float = _f(1.0, "gamma shape of each tenant's gaps; 1 = Poisson")


@dataclass(slots=True)
class PriorityParams:
    """a saturated stream, high_share of it at priority 0: without priorities, then with them"""

    num_prompts: int | None = _f(None, _COUNT, int)
    duration: float = _f(60.0, _DURATION)
    request_rate: float | None = _f(None, _RATE, rate_or_auto)
    load: float = _f(1.2, _LOAD)
    high_share: float = _f(0.2, "share of requests at priority 0 (high); the rest get 1 (low)")
    prompt_len: str = _f("32", "prompt tokens (a length spec)")
    output_len: str = _f("32", "output tokens (a length spec)")
    burstiness: float = _f(1.0, "gamma shape of the gaps; 1 = Poisson")


@dataclass(slots=True)
class PrefixParams:
    """a shared system prompt + distinct questions: prefix caching off, then on"""

    num_prompts: int = _f(64, "requests")
    prefix_len: int = _f(400, "tokens of the shared system prompt")
    question_len: int = _f(50, "tokens of each request's own question")
    output_len: int = _f(16, "output tokens")
    request_rate: float = _f(math.inf, "requests/s (inf: all at once)")


@dataclass(slots=True)
class PreemptionParams:
    """more requests than a small KV pool holds, once per preemption mode"""

    num_prompts: int = _f(32, "requests")
    prompt_len: int = _f(64, "prompt tokens")
    output_len: int = _f(128, "output tokens")
    kv_budget_requests: int = _f(6, "KV pool size, in worst-case (prompt + output) requests")
    modes: str = _f("recompute,swap", "comma-separated preemption modes to run (recompute,swap,auto)")
    request_rate: float = _f(math.inf, "requests/s (inf: all at once)")


SCENARIO_PARAMS: dict[str, type] = {
    "fairness": FairnessParams,
    "priority": PriorityParams,
    "prefix": PrefixParams,
    "preemption": PreemptionParams,
}


def params_from(name: str, given: dict):
    """The parameters of scenario ``name`` from the flags the user set (None = not set)."""
    values = {k: (None if v == "auto" else v) for k, v in given.items() if v is not None}
    return SCENARIO_PARAMS[name](**values)
