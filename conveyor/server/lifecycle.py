"""The server process's life under uvicorn: guarded connections, signals, a bounded drain.

Owns how ``conveyor serve`` runs uvicorn (the guarded h11 protocol of ``connection_guard``, the
open-file limit) and what SIGTERM/SIGINT do. Invariants:

- The first signal starts the app's drain (new requests 503, in-flight ones finish or are
  aborted, each wait bounded, see ``AsyncEngine.drain``), then uvicorn stops; the signal is not
  re-raised, so the process exits 0 when the drain finished every request and 1 when it had to
  give up on a wedged engine.
- A second signal, at any point after the first, ends the process at once with ``os._exit``
  (status 128 + the signal's number): nothing it could wait for is trusted any more. A process
  whose engine thread is still stuck after shutdown also leaves with ``os._exit`` (status 1).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any, Awaitable, Callable

import uvicorn

from conveyor.server.connection_guard import (ConnectionGuard, ConnectionLimits,
                                               raise_open_file_limit)

logger = logging.getLogger("conveyor.serving")

_GRACEFUL_SHUTDOWN_S = 10     # uvicorn's wait for connections and tasks after the drain


class GracefulServer(uvicorn.Server):
    """uvicorn with the signal handling of the module docstring; ``drain()`` returns whether
    every request was finished by the engine. ``drained_cleanly`` is False after a drain that
    had to fail requests itself."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[bool]]):
        super().__init__(config)
        self.drained_cleanly = True
        self._drain_fn = drain
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain_task: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self._draining:
            exit_now(128 + sig, f"signal {sig} again: exiting now")
        if self._loop is None:          # not serving yet: nothing to drain
            self.should_exit = True
            return
        self._draining = True
        logger.info("signal %d: draining before exit (a second signal exits at once)", sig)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            self.drained_cleanly = await self._drain_fn()
        finally:
            self.should_exit = True


def exit_now(status: int, message: str) -> None:
    """End the process now, without interpreter teardown (which would wait on, or deadlock
    with, a thread stuck inside the engine)."""
    logger.warning(message)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def build_server(app: Any, drain: Callable[[], Awaitable[bool]], limits: ConnectionLimits, *,
                 host: str, port: int, log_level: str) -> GracefulServer:
    """The server that serves ``app`` once ``run()`` is called (until a signal); afterwards
    ``started`` and ``drained_cleanly`` say how it went."""
    raise_open_file_limit(limits.max_connections)
    guard = ConnectionGuard(limits)
    config = uvicorn.Config(app, host=host, port=port, log_config=None, log_level=log_level,
                            access_log=log_level == "debug", ws="none",
                            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
                            http=guard.protocol_factory(),
                            backlog=max(2048, limits.max_connections))
    return GracefulServer(config, drain)
