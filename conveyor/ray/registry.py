"""Which engine replicas exist and what each last said: how the front door reaches every replica.

Serve routes a request to *one* replica and exposes no way to call a chosen one, so each replica
reports itself: every ``report_interval_s`` it sends a ``ReplicaReport`` (its id, pid, node, its
own ``/health`` answer and its ``/metrics`` exposition) to one named, detached actor per Serve
application, ``ReplicaRegistry`` (no CPUs reserved, restarted by Ray if its process dies; its
state is soft and refills within one interval). The front door reads ``snapshot()``.

Staleness: what the front door shows is at most ``report_interval_s`` (plus one actor call) old.
A replica killed without warning stops reporting: its entry turns ``unreachable`` once older
than ``stale_after_s`` (3 intervals) and is dropped after ``forget_after_s``; a replica shut down
by Serve removes its entry itself. Ray's restarted replica has a new id and reports at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

REGISTRY_NAMESPACE = "conveyor"


def registry_name(app_name: str) -> str:
    """The registry actor's name for the Serve application ``app_name``."""
    return f"conveyor-replicas:{app_name}"


@dataclass(frozen=True, slots=True)
class ReplicaReport:
    """What one replica says about itself (picklable)."""

    replica: str                  # Serve's unique replica id (the ``replica`` label)
    pid: int
    node_ip: str
    health_status: int            # the status code of the replica's own /health
    health: dict = field(default_factory=dict)  # its JSON body ({"status": "ok"}, ...)
    metrics: str = ""             # its /metrics exposition (text format)


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """A report as the front door sees it: how old it is and whether it still counts."""

    report: ReplicaReport
    age_s: float
    stale_after_s: float

    @property
    def reachable(self) -> bool:
        return self.age_s <= self.stale_after_s

    @property
    def healthy(self) -> bool:
        return self.reachable and self.report.health_status == 200

    @property
    def state(self) -> str:
        """``unreachable``, or the replica's own /health status (``ok``, ``loading``, ...)."""
        if not self.reachable:
            return "unreachable"
        return str(self.report.health.get("status", self.report.health_status))


class ReplicaRegistry:
    """The registry (a Ray actor class; plain Python, so it is testable without Ray)."""

    def __init__(self, report_interval_s: float = 1.0, forget_after_s: float = 120.0):
        self.report_interval_s = report_interval_s
        self.stale_after_s = 3 * report_interval_s
        self.forget_after_s = forget_after_s
        self._reports: dict[str, tuple[float, ReplicaReport]] = {}

    def report(self, report: ReplicaReport) -> None:
        self._reports[report.replica] = (time.monotonic(), report)

    def remove(self, replica: str) -> None:
        self._reports.pop(replica, None)

    def snapshot(self) -> list[ReplicaView]:
        """Every replica heard from within ``forget_after_s``, by id."""
        now = time.monotonic()
        for replica, (at, _) in list(self._reports.items()):
            if now - at > self.forget_after_s:
                del self._reports[replica]
        return [ReplicaView(r, now - at, self.stale_after_s)
                for _, (at, r) in sorted(self._reports.items())]


def registry_actor(app_name: str, report_interval_s: float):
    """A handle on the application's registry actor, created on first use (by whichever replica
    or front door asks first; every later caller gets the same actor)."""
    import ray
    actor_class = ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=64)(ReplicaRegistry)
    return actor_class.options(name=registry_name(app_name), namespace=REGISTRY_NAMESPACE,
                               lifetime="detached", get_if_exists=True
                               ).remote(report_interval_s)
