"""``EngineReplica``: one Ray Serve replica = one ``LLMEngine`` behind conveyor's own server app.

The replica builds the single-server FastAPI app (``conveyor.server.app.build_app``), runs its
lifespan (the model loads on a thread of its own, the ``AsyncEngine`` starts), and answers each
``ForwardedRequest`` by driving that app in-process (``asgi_bridge.respond``): validation,
errors, auth, tenancy and streaming are the single server's, byte for byte. Invariants:

- The constructor returns only once the engine serves (Serve counts the replica as running
  from then on); a model that fails to load fails the constructor, so Serve reports it.
- ``check_health`` (Serve calls it periodically) raises once the engine is dead, so Serve
  replaces the replica; a replica killed outright is restarted by Serve's controller.
- It reports itself to the application's ``ReplicaRegistry`` every ``report_interval_s`` (see
  ``registry``) and removes itself when Serve shuts it down (after draining like SIGTERM does).
- ``record_routing_stats`` gives request routers the engine's load (waiting, running) and KV
  occupancy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any, AsyncIterator

from conveyor.ray.asgi_bridge import respond
from conveyor.ray.forward import ForwardedRequest, ResponseHead
from conveyor.ray.registry import ReplicaReport, registry_actor

logger = logging.getLogger("conveyor.ray")

_HEALTH = ForwardedRequest("GET", "/health")


class EngineReplica:
    """The engine deployment's class (``serve.deployment`` is applied by ``conveyor.ray.app``)."""

    async def __init__(self, engine_kwargs: dict, server_config: Any,
                       report_interval_s: float = 1.0):
        from ray import serve

        from conveyor.engine.llm_engine import LLMEngine
        from conveyor.server.app import build_app
        self._app = build_app(server_config, lambda: LLMEngine.from_kwargs(**engine_kwargs))
        self._state = self._app.state.conveyor
        self._lifespan = contextlib.AsyncExitStack()
        await self._lifespan.enter_async_context(self._app.router.lifespan_context(self._app))
        while self._state.engine is None and self._state.load_error is None:
            await asyncio.sleep(0.05)
        if self._state.load_error is not None:
            await self._lifespan.aclose()
            raise RuntimeError(self._state.load_error)
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self._interval = report_interval_s
        self._registry = registry_actor(context.app_name, report_interval_s)
        self._reporter = asyncio.create_task(self._report_forever())
        logger.info("replica %s (pid %d) serves %s", self.replica_id, os.getpid(),
                    self._state.model_name)

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[ResponseHead | bytes]:
        """Stream the app's answer to ``request``: a ``ResponseHead``, then body chunks."""
        async for part in respond(self._app, request):
            yield part

    async def check_health(self) -> None:
        engine = self._state.engine
        if engine is not None and engine.is_dead:
            raise RuntimeError(f"the engine is dead: {engine.error}")

    def record_routing_stats(self) -> dict[str, Any]:
        snap = self._state.engine.snapshot if self._state.engine is not None else None
        if snap is None:
            return {}
        return {"num_running": snap.num_running, "num_waiting": snap.num_waiting,
                "num_free_blocks": snap.num_free_blocks, "num_total_blocks": snap.num_total_blocks,
                "pid": os.getpid()}

    def pid(self) -> int:
        """This replica's process id (tests use it to kill the replica)."""
        return os.getpid()

    async def __del__(self):
        from conveyor.server.app import drain_app
        self._reporter.cancel()
        with contextlib.suppress(Exception):
            await self._registry.remove.remote(self.replica_id)
        await drain_app(self._app)
        await self._lifespan.aclose()

    async def _report_forever(self) -> None:
        warned = False
        while True:
            try:
                await self._registry.report.remote(await self._report())
                warned = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the registry restarts; try again next time
                if not warned:
                    logger.warning("replica %s could not report to the registry: %s",
                                   self.replica_id, exc)
                warned = True
            await asyncio.sleep(self._interval)

    async def _report(self) -> ReplicaReport:
        import json

        import ray
        parts = [part async for part in respond(self._app, _HEALTH)]
        head, body = parts[0], b"".join(parts[1:])
        try:
            health = json.loads(body)
        except ValueError:
            health = {}
        return ReplicaReport(self.replica_id, os.getpid(), ray.util.get_node_ip_address(),
                             head.status, health, self._state.metrics.render().decode())
