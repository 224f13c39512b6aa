"""The front door (Serve's ingress deployment): one OpenAI API in front of every engine replica.

Paths it answers itself:

- ``/health``: every replica's state from the registry (``registry``: at most one report
  interval old); 200 ``{"status": "ok", "replicas": {id: {...}}}`` while at least one replica is
  healthy, 503 (``"status": "unavailable"``) when none is. Public, like the single server's.
- ``/metrics``: every reachable replica's exposition with a ``replica="<id>"`` label on each
  sample, plus the front door's own ``conveyor:ray_*`` metrics. Needs an API key when keys are
  configured, like the single server's.

Everything else (the OpenAI routes, ``/v1/models``, ``/tokenize``, ``/dashboard``, ``/docs``) is
forwarded unchanged as a ``ForwardedRequest`` to one replica, chosen by the deployment's
request router, and answered by conveyor's own server app there (``forwarding``). The dashboard
so shows the replica that served the page.
"""


import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from conveyor.ray.forwarding import Forwarder
from conveyor.ray.front_metrics import FrontDoorMetrics
from conveyor.ray.registry import registry_actor

logger = logging.getLogger("conveyor.ray")

_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


def front_door_class() -> type:
    """The ingress deployment's class: a FastAPI app under ``serve.ingress`` (built per call, so
    nothing is module-level state)."""
    from ray import serve
    api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @serve.ingress(api)
    class FrontDoor:
        def __init__(self, engine: Any, server_config: Any, report_interval_s: float = 1.0):
            from conveyor.server.auth import KeyRing
            self._registry = registry_actor(serve.get_replica_context().app_name,
                                            report_interval_s)
            self._metrics = FrontDoorMetrics()
            self._key_ring = KeyRing(server_config.api_keys)
            self._forwarder = Forwarder(engine, server_config.max_body_bytes, self._metrics)

        @api.get("/health")
        async def health(self) -> JSONResponse:
            views = await self._registry.snapshot.remote()
            replicas = {v.report.replica: {"status": v.state, "pid": v.report.pid,
                                           "node_ip": v.report.node_ip,
                                           "last_report_s": round(v.age_s, 3)} for v in views}
            healthy = sum(v.healthy for v in views)
            body = {"status": "ok" if healthy else "unavailable", "healthy_replicas": healthy,
                    "replicas": replicas}
            return JSONResponse(body, status_code=200 if healthy else 503)

        @api.get("/metrics")
        async def metrics(self, request: Request) -> Response:
            denied = self._forwarder.check_key(request, self._key_ring)
            if denied is not None:
                return denied
            views = await self._registry.snapshot.remote()
            return Response(self._metrics.render(views), media_type=CONTENT_TYPE_LATEST)

        @api.api_route("/{path:path}", methods=_METHODS, include_in_schema=False)
        async def forward(self, request: Request, path: str) -> Response:
            return await self._forwarder.forward(request)

    return FrontDoor
