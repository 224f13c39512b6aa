"""The per-tenant limiter's arithmetic with a fake clock."""

from __future__ import annotations

import pytest

from conveyor.errors import InvalidRequestError
from conveyor.server.http_errors import ApiError
from conveyor.server.tenant_limits import TenantLimiter


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
    assert lim.num_tenants == 0


def test_a_refused_request_gets_its_tokens_back_once():
    clock = Clock()
    lim = TenantLimiter(max_concurrency=1, max_tokens_per_minute=100, clock=clock)
    lease = lim.acquire("a", 80)
    lease.refund()                              # the engine refused it: as if never admitted
    lease.refund(), lease.release()             # idempotent, whichever comes later
    kept = lim.acquire("a", 90)                 # 80 + 90 > 100 had the 80 stayed charged
    kept.release()
    kept.refund()                               # a request that ran keeps its charge
    with pytest.raises(ApiError):
        lim.acquire("a", 20)
    clock.t += 61
    late = lim.acquire("a", 100)
    clock.t += 61                               # its charge left the window before the refund
    late.refund()
    lim.acquire("a", 100).release()


def test_idle_tenants_expire_and_busy_ones_stay():
    clock = Clock()
    lim = TenantLimiter(max_concurrency=2, max_tokens_per_minute=1000, clock=clock)
    busy = lim.acquire("busy", 10)
    for i in range(500):
        lim.acquire(f"t{i}", 10).release()
        clock.t += 0.01
    assert lim.num_tenants == 501
    clock.t += 61
    lim.acquire("new", 1).release()
    assert lim.num_tenants == 2                  # "new" and "busy", still in flight
    clock.t += 61
    busy.release()
    clock.t += 61
    lim.acquire("other", 1).release()
    assert lim.num_tenants == 1
    # whatever expired is forgotten: a full budget and no stale concurrency
    lim.acquire("busy", 1000).release()


@pytest.mark.parametrize("kwargs", [{"max_concurrency": 0}, {"max_tokens_per_minute": 0},
                                    {"max_concurrency": -1}, {"max_tokens_per_minute": -3}])
def test_limits_must_be_positive(kwargs):
    with pytest.raises(InvalidRequestError, match="must be positive"):
        TenantLimiter(**kwargs)
