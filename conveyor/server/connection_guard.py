"""Connection limits of the HTTP server: a cap on open connections, and deadlines for a request's
head, its body and a response the client stopped reading (slowloris and slow readers).

uvicorn's h11 protocol arms no timer until a first response has completed: a connection that
sends nothing, a request head sent a byte at a time, or a body that never ends is held forever;
its ``limit_concurrency`` only answers 503 once a whole request head arrived, and it counts the
half-open connections too, so ``/health`` itself would get 503. ``GuardedH11Protocol`` is uvicorn's
``H11Protocol`` plus ``ConnectionGuard``'s bookkeeping. Invariants:

- A connection is always in one phase, with at most one read deadline: HEAD (waiting for a whole
  request head: ``header_timeout`` from connecting, or from the first byte after a keep-alive
  pause; 408 and closed when it passes), BODY (the head arrived, the body has not:
  ``body_timeout``, not counted while the app itself holds reading back; closed when it passes,
  and the app sees a disconnect), APP (the app has the whole request: no deadline) and IDLE
  (between keep-alive requests: uvicorn's keep-alive timeout).
- A response whose transport buffer stays full (the client reads nothing) for ``write_timeout``
  seconds is cut off: the connection is aborted and the app sees a disconnect.
- At most ``max_connections`` are open. At the cap a new connection evicts the oldest one that
  has no request in flight (HEAD or IDLE); it is refused (503, closed) only when every open
  connection has a request in flight. Half-open connections therefore never lock out a real
  client, ``/health`` included.
- A request head is at most 16 KiB (h11's own limit: 400 beyond).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import resource
from dataclasses import dataclass
from typing import Any, Callable

from uvicorn.protocols.http.h11_impl import H11Protocol

from conveyor.errors import InvalidRequestError

logger = logging.getLogger("conveyor.serving")

_FDS_BESIDE_CONNECTIONS = 256     # model files, the tokenizer, logs, pipes...


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """max_connections: open connections at most; the timeouts are in seconds."""

    max_connections: int = 2048
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    write_timeout: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_connections", "header_timeout", "body_timeout", "write_timeout"):
            if not getattr(self, name) > 0:
                flag = "stream_write_timeout" if name == "write_timeout" else name
                raise InvalidRequestError(f"--{flag.replace('_', '-')} must be positive", name)


class Phase(enum.Enum):
    HEAD = "head"
    BODY = "body"
    APP = "app"
    IDLE = "idle"


class ConnectionGuard:
    """The open connections of one server and which of them may be evicted, oldest first."""

    def __init__(self, limits: ConnectionLimits):
        self.limits = limits
        self.num_refused = 0
        self.num_evicted = 0
        self.num_timed_out = 0
        self._open: set[GuardedH11Protocol] = set()
        self._evictable: dict[GuardedH11Protocol, None] = {}   # insertion order = age

    @property
    def num_open(self) -> int:
        return len(self._open)

    def protocol_factory(self) -> Callable[..., asyncio.Protocol]:
        """What ``uvicorn.Config(http=...)`` takes: builds one guarded protocol per connection."""
        return functools.partial(GuardedH11Protocol, guard=self)

    def admit(self, conn: "GuardedH11Protocol") -> bool:
        if len(self._open) >= self.limits.max_connections:
            victim = next(iter(self._evictable), None)
            if victim is None:
                self.num_refused += 1
                return False
            self.forget(victim)
            self.num_evicted += 1
            victim.evict()
        self._open.add(conn)
        return True

    def set_evictable(self, conn: "GuardedH11Protocol", evictable: bool) -> None:
        self._evictable.pop(conn, None)
        if evictable and conn in self._open:
            self._evictable[conn] = None

    def forget(self, conn: "GuardedH11Protocol") -> None:
        self._open.discard(conn)
        self._evictable.pop(conn, None)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the phases and deadlines of the module docstring."""

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *, guard: ConnectionGuard):
        super().__init__(config, server_state, app_state, _loop)
        self.guard = guard
        self.phase = Phase.HEAD
        self._deadline: asyncio.TimerHandle | None = None
        self._write_deadline: asyncio.TimerHandle | None = None
        self._tracked_cycle: Any = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.guard.admit(self):
            logger.warning("refusing a connection: %d are open, each with a request in flight "
                           "(--max-connections)", self.guard.num_open)
            self._reply_and_close(b"503 Service Unavailable")
            return
        self._enter(Phase.HEAD)

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.forget(self)
        self._cancel_deadline()
        self._cancel_write_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.phase is Phase.IDLE:
            self._enter(Phase.HEAD)         # the first byte of the next keep-alive request
        super().data_received(data)
        self._follow_cycle()

    def on_response_complete(self) -> None:
        super().on_response_complete()      # may start a pipelined request's cycle
        if not self.transport.is_closing() and not self._follow_cycle():
            self._enter(Phase.IDLE)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_deadline is None:
            self._write_deadline = self.loop.call_later(self.guard.limits.write_timeout,
                                                        self._write_expired)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_write_deadline()

    def evict(self) -> None:
        """Close this connection (it has no request in flight) to make room for a new one."""
        self._cancel_deadline()
        self.transport.close()

    # ------------------------------------------------------------------ phases
    def _follow_cycle(self) -> bool:
        """Follow uvicorn's request cycle into BODY or APP; True while a request is in flight."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return False
        if cycle is not self._tracked_cycle:        # a new request head was parsed
            self._tracked_cycle = cycle
            self._enter(Phase.BODY if cycle.more_body else Phase.APP)
        elif self.phase is Phase.BODY and not cycle.more_body:
            self._enter(Phase.APP)
        return True

    def _enter(self, phase: Phase) -> None:
        self.phase = phase
        self._cancel_deadline()
        self.guard.set_evictable(self, phase in (Phase.HEAD, Phase.IDLE))
        limits = self.guard.limits
        timeout = {Phase.HEAD: limits.header_timeout, Phase.BODY: limits.body_timeout}.get(phase)
        if timeout is not None:
            self._deadline = self.loop.call_later(timeout, self._expired, phase)

    def _expired(self, phase: Phase) -> None:
        self._deadline = None
        if self.transport.is_closing() or phase is not self.phase:
            return
        if phase is Phase.BODY and self.flow.read_paused:
            # the app has not read what arrived: the server holds the body back, not the client
            self._deadline = self.loop.call_later(self.guard.limits.body_timeout, self._expired,
                                                  phase)
            return
        self.guard.num_timed_out += 1
        if phase is Phase.HEAD:
            self._reply_and_close(b"408 Request Timeout")
        else:
            self.transport.close()

    def _write_expired(self) -> None:
        self._write_deadline = None
        self.guard.num_timed_out += 1
        logger.info("closing a connection whose client read nothing for %g s",
                    self.guard.limits.write_timeout)
        self.transport.abort()

    def _reply_and_close(self, status: bytes) -> None:
        self.transport.write(b"HTTP/1.1 " + status +
                             b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        self.transport.close()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _cancel_write_deadline(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None


def raise_open_file_limit(max_connections: int) -> None:
    """Raise the soft limit on open files toward what ``max_connections`` needs (each is one
    descriptor): at the soft limit accept() fails and asyncio stops accepting for a second at a
    time, ``/health`` included. Warns when the hard limit is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + _FDS_BESIDE_CONNECTIONS
    if hard != resource.RLIM_INFINITY and want > hard:
        logger.warning("--max-connections %d needs about %d open files but the hard limit is %d; "
                       "raise it (ulimit -Hn) or lower --max-connections", max_connections,
                       want, hard)
        want = hard
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
