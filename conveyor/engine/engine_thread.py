"""The engine thread behind ``AsyncEngine``: the only code that touches the ``LLMEngine``.

Owns the command inbox (event loop -> thread), the step loop, and the hand-back of outputs
(thread -> event loop through a callback the loop side provides). Invariants:

- Only this thread calls into the ``LLMEngine``; it is not thread-safe.
- Commands are applied between steps: adds first, then aborts (so an abort racing its own add
  still lands), then one ``step()``. An abort therefore frees KV blocks before the next schedule.
- With no command and no unfinished request the thread sleeps on a condition variable; when
  requests exist but a step scheduled nothing (static/dynamic batching waiting to launch a batch)
  it waits ``_STALL_WAIT_S`` for commands before stepping again, instead of spinning.
- Outputs handed back are the output processor's fresh per-step objects, passed on as they are:
  their deltas are what is new since the request's previous output and their cumulative lists
  are O(1) views that never change, so hand-back costs O(new tokens) and the loop side never sees
  an object this thread will change again.
- After every ``step()`` the observer's ``on_step(engine, started, finished)`` runs here (the
  belt feed of /metrics and /dashboard, O(batch slots)); its failure is logged, never fatal.
- Heartbeat: ``last_beat`` is set whenever the thread takes commands and after every iteration;
  ``stall_seconds()`` is how long there has been work (a live request, or a command not yet
  taken) without either, which is what the watchdog reports.
- Every request that was added gets exactly one finished output: "stop", "length", "abort", or
  "error" when ``step()`` raised. After an error the thread exits and the inbox refuses adds.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

from conveyor.core.stats import EngineStats
from conveyor.errors import ConveyorError
from conveyor.sampling_params import SamplingParams
from conveyor.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput

if TYPE_CHECKING:
    from conveyor.engine.llm_engine import LLMEngine

logger = logging.getLogger("conveyor.serving")

_STALL_WAIT_S = 0.002


class EngineDeadError(ConveyorError):
    """The engine loop failed; no request can run until the server is restarted."""


class OutputObserver(Protocol):
    """Sees every batch of outputs on the engine thread (metrics); must be quick and not raise."""

    def on_outputs(self, outputs: list[RequestOutput], now: float) -> None: ...

    def on_step(self, engine: Any, started: float, finished: float) -> None:
        """After every ``engine.step()`` (the dashboard's belt); O(batch slots)."""


@dataclass(slots=True)
class AddCommand:
    """One request for the thread to add; ``on_added(exc)`` reports the outcome (None = added)."""

    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    priority: int
    tenant: str
    arrival_time: float
    on_added: Callable[[BaseException | None], None]
    cache_salt: str = ""


@dataclass(slots=True)
class _Batch:
    adds: list[AddCommand] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    stop: bool = False


class Inbox:
    """Thread-safe hand-off of commands to the engine thread, plus the waiting-queue bound.

    ``num_queued`` counts sequences not yet running: pending here, taken but not yet reflected in
    the engine's waiting queue (in transit), or waiting in the engine at its last iteration.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._batch = _Batch()
        self.pending_since: float | None = None    # when the oldest untaken command was queued
        self._num_pending = 0
        self._num_in_transit = 0
        self._num_engine_waiting = 0
        self.closed_reason: str | None = None

    def put_add(self, cmd: AddCommand, max_queued: int | None) -> bool:
        """Queue an add; False when it would take the queue past ``max_queued`` sequences (an
        empty queue takes any request). Raises EngineDeadError once closed."""
        with self._cond:
            if self.closed_reason is not None:
                raise EngineDeadError(self.closed_reason)
            queued = self._num_pending + self._num_in_transit + self._num_engine_waiting
            if max_queued is not None and queued + cmd.params.n > max_queued and queued > 0:
                return False
            self._batch.adds.append(cmd)
            self._num_pending += cmd.params.n
            self._notify()
        return True

    def has_room(self, n: int, max_queued: int | None) -> bool:
        """Whether ``put_add`` would take ``n`` more sequences now (a cheap check made before
        the expensive work of an add: tokenization)."""
        with self._cond:
            queued = self._num_pending + self._num_in_transit + self._num_engine_waiting
            return max_queued is None or queued == 0 or queued + n <= max_queued

    def put_abort(self, request_id: str) -> None:
        with self._cond:
            self._batch.aborts.append(request_id)
            self._notify()

    def put_stop(self) -> None:
        with self._cond:
            self._batch.stop = True
            self._notify()

    def _notify(self) -> None:
        if self.pending_since is None:
            self.pending_since = time.monotonic()
        self._cond.notify()

    def take(self, block: bool, timeout: float | None = None) -> _Batch:
        """Everything queued so far; with ``block``, sleep until there is something (or until
        ``timeout`` seconds passed)."""
        with self._cond:
            if block:
                self._cond.wait_for(
                    lambda: self._batch.adds or self._batch.aborts or self._batch.stop, timeout)
            batch, self._batch = self._batch, _Batch(stop=self._batch.stop)
            self._num_in_transit += self._num_pending
            self._num_pending = 0
            self.pending_since = None
            return batch

    def set_engine_waiting(self, num_waiting: int) -> None:
        with self._cond:
            self._num_engine_waiting = num_waiting
            self._num_in_transit = 0

    def close(self, reason: str) -> list[AddCommand]:
        """Refuse further adds; returns the adds that were still pending."""
        with self._cond:
            self.closed_reason = reason
            adds, self._batch.adds = self._batch.adds, []
            return adds


class EngineThread:
    """Steps ``engine`` on a dedicated thread; outputs go to ``publish`` (called on this thread)."""

    def __init__(self, engine: "LLMEngine", inbox: Inbox,
                 publish: Callable[[list[RequestOutput]], None],
                 observer: OutputObserver | None = None):
        self.engine = engine
        self.inbox = inbox
        self.publish = publish
        self.observer = observer
        self.snapshot: EngineStats = engine.stats()        # as of the last iteration
        self.error: str | None = None                      # set once, when the engine died
        self.last_beat = time.monotonic()                  # see the module docstring
        self._live: dict[str, int] = {}                    # request id -> n, added and unfinished
        self._thread = threading.Thread(target=self._run, name="conveyor-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def num_choices(self, request_id: str) -> int:
        """``n`` of a live request (0 when it is not live)."""
        return self._live.get(request_id, 0)

    def stall_seconds(self, now: float) -> float:
        """Seconds there has been work (a live request or an untaken command) while the thread
        neither took commands nor finished an iteration; 0.0 while idle or progressing. Read from
        any thread: it only reads fields this thread replaces whole."""
        since = [t for t in (self.inbox.pending_since, self.last_beat if self._live else None)
                 if t is not None]
        return max(0.0, now - min(since)) if since else 0.0

    def _run(self) -> None:
        stalled = False
        try:
            while True:
                busy = self.engine.has_unfinished_requests()
                batch = self.inbox.take(block=stalled or not busy,
                                        timeout=_STALL_WAIT_S if busy else None)
                self.last_beat = time.monotonic()
                outputs: list[RequestOutput] = []
                for cmd in batch.adds:
                    self._add(cmd)
                for request_id in batch.aborts:
                    outputs += self.engine.abort_request(request_id)
                if batch.stop:
                    for request_id in list(self._live):
                        outputs += self.engine.abort_request(request_id)
                stepped = not batch.stop and self.engine.has_unfinished_requests()
                if stepped:
                    started = time.monotonic()
                    outputs += self.engine.step()
                    self._observe_step(started)
                self._hand_back(outputs)
                if stepped:
                    stalled = self.snapshot.last_step_num_scheduled_tokens == 0
                self.last_beat = time.monotonic()
                if batch.stop:
                    for cmd in self.inbox.close("the engine has stopped"):
                        cmd.on_added(EngineDeadError("the engine has stopped"))
                    return
        except Exception as exc:  # noqa: BLE001 - any failure of the engine must reach every client
            self._die(exc)

    def _add(self, cmd: AddCommand) -> None:
        try:
            self.engine.add_request(cmd.prompt, cmd.params, request_id=cmd.request_id,
                                    arrival_time=cmd.arrival_time, priority=cmd.priority,
                                    tenant=cmd.tenant, cache_salt=cmd.cache_salt)
        except Exception as exc:  # noqa: BLE001 - the engine rolled the request back; report it
            cmd.on_added(exc)
            return
        self._live[cmd.request_id] = cmd.params.n
        cmd.on_added(None)

    def _observe_step(self, started: float) -> None:
        if self.observer is not None:
            try:
                self.observer.on_step(self.engine, started, time.monotonic())
            except Exception:  # noqa: BLE001 - metrics must never take the engine down
                logger.exception("step observer failed")

    def _hand_back(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.finished:
                self._live.pop(out.request_id, None)
        self.snapshot = self.engine.stats()
        self.inbox.set_engine_waiting(self.snapshot.num_waiting)
        if not outputs:
            return
        if self.observer is not None:
            try:
                self.observer.on_outputs(outputs, time.monotonic())
            except Exception:  # noqa: BLE001 - metrics must never take the engine down
                logger.exception("output observer failed")
        self.publish(outputs)

    def _die(self, exc: Exception) -> None:
        message = f"the engine failed: {type(exc).__name__}: {exc}"
        self.error = message
        logger.error("%s; failing %d in-flight request(s)", message, len(self._live),
                     exc_info=exc)
        for cmd in self.inbox.close(message):
            cmd.on_added(EngineDeadError(message))
        self._hand_back([self._error_output(rid, n, message)
                         for rid, n in list(self._live.items())])

    def _error_output(self, request_id: str, n: int, message: str) -> RequestOutput:
        try:
            aborted = self.engine.abort_request(request_id)
        except Exception:  # noqa: BLE001 - the engine is broken; report without it
            aborted = []
        if aborted:
            out = aborted[-1]
        else:
            out = RequestOutput(request_id, None, [], [CompletionOutput(i, "", []) for i in range(n)],
                                True, RequestMetrics(0.0))
        for choice in out.outputs:
            if choice.finish_reason in (None, "abort"):
                choice.finish_reason = "error"
        out.finished, out.error = True, message
        return out

