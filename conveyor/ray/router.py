"""Ray Serve request routers for engine replicas, and the ``--request-router`` name registry.

Owns the glue between Ray Serve's request-router hook (``ray.serve.request_router``) and the
pure policies of ``conveyor.ray.routing``: reading the request's JSON out of the
``ForwardedRequest`` a handle call carries, the replicas' load (Ray's per-replica queue length:
requests sent and not finished, i.e. waiting + running there), and keeping the policy's state in
step with the replica set. Routers live in the process that holds the deployment handle (the
ingress), one per handle; with several ingress replicas each keeps its own prefix index.

Names: ``pow2`` (Ray's default power of two choices), ``round-robin``, ``prefix``
(prefix-cache aware; options in ``PrefixRoutingConfig``).
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve._private.common import ReplicaID
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from conveyor.errors import ConfigError
from conveyor.ray.forward import ForwardedRequest
from conveyor.ray.routing import PrefixPolicy, PrefixRoutingConfig, RoundRobin

logger = logging.getLogger(__name__)

ROUTER_NAMES = ("pow2", "round-robin", "prefix")


def request_router_config(name: str, **kwargs: Any) -> RequestRouterConfig:
    """The Serve config for router ``name`` with its options ``kwargs``; an unknown name or
    option is a one-line ``ConfigError``. ``pow2`` and ``round-robin`` take no options."""
    if name not in ROUTER_NAMES:
        raise ConfigError(f"unknown request router {name!r}; choose one of "
                          f"{', '.join(ROUTER_NAMES)}", "request_router")
    if name != "prefix" and kwargs:
        raise ConfigError(f"request router {name!r} takes no options; got "
                          f"{', '.join(sorted(kwargs))}", "request_router")
    if name == "pow2":
        return RequestRouterConfig()
    if name == "round-robin":
        return RequestRouterConfig(request_router_class=RoundRobinRouter)
    PrefixRoutingConfig.from_kwargs(kwargs)          # fail here, not in the ingress replica
    return RequestRouterConfig(request_router_class=PrefixAwareRouter,
                               request_router_kwargs=dict(kwargs))


def forwarded_request(pending_request: PendingRequest | None) -> ForwardedRequest | None:
    """The first ``ForwardedRequest`` among the call's arguments, if any."""
    if pending_request is None:
        return None
    for arg in (*pending_request.args, *pending_request.kwargs.values()):
        if isinstance(arg, ForwardedRequest):
            return arg
    return None


def _stable_order(replicas: list[RunningReplica]) -> list[RunningReplica]:
    return sorted(replicas, key=lambda r: r.replica_id.unique_id)


class RoundRobinRouter(RequestRouter):
    """``round-robin``: each request to the next replica in turn (the rest follow in turn, for
    when that one's queue is full)."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._rotation = RoundRobin()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # all full: sleep, not spin
        return [[r] for r in self._rotation.order(_stable_order(candidate_replicas))]


class PrefixAwareRouter(RequestRouter):
    """``prefix``: to the replica whose engine most likely caches the prompt's leading blocks,
    balanced against load (``conveyor.ray.routing.PrefixPolicy``)."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._policy = PrefixPolicy(PrefixRoutingConfig.from_kwargs(kwargs))

    def _hashes(self, pending_request: PendingRequest | None) -> list[int]:
        request = forwarded_request(pending_request)
        if request is None:
            return []
        credential = next((v for k, v in request.headers if k == "authorization"), None)
        return self._policy.hashes(request.json_body(), credential)

    async def _loads(self, replicas: list[RunningReplica]) -> dict[ReplicaID, int]:
        """Queue length per replica: cached where fresh, else probed; a replica that does not
        answer is left out (Ray skips it too)."""
        loads: dict[ReplicaID, int] = {}
        missing: list[RunningReplica] = []
        for r in replicas:
            queue_len = (self._replica_queue_len_cache.get(r.replica_id)
                         if self._use_replica_queue_len_cache else None)
            if queue_len is None:
                missing.append(r)
            else:
                loads[r.replica_id] = queue_len
        if missing:
            for r, queue_len in await self._probe_queue_lens(missing, 0):
                if queue_len is not None:
                    loads[r.replica_id] = queue_len
        return loads

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        by_id = {r.replica_id: r for r in _stable_order(candidate_replicas)}
        loads = await self._loads(list(by_id.values()))
        if not loads:
            return [list(by_id.values())]               # nobody answered: let Ray probe again
        decision = self._policy.choose(self._hashes(pending_request), loads)
        return [[by_id[key]] for key in decision.ranked if key in self._replicas]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: Any) -> None:
        if replica_id in self._replicas:                # not one that left meanwhile
            self._policy.record(replica_id, self._hashes(pending_request))

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._policy.index.retain(set(self._replicas))

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._policy.index.remove(replica_id)
