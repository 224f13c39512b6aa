"""The front door's ``/metrics``: its own ``conveyor:ray_*`` metrics plus every replica's.

Front-door metrics (one registry per front-door replica, nothing global):

- ``conveyor:ray_replicas_healthy`` / ``conveyor:ray_replicas_known``: replicas whose last
  report said healthy / replicas the registry knows (reachable or not);
- ``conveyor:ray_forward_retries_total``: requests sent to another replica because the first
  one failed before answering;
- ``conveyor:ray_replica_failures_total``: requests that ended with an error because their
  replica failed (mid-stream, mid-response, or no replica after every attempt).

Replicas' metrics are merged by ``metrics_merge`` (label ``replica``); unreachable replicas are
left out.
"""

from __future__ import annotations

from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from conveyor.ray.metrics_merge import merge_expositions


class FrontDoorMetrics:
    """Counters the forwarder increments and the gauges ``render`` sets from the registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.healthy = Gauge("conveyor:ray_replicas_healthy",
                             "Engine replicas whose last report said healthy.",
                             registry=self.registry)
        self.known = Gauge("conveyor:ray_replicas_known",
                           "Engine replicas the registry knows (reachable or not).",
                           registry=self.registry)
        self.retries = Counter("conveyor:ray_forward_retries",
                               "Requests re-sent because a replica failed before answering.",
                               registry=self.registry)
        self.replica_failures = Counter(
            "conveyor:ray_replica_failures",
            "Requests that ended with an error because their replica failed.",
            registry=self.registry)

    def render(self, views: Iterable) -> bytes:
        """The whole exposition for the registry's ``views`` (``ReplicaView`` objects)."""
        views = list(views)
        self.healthy.set(sum(v.healthy for v in views))
        self.known.set(len(views))
        own = generate_latest(self.registry)
        replicas = merge_expositions({v.report.replica: v.report.metrics
                                      for v in views if v.reachable and v.report.metrics})
        return own + replicas.encode()
