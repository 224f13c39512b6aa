"""Per-tenant admission limits at the HTTP edge: concurrent requests and tokens per minute.

Owns one counter of in-flight requests and one sliding 60-second window of admitted tokens per
tenant. A request is charged ``prompt tokens + max_tokens * n`` when it is admitted (the most it
can cost), so a tenant cannot exceed its budget by sending long generations. Over a limit the
request is refused with 429 and a ``Retry-After``; nothing reaches the engine. Invariants:

- Every admitted request holds a ``TenantLease``: ``release()`` when it ends, or ``refund()``
  when it is refused after admission (engine validation, queue full, ...), which also gives its
  tokens back. Either is idempotent and the first one wins.
- Per-tenant state is bounded by activity: a tenant with nothing in flight and no charge left in
  the window is forgotten (swept oldest-touched first, O(1) amortized per request), so state
  never grows with the number of tenants ever seen.
- Limits are positive or None (no limit); the tenant names come from ``server.auth``.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from conveyor.errors import InvalidRequestError
from conveyor.server.http_errors import ApiError

_WINDOW_S = 60.0


@dataclass(slots=True)
class _Charge:
    time: float
    tokens: int         # set to 0 once it left the window or was refunded


@dataclass(slots=True)
class _TenantState:
    in_flight: int = 0
    used: int = 0                   # tokens charged within the window
    touched: float = 0.0            # last acquire or release; every charge is at or before it
    window: deque[_Charge] = field(default_factory=deque)


@dataclass(slots=True)
class TenantLease:
    """One admitted request's hold on its tenant's concurrency slot and token charge."""

    limiter: "TenantLimiter | None"
    tenant: str
    charge: _Charge | None = None
    released: bool = False

    def release(self) -> None:
        """The request ended: free its concurrency slot; its tokens stay charged."""
        self._end(refund=False)

    def refund(self) -> None:
        """The request was refused after admission: free its slot and give its tokens back."""
        self._end(refund=True)

    def _end(self, refund: bool) -> None:
        if not self.released and self.limiter is not None:
            self.released = True
            self.limiter._end(self, refund)


class TenantLimiter:
    """Admits requests per tenant; thread-safe."""

    def __init__(self, max_concurrency: int | None = None, max_tokens_per_minute: int | None = None,
                 clock=time.monotonic):
        for flag, value in (("--tenant-max-concurrency", max_concurrency),
                            ("--tenant-max-tokens-per-minute", max_tokens_per_minute)):
            if value is not None and value <= 0:
                raise InvalidRequestError(f"{flag} must be positive (leave it out for no limit), "
                                          f"got {value}", flag.lstrip("-").replace("-", "_"))
        self.max_concurrency = max_concurrency
        self.max_tokens_per_minute = max_tokens_per_minute
        self.clock = clock
        self._tenants: OrderedDict[str, _TenantState] = OrderedDict()   # oldest touched first
        self._lock = threading.Lock()

    @property
    def num_tenants(self) -> int:
        """Tenants with state kept (in flight, or charged within the window)."""
        with self._lock:
            return len(self._tenants)

    def acquire(self, tenant: str, tokens: int) -> TenantLease:
        """Admit a request of ``tokens`` for ``tenant`` or raise ApiError(429)."""
        if self.max_concurrency is None and self.max_tokens_per_minute is None:
            return TenantLease(None, tenant)
        with self._lock:
            now = self.clock()
            self._sweep(now)
            state = self._tenants.get(tenant) or _TenantState()
            if self.max_concurrency is not None and state.in_flight >= self.max_concurrency:
                raise ApiError(429, f"tenant {tenant!r} already has {self.max_concurrency} requests "
                                    "in flight; wait for one to finish", code="tenant_concurrency_limit",
                               headers={"Retry-After": "1"})
            self._check_tokens(tenant, state, tokens, now)
            charge = None
            if self.max_tokens_per_minute is not None:
                charge = _Charge(now, tokens)
                state.window.append(charge)
                state.used += tokens
            state.in_flight += 1
            self._touch(tenant, state, now)
        return TenantLease(self, tenant, charge)

    def _check_tokens(self, tenant: str, state: _TenantState, tokens: int, now: float) -> None:
        limit = self.max_tokens_per_minute
        if limit is None:
            return
        if tokens > limit:
            raise ApiError(429, f"this request needs {tokens} tokens, more than the tenant's "
                                f"{limit} tokens per minute; lower max_tokens", code="tenant_token_limit")
        window = state.window
        while window and window[0].time <= now - _WINDOW_S:
            state.used -= window[0].tokens
            window.popleft().tokens = 0
        if state.used + tokens <= limit:
            return
        # Earliest time enough of the window has expired for this request to fit.
        excess, wait = state.used + tokens - limit, 0.0
        for charge in window:
            excess -= charge.tokens
            wait = charge.time + _WINDOW_S - now
            if excess <= 0:
                break
        raise ApiError(429, f"tenant {tenant!r} is over {limit} tokens per minute",
                       code="tenant_token_limit", headers={"Retry-After": str(max(1, math.ceil(wait)))})

    def _end(self, lease: TenantLease, refund: bool) -> None:
        with self._lock:
            state = self._tenants.get(lease.tenant)
            if state is None:
                return
            state.in_flight -= 1
            if refund and lease.charge is not None:
                state.used -= lease.charge.tokens
                lease.charge.tokens = 0
            if state.in_flight == 0 and state.used == 0:
                del self._tenants[lease.tenant]      # nothing left to remember
            else:
                self._touch(lease.tenant, state, self.clock())

    def _touch(self, tenant: str, state: _TenantState, now: float) -> None:
        state.touched = now
        self._tenants[tenant] = state
        self._tenants.move_to_end(tenant)

    def _sweep(self, now: float) -> None:
        """Forget tenants untouched for a whole window with nothing in flight (their charges
        have all expired); a long-running tenant is moved to the back and looked at again later."""
        horizon = now - _WINDOW_S
        while self._tenants:
            tenant, state = next(iter(self._tenants.items()))
            if state.touched > horizon:
                return
            if state.in_flight:
                self._touch(tenant, state, now)
            else:
                del self._tenants[tenant]
