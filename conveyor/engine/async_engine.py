"""``AsyncEngine``: asyncio front of an ``LLMEngine`` that steps on one background thread.

Owns the event-loop side: one ``RequestStream`` (coalesced outputs, see ``request_stream``) per
request, request timeouts, the waiting-queue bound, the watchdog, and bounded draining. The
engine itself is only touched on the engine thread (``engine_thread.EngineThread``); commands
reach it through a thread-safe inbox and outputs come back through ``loop.call_soon_threadsafe``.
Invariants:

- Every accepted request's stream ends with exactly one finished output ("stop", "length",
  "abort" for aborts, timeouts, drains, clients that left or stopped reading, "error" when the
  engine died or stayed wedged through a drain).
- Every wait is bounded: ``drain`` returns within ``timeout + abort_grace`` seconds and
  ``shutdown`` within ``join_timeout`` even when the engine thread is stuck inside a step; the
  streams it could not finish are failed from this side.
- Watchdog: with work pending and no engine iteration finished for ``watchdog_timeout`` seconds
  the engine counts as stalled (``is_stalled``; logged once per stall, counted in
  ``num_stalls``).
- Leaving a stream early (cancellation, ``aclose``, ``close()``) aborts its request; the engine
  thread applies the abort before its next step, so the request's KV blocks are free within one
  step whatever state it was in (waiting, prefilling, decoding, preempted).
- Streams are created, fed and removed on the event loop only.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from conveyor.errors import ConveyorError, InvalidRequestError
from conveyor.sampling_params import SamplingParams
from conveyor.core.stats import EngineStats
from conveyor.engine.engine_thread import (AddCommand, EngineDeadError, EngineThread, Inbox,
                                           OutputObserver)
from conveyor.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from conveyor.engine.request_stream import RequestStream

logger = logging.getLogger("conveyor.serving")

__all__ = ["AsyncEngine", "EngineDeadError", "EngineStats", "EngineStoppedError",
           "QueueFullError", "RequestStream"]


class QueueFullError(ConveyorError):
    """Too many requests are waiting; retry after ``retry_after`` seconds (HTTP 429)."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class EngineStoppedError(ConveyorError):
    """The engine is draining or stopped and takes no new requests (HTTP 503)."""


class AsyncEngine:
    """Run an ``LLMEngine`` on a background thread and stream its outputs to asyncio callers.

    ``start()`` must be called from the event loop that will use the engine. Not thread-safe
    itself: call it from that loop only. ``max_waiting_requests`` bounds the sequences that are
    queued but not yet running (``QueueFullError`` beyond it); ``request_timeout`` (seconds) aborts
    requests that run longer; ``stream_write_timeout`` aborts a request whose consumer left an
    output unread that long; ``watchdog_timeout`` (None: off) is how long the engine may have work
    and finish no iteration before it counts as stalled. ``observer`` sees every output on the
    engine thread (metrics).
    Build ``engine`` on a thread that has exited by then (``server.run_on_own_thread``): a live
    thread that ran the model's OpenMP regions keeps a second pool, and libgomp's workers then
    sleep between parallel regions, which slows every step (see docs/architecture.md).
    """

    def __init__(self, engine: Any, *, max_waiting_requests: int | None = None,
                 request_timeout: float | None = None, observer: OutputObserver | None = None,
                 stream_write_timeout: float | None = None,
                 watchdog_timeout: float | None = None, abort_grace: float = 5.0,
                 join_timeout: float = 5.0):
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.request_timeout = request_timeout
        self.stream_write_timeout = stream_write_timeout
        self.watchdog_timeout = watchdog_timeout
        self.abort_grace = abort_grace
        self.join_timeout = join_timeout
        self.num_stalls = 0                 # times the watchdog saw the engine become stalled
        self._inbox = Inbox()
        self._thread = EngineThread(engine, self._inbox, self._publish, observer)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, RequestStream] = {}
        self._idle = asyncio.Event()
        self._accepting = True
        self._was_stalled = False
        self._wedged = False                # a drain gave up on the engine thread
        self.left_behind = False            # shutdown() returned with the thread still stuck
        self._watch_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the engine thread; outputs are delivered on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._idle.set()
        self._thread.start()
        self._watch()

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests, let in-flight ones finish for up to ``timeout`` seconds, abort
        the rest (they finish with "abort") and wait up to ``abort_grace`` seconds for the aborts
        to land. Streams still open then (the engine is wedged) are failed with "error". Returns
        whether the engine itself finished every request."""
        self._accepting = False
        if await _wait(self._idle, timeout):
            return True
        self.abort_all()
        if await _wait(self._idle, self.abort_grace):
            return True
        self._fail_streams(f"the engine did not finish the request within the {timeout:g} s "
                           f"shutdown timeout nor apply its abort within {self.abort_grace:g} s")
        self._wedged = True
        return False

    async def shutdown(self) -> None:
        """Abort whatever is left and stop the engine thread, waiting up to ``join_timeout``
        seconds for it (not at all after a drain found it wedged); a thread stuck inside a step
        is left behind (it is a daemon)."""
        self._accepting = False
        if self._watch_timer is not None:
            self._watch_timer.cancel()
        if self._thread.is_alive():
            self._inbox.put_stop()
            await asyncio.to_thread(self._thread.join, 0.0 if self._wedged else self.join_timeout)
        await asyncio.sleep(0)   # deliver the aborts handed back while stopping
        if self._thread.is_alive():
            self.left_behind = True
            logger.error("the engine thread did not stop (stuck inside a step); leaving it behind")
            self._fail_streams("the engine stopped while the request was running")
        if hasattr(self.engine, "shutdown"):    # KV-event publisher and TP workers; a step
            await asyncio.to_thread(self.engine.shutdown)      # left behind then fails

    # ------------------------------------------------------------------ state
    @property
    def error(self) -> str | None:
        """Why the engine died (``step()`` raised), or None while it is healthy."""
        return self._thread.error

    @property
    def is_dead(self) -> bool:
        return self._thread.error is not None

    @property
    def num_in_flight(self) -> int:
        """Requests accepted whose stream has not yet received its last output."""
        return len(self._streams)

    @property
    def snapshot(self) -> EngineStats:
        """The engine's ``stats()`` as of the engine thread's last iteration."""
        return self._thread.snapshot

    def stall_seconds(self) -> float:
        """How long the engine has had work without finishing an iteration (0.0: progressing)."""
        return self._thread.stall_seconds(time.monotonic())

    @property
    def is_stalled(self) -> bool:
        """Work pending and no iteration finished for more than ``watchdog_timeout`` seconds."""
        return (self.watchdog_timeout is not None and self._thread.is_alive()
                and self.stall_seconds() > self.watchdog_timeout)

    def stall_message(self) -> str:
        return (f"the engine has had work and finished no step for {self.stall_seconds():.0f} s "
                f"(--watchdog-timeout {self.watchdog_timeout:g})")

    def check_admission(self, n: int = 1) -> None:
        """Raise now what ``add_request`` would raise for being stopped or for a full queue, so
        callers refuse a request before spending work (tokenization) on it."""
        self._check_accepting()
        if not self._inbox.has_room(n, self.max_waiting_requests):
            raise self._queue_full()

    # ------------------------------------------------------------------ requests
    async def add_request(self, prompt: str | list[int], params: SamplingParams, *,
                          request_id: str | None = None, priority: int = 0, tenant: str = "",
                          timeout: float | None = None, cache_salt: str = "") -> RequestStream:
        """Queue a request and return its stream once the engine accepted it.

        Raises what the engine raises for a bad request (``InvalidRequestError``,
        ``CapacityError``), ``QueueFullError``, ``EngineStoppedError`` or ``EngineDeadError``.
        ``timeout`` (default: the engine's ``request_timeout``) aborts the request after that long;
        ``cache_salt`` separates its prefix-cache entries from other salts'.
        """
        self._check_accepting()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        stream = RequestStream(request_id, self.abort, self.stream_write_timeout)
        added = self._loop.create_future()
        cmd = AddCommand(request_id, prompt, params, priority, tenant, time.monotonic(),
                         lambda exc: self._call_soon(self._on_added, cmd, added, exc), cache_salt)
        self._streams[request_id] = stream
        self._idle.clear()
        try:
            if not self._inbox.put_add(cmd, self.max_waiting_requests):
                raise self._queue_full()
            await asyncio.shield(added)
        except asyncio.CancelledError:
            added.cancel()          # nobody will read the outcome any more
            self.abort(request_id)
            raise
        except BaseException:
            self._remove(request_id)
            raise
        timeout = self.request_timeout if timeout is None else timeout
        if timeout is not None and request_id in self._streams:
            stream._timer = self._loop.call_later(timeout, self.abort, request_id)
        return stream

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None, priority: int = 0, tenant: str = "",
                       timeout: float | None = None,
                       cache_salt: str = "") -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; leaving the loop early (or being cancelled) aborts it."""
        stream = await self.add_request(prompt, params, request_id=request_id,
                                        priority=priority, tenant=tenant, timeout=timeout,
                                        cache_salt=cache_salt)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        """Abort a request in any state; its stream gets a last output with "abort"."""
        if self._thread.is_alive():
            self._inbox.put_abort(request_id)

    def abort_all(self) -> None:
        for request_id in list(self._streams):
            self.abort(request_id)

    def _check_accepting(self) -> None:
        if self._loop is None:
            raise EngineStoppedError("the engine has not started yet")
        if not self._thread.is_alive():
            raise EngineDeadError(self._inbox.closed_reason or "the engine has stopped")
        if not self._accepting:
            raise EngineStoppedError("the server is shutting down and takes no new requests")

    def _queue_full(self) -> QueueFullError:
        return QueueFullError(f"{self.max_waiting_requests} requests are already waiting; "
                              "retry later")

    # ------------------------------------------------------------------ delivery (event loop)
    def _on_added(self, cmd: AddCommand, added: asyncio.Future, exc: BaseException | None) -> None:
        if exc is not None:
            self._remove(cmd.request_id)
        if added.done():
            return
        if exc is None:
            added.set_result(None)
        else:
            added.set_exception(exc)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        """Called on the engine thread: move the outputs to the event loop."""
        self._call_soon(self._dispatch, outputs)

    def _call_soon(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass    # the loop is closed: nobody is listening any more

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream.push(out)
            if out.finished:
                self._remove(out.request_id)

    def _fail_streams(self, message: str) -> None:
        """End every open stream with "error" from this side (the engine cannot any more)."""
        for request_id, stream in list(self._streams.items()):
            n = max(1, self._thread.num_choices(request_id))
            stream.push(RequestOutput(
                request_id, None, [], [CompletionOutput(i, "", [], finish_reason="error")
                                       for i in range(n)], True, RequestMetrics(0.0),
                error=message))
            self._remove(request_id)

    def _remove(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.cancel_timers()
        if not self._streams:
            self._idle.set()

    def _watch(self) -> None:
        """Check the watchdog about once a second (or faster for a short timeout)."""
        if self.watchdog_timeout is None:
            return
        stalled = self.is_stalled
        if stalled and not self._was_stalled:
            self.num_stalls += 1
            logger.error("watchdog: %s", self.stall_message())
        elif self._was_stalled and not stalled:
            logger.warning("watchdog: the engine is making progress again")
        self._was_stalled = stalled
        period = min(1.0, self.watchdog_timeout / 4)
        self._watch_timer = self._loop.call_later(period, self._watch)


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        return False
    return True
