"""The waiting queue: priority order within a tenant, weighted fair queueing across tenants.

Within one tenant requests are ordered by ``(priority, arrival_time)``: a lower priority value is
served first (vLLM's convention), equal priorities are first come, first served. A preempted
request keeps its arrival time, so it goes back ahead of everything that arrived after it.

Across tenants (``fair=True``) the queue does weighted fair queueing on tokens: every token the
scheduler computes for a tenant advances that tenant's virtual time by ``1 / weight``, and the
next request comes from the *backlogged* tenant (one with waiting requests) with the least
virtual time; on a tie, from the one running fewer requests per unit of weight. A tenant that
joins the backlog starts at ``max(own virtual time, F)``: F is the least virtual time among
backlogged tenants, or, when nobody waits, the largest among active tenants (those with running
requests). So idling banks no credit, a newcomer starts level with the others, and work done
while nobody waited is not held against anyone once contention starts. With ``fair=False``
every request is in one queue (FCFS / priority only).

Bounded state: a tenant exists only while it has live requests (waiting or running); when its
last one finishes it is forgotten. The next tenant comes from a heap over backlogged tenants
(entries invalidated lazily by a version number), so choosing it is O(log backlogged tenants).

The scheduler reports every transition of a request: ``add`` (arrives) -> ``pop`` (runs) ->
``requeue`` (preempted) -> ... -> ``finish`` (in any state). ``would_serve_before`` tells slot
reclaim whether a waiting request stays ahead of a running one once that one is requeued, so a
preemption for admission never hands the freed slot straight back to its victim.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

from conveyor.core.request import Request


@dataclass(slots=True)
class _Tenant:
    name: str
    weight: float
    vtime: float
    waiting: list = field(default_factory=list)    # heap of (priority, arrival, seq, request)
    num_live: int = 0                               # waiting + running requests
    version: int = 0                                # of its one valid entry in the ready heap

    @property
    def num_running(self) -> int:
        return self.num_live - len(self.waiting)

    def order_key(self) -> tuple:
        head = self.waiting[0]
        return (self.vtime, self.num_running / self.weight, head[0], head[1], head[2])


class RequestQueue:
    """Waiting requests of all tenants; see the module docstring for the order."""

    def __init__(self, fair: bool = False, weights: dict[str, float] | None = None):
        self.fair = fair
        self.weights = dict(weights or {})
        self._tenants: dict[str, _Tenant] = {}         # active tenants only
        self._live: dict[str, _Tenant] = {}            # request id -> its tenant (waiting/running)
        self._waiting_ids: set[str] = set()
        self._ready: list[tuple[tuple, int, str]] = []  # (order key, version, tenant), lazy
        self._seq = itertools.count()
        self._versions = itertools.count(1)

    def _name(self, req: Request) -> str:
        return req.tenant if self.fair else ""

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    # ------------------------------------------------------------------ transitions
    def add(self, req: Request) -> None:
        """A new request waits; its tenant becomes active if it was not."""
        if req.request_id in self._live:
            raise ValueError(f"request {req.request_id} is already queued or running")
        name = self._name(req)
        tenant = self._tenants.get(name)
        if tenant is None:
            tenant = _Tenant(name, self.weight(name), 0.0)
            self._tenants[name] = tenant
        tenant.num_live += 1
        self._live[req.request_id] = tenant
        self._push(tenant, req)

    def requeue(self, req: Request) -> None:
        """A running request was preempted: it waits again, keeping its arrival time."""
        self._push(self._live[req.request_id], req)

    def pop(self) -> Request:
        """The next request leaves the queue to run (it stays live until ``finish``)."""
        tenant = self._top()
        if tenant is None:
            raise IndexError("pop from an empty request queue")
        req = heapq.heappop(tenant.waiting)[3]
        self._waiting_ids.discard(req.request_id)
        self._refresh(tenant)
        return req

    def finish(self, req: Request) -> None:
        """A request left for good, waiting or running (idempotent); an idle tenant is forgotten."""
        tenant = self._live.pop(req.request_id, None)
        if tenant is None:
            return
        if req.request_id in self._waiting_ids:
            self._waiting_ids.discard(req.request_id)
            tenant.waiting = [e for e in tenant.waiting if e[3] is not req]
            heapq.heapify(tenant.waiting)
        tenant.num_live -= 1
        if tenant.num_live == 0:
            del self._tenants[tenant.name]         # its heap entries go stale
        else:
            self._refresh(tenant)

    def charge(self, tenant: str, num_tokens: int) -> None:
        """Account computed tokens to a tenant (weighted fair queueing)."""
        state = self._tenants.get(tenant) if self.fair else None
        if state is not None:
            state.vtime += num_tokens / state.weight
            if state.waiting:
                self._refresh(state)

    # ------------------------------------------------------------------ order
    def peek(self) -> Request | None:
        tenant = self._top()
        return None if tenant is None else tenant.waiting[0][3]

    def would_serve_before(self, req: Request, victim: Request) -> bool:
        """Whether waiting ``req`` is strictly ahead of running ``victim`` once ``victim`` is
        requeued (same tenant: by priority and arrival; across tenants: by virtual time, then
        running requests per weight). False on a tie."""
        mine, theirs = self._live[req.request_id], self._live[victim.request_id]
        if mine is theirs:
            return (req.priority, req.arrival_time) < (victim.priority, victim.arrival_time)
        their_vtime = theirs.vtime if theirs.waiting else self._join_vtime(theirs)
        return ((mine.vtime, mine.num_running / mine.weight)
                < (their_vtime, (theirs.num_running - 1) / theirs.weight))

    def _push(self, tenant: _Tenant, req: Request) -> None:
        if not tenant.waiting:
            tenant.vtime = self._join_vtime(tenant)
        heapq.heappush(tenant.waiting, (req.priority, req.arrival_time, next(self._seq), req))
        self._waiting_ids.add(req.request_id)
        self._refresh(tenant)

    def _join_vtime(self, tenant: _Tenant) -> float:
        if not self.fair:
            return tenant.vtime
        top = self._top()
        if top is not None:
            floor = top.vtime
        else:   # nobody waits: every active tenant only runs (at most max_num_seqs of them)
            floor = max(t.vtime for t in self._tenants.values())
        return max(tenant.vtime, floor)

    def _refresh(self, tenant: _Tenant) -> None:
        """Its order key changed: replace its ready-heap entry (stale ones are skipped)."""
        tenant.version = next(self._versions)
        if tenant.waiting:
            heapq.heappush(self._ready, (tenant.order_key(), tenant.version, tenant.name))
        if len(self._ready) > 2 * len(self._tenants) + 64:
            self._ready = [(t.order_key(), t.version, t.name)
                           for t in self._tenants.values() if t.waiting]
            heapq.heapify(self._ready)

    def _top(self) -> _Tenant | None:
        while self._ready:
            _, version, name = self._ready[0]
            tenant = self._tenants.get(name)
            if tenant is not None and tenant.version == version:
                return tenant
            heapq.heappop(self._ready)
        return None

    # ------------------------------------------------------------------ introspection
    def is_waiting(self, request_id: str) -> bool:
        return request_id in self._waiting_ids

    def virtual_time(self, tenant: str) -> float | None:
        """A tenant's virtual time, or None when it has no live request (forgotten)."""
        state = self._tenants.get(tenant)
        return None if state is None else state.vtime

    @property
    def num_tenants(self) -> int:
        """Tenants with live requests: the only ones the queue keeps state for."""
        return len(self._tenants)

    def __len__(self) -> int:
        return len(self._waiting_ids)

    def __bool__(self) -> bool:
        return bool(self._waiting_ids)

    def __iter__(self) -> Iterator[Request]:
        for tenant in self._tenants.values():
            for entry in sorted(tenant.waiting, key=lambda e: e[:3]):
                yield entry[3]
