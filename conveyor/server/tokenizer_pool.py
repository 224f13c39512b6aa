"""``TokenizerPool``: the one thread that runs the front end's tokenizer calls, off the event loop.

Owns the queue of tokenizer jobs (encode a prompt, render a chat, decode logprob tokens) of one
server. HF fast tokenizers must not be shared across threads, so a single thread runs them all.
Invariants:

- Bounded: the characters queued or running never exceed ``max_queued_chars`` (an empty pool
  takes any one job); beyond it ``submit`` raises ``TokenizerBusyError`` (HTTP 429) at once
  instead of queueing work nobody will wait for.
- A small job is not queued behind a pile of big ones: jobs run in order of a deadline, their
  arrival plus their size at ``_CHARS_PER_S`` (earliest first), so a short prompt overtakes
  queued huge ones while a big job still waits at most about its own size's worth of later,
  smaller jobs (no starvation).
- A job whose caller went away (its coroutine was cancelled) is skipped, not run; at shutdown the
  queued jobs fail (``EngineStoppedError``, HTTP 503) instead of leaving their callers waiting.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from conveyor.engine.async_engine import EngineStoppedError, QueueFullError

# Rough tokenizer throughput; it only orders jobs (their deadlines), it bounds nothing.
_CHARS_PER_S = 1_000_000


class TokenizerBusyError(QueueFullError):
    """Too much tokenization is queued; retry later (HTTP 429)."""


@dataclass(order=True, slots=True)
class _Job:
    deadline: float
    seq: int
    cost: int = field(compare=False)
    fn: Callable[..., Any] = field(compare=False)
    args: tuple = field(compare=False)
    loop: asyncio.AbstractEventLoop = field(compare=False)
    future: asyncio.Future = field(compare=False)
    cancelled: bool = field(default=False, compare=False)


class TokenizerPool:
    """Runs ``fn(*args)`` calls on one daemon thread; see the module docstring for the order.

    ``cost`` is the job's size in characters (text to encode, or roughly the text a decode
    yields). ``run`` is called on an event loop; the result comes back on that loop.
    """

    def __init__(self, max_queued_chars: int, name: str = "conveyor-tokenizer"):
        self.max_queued_chars = max_queued_chars
        self.queued_chars = 0               # characters of the jobs queued or running
        self._heap: list[_Job] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    async def run(self, fn: Callable[..., Any], *args: Any, cost: int = 1) -> Any:
        loop = asyncio.get_running_loop()
        job = _Job(time.monotonic() + cost / _CHARS_PER_S, next(self._seq), max(1, cost), fn,
                   args, loop, loop.create_future())
        with self._cond:
            if self._closed:
                raise EngineStoppedError("the server is shutting down")
            if self.queued_chars and self.queued_chars + job.cost > self.max_queued_chars:
                raise TokenizerBusyError(
                    f"{self.queued_chars} characters are already waiting to be tokenized; "
                    "retry later or send a shorter prompt")
            heapq.heappush(self._heap, job)
            self.queued_chars += job.cost
            self._cond.notify()
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancelled = True
            raise

    def shutdown(self, wait: bool = False) -> None:
        """Run no more jobs: the queued ones fail with ``EngineStoppedError``; with ``wait``,
        join the thread (after the job it is running, if any)."""
        with self._cond:
            self._closed = True
            dropped, self._heap = self._heap, []
            self.queued_chars -= sum(job.cost for job in dropped)
            self._cond.notify()
        for job in dropped:
            _settle_soon(job, None, EngineStoppedError("the server is shutting down"))
        if wait:
            self._thread.join()

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._heap or self._closed)
                if self._closed:
                    return
                job = heapq.heappop(self._heap)
            result, error = None, None
            if not job.cancelled:
                try:
                    result = job.fn(*job.args)
                except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                    error = exc
            with self._cond:
                self.queued_chars -= job.cost
            if not job.cancelled:
                _settle_soon(job, result, error)


def _settle_soon(job: _Job, result: Any, error: BaseException | None) -> None:
    try:
        job.loop.call_soon_threadsafe(_settle, job.future, result, error)
    except RuntimeError:
        pass    # the loop is closed: nobody is waiting any more


def _settle(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
