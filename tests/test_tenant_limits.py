"""The per-tenant limiter's arithmetic with a fake clock."""

from __future__ import annotations

import pytest

from conveyor.serving.http_errors import ApiError
from conveyor.serving.tenant_limits import TenantLimiter


class Clock:
    t = 1000.0

    def __call__(self):
        return self.t


def test_tokens_per_minute_window_slides_and_retry_after_is_when_it_fits():
    clock = Clock()
    lim = TenantLimiter(max_tokens_per_minute=100, clock=clock)
    lim.acquire("a", 60).release()
    clock.t += 30
    lim.acquire("a", 30).release()
    with pytest.raises(ApiError) as e:
        lim.acquire("a", 20)                    # 60 + 30 + 20 > 100
    assert e.value.status == 429 and e.value.headers["Retry-After"] == "30"
    lim.acquire("b", 100).release()             # other tenants are unaffected
    clock.t += 30                               # the 60 expires
    lim.acquire("a", 20).release()


def test_concurrency_counts_leases_and_release_is_idempotent():
    lim = TenantLimiter(max_concurrency=2)
    a, b = lim.acquire("t", 1), lim.acquire("t", 1)
    with pytest.raises(ApiError):
        lim.acquire("t", 1)
    a.release()
    a.release()                                 # a second release frees nothing more
    c = lim.acquire("t", 1)
    with pytest.raises(ApiError):
        lim.acquire("t", 1)
    b.release(), c.release()
    assert lim._in_flight == {}
