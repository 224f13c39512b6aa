"""Per-tenant admission limits at the HTTP edge: concurrent requests and tokens per minute.

Owns one counter of in-flight requests and one sliding 60-second window of admitted tokens per
tenant. A request is charged ``prompt tokens + max_tokens * n`` when it is admitted (the most it
can cost), so a tenant cannot exceed its budget by sending long generations. Over a limit the
request is refused with 429 and a ``Retry-After``; nothing reaches the engine. Every admitted
request holds a ``TenantLease`` that must be released exactly once when it ends.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass

from conveyor.serving.http_errors import ApiError

_WINDOW_S = 60.0


@dataclass(slots=True)
class TenantLease:
    limiter: "TenantLimiter | None"
    tenant: str
    released: bool = False

    def release(self) -> None:
        if not self.released and self.limiter is not None:
            self.released = True
            self.limiter._release(self.tenant)


class TenantLimiter:
    def __init__(self, max_concurrency: int | None = None, max_tokens_per_minute: int | None = None,
                 clock=time.monotonic):
        self.max_concurrency = max_concurrency
        self.max_tokens_per_minute = max_tokens_per_minute
        self.clock = clock
        self._in_flight: dict[str, int] = {}
        self._spent: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def acquire(self, tenant: str, tokens: int) -> TenantLease:
        """Admit a request of ``tokens`` for ``tenant`` or raise ApiError(429)."""
        if self.max_concurrency is None and self.max_tokens_per_minute is None:
            return TenantLease(None, tenant)
        with self._lock:
            if self.max_concurrency is not None and \
                    self._in_flight.get(tenant, 0) >= self.max_concurrency:
                raise ApiError(429, f"tenant {tenant!r} already has {self.max_concurrency} requests "
                                    "in flight; wait for one to finish", code="tenant_concurrency_limit",
                               headers={"Retry-After": "1"})
            self._check_tokens(tenant, tokens)
            self._in_flight[tenant] = self._in_flight.get(tenant, 0) + 1
            if self.max_tokens_per_minute is not None:
                self._spent.setdefault(tenant, deque()).append((self.clock(), tokens))
        return TenantLease(self, tenant)

    def _check_tokens(self, tenant: str, tokens: int) -> None:
        limit = self.max_tokens_per_minute
        if limit is None:
            return
        if tokens > limit:
            raise ApiError(429, f"this request needs {tokens} tokens, more than the tenant's "
                                f"{limit} tokens per minute; lower max_tokens", code="tenant_token_limit")
        now, window = self.clock(), self._spent.setdefault(tenant, deque())
        while window and window[0][0] <= now - _WINDOW_S:
            window.popleft()
        used = sum(t for _, t in window)
        if used + tokens <= limit:
            return
        # Earliest time enough of the window has expired for this request to fit.
        excess, wait = used + tokens - limit, 0.0
        for t, spent in window:
            excess -= spent
            wait = t + _WINDOW_S - now
            if excess <= 0:
                break
        raise ApiError(429, f"tenant {tenant!r} is over {limit} tokens per minute",
                       code="tenant_token_limit", headers={"Retry-After": str(max(1, math.ceil(wait)))})

    def _release(self, tenant: str) -> None:
        with self._lock:
            left = self._in_flight.get(tenant, 0) - 1
            if left > 0:
                self._in_flight[tenant] = left
            else:
                self._in_flight.pop(tenant, None)
