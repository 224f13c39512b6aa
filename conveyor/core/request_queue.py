"""The waiting queue: priority order within a tenant, weighted fair queueing across tenants.

Within one tenant requests are ordered by ``(priority, arrival_time)``: a lower priority value is
served first (vLLM's convention), equal priorities are first come, first served. A preempted
request keeps its arrival time, so it goes back ahead of everything that arrived after it.

Across tenants (``fair=True``) the queue does weighted fair queueing on tokens: every token the
scheduler computes for a tenant advances that tenant's virtual time by ``1 / weight``, and the
next request comes from the tenant with the least virtual time. A tenant that sends ten times
more requests gets its weighted share of the budget, not ten times the capacity. A tenant that
(re)appears starts at the smallest virtual time among tenants with waiting work, so idling
banks no credit (on a tie the tenant with the shorter backlog goes first). With ``fair=False``
every request is in one queue (FCFS / priority only).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator

from conveyor.core.request import Request


class RequestQueue:
    def __init__(self, fair: bool = False, weights: dict[str, float] | None = None):
        self.fair = fair
        self.weights = dict(weights or {})
        self._heaps: dict[str, list[tuple[int, float, int, Request]]] = {}
        self._vtime: dict[str, float] = {}
        self._seq = itertools.count()
        self._len = 0

    def _tenant(self, req: Request) -> str:
        return req.tenant if self.fair else ""

    def add(self, req: Request) -> None:
        tenant = self._tenant(req)
        heap = self._heaps.setdefault(tenant, [])
        if not heap and self.fair:
            floor = min((self._vtime.get(t, 0.0) for t, h in self._heaps.items() if h), default=None)
            if floor is not None:
                self._vtime[tenant] = max(self._vtime.get(tenant, 0.0), floor)
        heapq.heappush(heap, (req.priority, req.arrival_time, next(self._seq), req))
        self._len += 1

    def _next_tenant(self) -> str | None:
        best, best_key = None, None
        for tenant, heap in self._heaps.items():
            if heap:
                head = heap[0]
                # Equal virtual time (a tenant just (re)appeared at the floor): the shorter
                # backlog goes first, so a light tenant is not queued behind a heavy one.
                key = (self._vtime.get(tenant, 0.0), len(heap), head[0], head[1], head[2])
                if best_key is None or key < best_key:
                    best, best_key = tenant, key
        return best

    def peek(self) -> Request | None:
        tenant = self._next_tenant()
        return None if tenant is None else self._heaps[tenant][0][3]

    def pop(self) -> Request:
        tenant = self._next_tenant()
        if tenant is None:
            raise IndexError("pop from an empty request queue")
        self._len -= 1
        return heapq.heappop(self._heaps[tenant])[3]

    def remove(self, req: Request) -> None:
        heap = self._heaps.get(self._tenant(req), [])
        for i, entry in enumerate(heap):
            if entry[3] is req:
                heap[i] = heap[-1]
                heap.pop()
                heapq.heapify(heap)
                self._len -= 1
                return
        raise ValueError(f"request {req.request_id} is not waiting")

    def charge(self, tenant: str, num_tokens: int) -> None:
        """Account computed tokens to a tenant (weighted fair queueing)."""
        if self.fair:
            self._vtime[tenant] = self._vtime.get(tenant, 0.0) + num_tokens / self.weights.get(tenant, 1.0)

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[Request]:
        for heap in self._heaps.values():
            for entry in sorted(heap):
                yield entry[3]
