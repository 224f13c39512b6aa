"""Who gives up a batch slot (or its KV blocks) for a waiting request that found none.

A pure policy over the running list, kept apart from the scheduler's bookkeeping:
- a strictly higher-priority arrival takes the place of the lowest-priority running request
  (``running`` is ordered by (priority, arrival), so the candidates are scanned from the end);
- under fair scheduling, a tenant below its weighted share of ``max_num_seqs`` takes the newest
  request (of no higher priority than the arrival) of the tenant furthest above its share.

Liveness: a victim is only ever a request the queue would serve *after* the arrival once it is
requeued (``RequestQueue.would_serve_before``, strict), so the freed slot cannot go straight back
to the victim, and a request admitted or swapped in during this step (``protected``) is never a
victim: its blocks are not even filled yet. Returns None when nobody should yield. No mutation.
"""

from __future__ import annotations

from conveyor.core.request import Request
from conveyor.core.request_queue import RequestQueue


def admission_victim(req: Request, running: list[Request], protected: set[str],
                     queue: RequestQueue, max_num_seqs: int) -> Request | None:
    """The running request that yields to ``req`` (the queue's head), or None."""
    candidates = [r for r in running if r.request_id not in protected]
    for victim in reversed(candidates):
        if victim.priority <= req.priority:
            break
        if queue.would_serve_before(req, victim):
            return victim
    if not queue.fair or not running:
        return None
    return _fair_share_victim(req, running, candidates, queue, max_num_seqs)


def _fair_share_victim(req: Request, running: list[Request], candidates: list[Request],
                       queue: RequestQueue, max_num_seqs: int) -> Request | None:
    counts: dict[str, int] = {}
    for r in running:
        counts[r.tenant] = counts.get(r.tenant, 0) + 1
    total = sum(queue.weight(t) for t in set(counts) | {req.tenant})

    def share(tenant: str) -> float:
        return max_num_seqs * queue.weight(tenant) / total

    if counts.get(req.tenant, 0) + 1 > share(req.tenant):
        return None
    over = {t: c - share(t) for t, c in counts.items() if c - 1 >= share(t) and t != req.tenant}
    for tenant in sorted(over, key=over.get, reverse=True):
        victim = next((r for r in reversed(candidates)
                       if r.tenant == tenant and r.priority >= req.priority), None)
        if victim is not None and queue.would_serve_before(req, victim):
            return victim
    return None
