"""``AsyncEngine``: asyncio front of an ``LLMEngine`` that steps on one background thread.

Owns the event-loop side: one ``RequestStream`` (an ``asyncio.Queue`` of outputs) per request,
request timeouts, the waiting-queue bound, and graceful draining. The engine itself is only
touched on the engine thread (``engine_thread.EngineThread``); commands reach it through a
thread-safe inbox and outputs come back through ``loop.call_soon_threadsafe``. Invariants:

- Every accepted request's stream ends with exactly one finished output ("stop", "length",
  "abort" for aborts, timeouts, drains and clients that left, "error" when the engine died).
- Leaving a stream early (cancellation, ``aclose``, ``close()``) aborts its request; the engine
  thread applies the abort before its next step, so the request's KV blocks are free within one
  step whatever state it was in (waiting, prefilling, decoding, preempted).
- Streams are created, fed and removed on the event loop only.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from conveyor.errors import ConveyorError, InvalidRequestError
from conveyor.sampling_params import SamplingParams
from conveyor.serving.engine_thread import (AddCommand, EngineDeadError, EngineSnapshot,
                                            EngineThread, Inbox, OutputObserver)
from conveyor.serving.outputs import RequestOutput

__all__ = ["AsyncEngine", "EngineDeadError", "EngineSnapshot", "EngineStoppedError",
           "QueueFullError", "RequestStream"]


class QueueFullError(ConveyorError):
    """Too many requests are waiting; retry after ``retry_after`` seconds (HTTP 429)."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class EngineStoppedError(ConveyorError):
    """The engine is draining or stopped and takes no new requests (HTTP 503)."""


class RequestStream:
    """The outputs of one request, in order; iteration ends after the finished one.

    Each output's ``delta_*`` fields hold exactly what is new since the previous output of this
    stream. ``close()`` aborts the request if it has not finished; it is safe to call twice.
    """

    __slots__ = ("request_id", "finished", "_queue", "_engine", "_timer")

    def __init__(self, request_id: str, engine: "AsyncEngine"):
        self.request_id = request_id
        self.finished = False
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._engine = engine
        self._timer: asyncio.TimerHandle | None = None

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self._queue.get()
        self.finished = out.finished
        return out

    def close(self) -> None:
        if not self.finished:
            self._engine.abort(self.request_id)


class AsyncEngine:
    """Run an ``LLMEngine`` on a background thread and stream its outputs to asyncio callers.

    ``start()`` must be called from the event loop that will use the engine. Not thread-safe
    itself: call it from that loop only. ``max_waiting_requests`` bounds the sequences that are
    queued but not yet running (``QueueFullError`` beyond it); ``request_timeout`` (seconds) aborts
    requests that run longer. ``observer`` sees every output on the engine thread (metrics).
    Build ``engine`` on a thread that has exited by then (``server.run_on_own_thread``): a live
    thread that ran the model's OpenMP regions keeps a second pool, and libgomp's workers then
    sleep between parallel regions, which slows every step (see docs/architecture.md).
    """

    def __init__(self, engine: Any, *, max_waiting_requests: int | None = None,
                 request_timeout: float | None = None, observer: OutputObserver | None = None):
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.request_timeout = request_timeout
        self._inbox = Inbox()
        self._thread = EngineThread(engine, self._inbox, self._publish, observer)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, RequestStream] = {}
        self._idle = asyncio.Event()
        self._accepting = True

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the engine thread; outputs are delivered on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._idle.set()
        self._thread.start()

    async def drain(self, timeout: float) -> None:
        """Refuse new requests, let in-flight ones finish for up to ``timeout`` seconds, abort
        the rest (they finish with "abort") and wait until every stream got its last output."""
        self._accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            self.abort_all()
            await self._idle.wait()

    async def shutdown(self) -> None:
        """Abort whatever is left, stop the engine thread and wait for it."""
        self._accepting = False
        if self._thread.is_alive():
            self._inbox.put_stop()
            await asyncio.to_thread(self._thread.join)
        await asyncio.sleep(0)   # deliver the aborts handed back while stopping

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
    def snapshot(self) -> EngineSnapshot:
        return self._thread.snapshot

    # ------------------------------------------------------------------ requests
    async def add_request(self, prompt: str | list[int], params: SamplingParams, *,
                          request_id: str | None = None, priority: int = 0, tenant: str = "",
                          timeout: float | None = None) -> RequestStream:
        """Queue a request and return its stream once the engine accepted it.

        Raises what the engine raises for a bad request (``InvalidRequestError``,
        ``CapacityError``), ``QueueFullError``, ``EngineStoppedError`` or ``EngineDeadError``.
        ``timeout`` (default: the engine's ``request_timeout``) aborts the request after that long.
        """
        self._check_accepting()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        stream = RequestStream(request_id, self)
        added = self._loop.create_future()
        cmd = AddCommand(request_id, prompt, params, priority, tenant, time.monotonic(),
                         lambda exc: self._call_soon(self._on_added, cmd, added, exc))
        self._streams[request_id] = stream
        self._idle.clear()
        try:
            if not self._inbox.put_add(cmd, self.max_waiting_requests):
                raise QueueFullError(f"{self.max_waiting_requests} requests are already waiting; "
                                     "retry later")
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
                       timeout: float | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; leaving the loop early (or being cancelled) aborts it."""
        stream = await self.add_request(prompt, params, request_id=request_id,
                                        priority=priority, tenant=tenant, timeout=timeout)
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
            stream._queue.put_nowait(out)
            if out.finished:
                self._remove(out.request_id)

    def _remove(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None and stream._timer is not None:
            stream._timer.cancel()
        if not self._streams:
            self._idle.set()
