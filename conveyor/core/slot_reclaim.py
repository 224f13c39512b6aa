"""Who gives up a batch slot (or its KV blocks) for a waiting request that found none.

A pure policy over the running list, kept apart from the scheduler's bookkeeping:
- a strictly higher-priority arrival takes the place of the lowest-priority running request
  (``running`` is ordered by (priority, arrival), so that is its last element);
- under fair scheduling, a tenant below its weighted share of ``max_num_seqs`` takes the newest
  request (of no higher priority than the arrival) of the tenant furthest above its share.
Returns None when nobody should yield. No torch, no mutation.
"""

from __future__ import annotations

from conveyor.core.request import Request


def admission_victim(req: Request, running: list[Request], fair: bool, max_num_seqs: int,
                     weights: dict[str, float]) -> Request | None:
    lowest = running[-1] if running else None
    if lowest is not None and lowest.priority > req.priority:
        return lowest
    if not fair or not running:
        return None
    counts: dict[str, int] = {}
    for r in running:
        counts[r.tenant] = counts.get(r.tenant, 0) + 1
    total = sum(weights.get(t, 1.0) for t in set(counts) | {req.tenant})

    def share(tenant: str) -> float:
        return max_num_seqs * weights.get(tenant, 1.0) / total

    if counts.get(req.tenant, 0) + 1 > share(req.tenant):
        return None
    over = {t: c - share(t) for t, c in counts.items() if c - 1 >= share(t) and t != req.tenant}
    if not over:
        return None
    tenant = max(over, key=over.get)
    return next((r for r in reversed(running) if r.tenant == tenant and r.priority >= req.priority),
                None)
