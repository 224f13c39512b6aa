"""``RequestStream``: the outputs of one request as its consumer reads them, coalesced.

Owns the per-request hand-off between the engine's outputs (pushed on the event loop) and the
one consumer that iterates the stream (an SSE response, a non-streaming handler, a test).
Invariants:

- Bounded: at most one output waits unread. When the consumer is behind, a new output is merged
  into the waiting one (deltas appended, everything else taken from the newer output) instead of
  queueing another, so a consumer that stops reading costs O(its output) memory, never O(output
  squared), and each push costs O(new tokens).
- Lossless: the deltas a consumer reads add up to the whole output, whatever its pace, and the
  last output it reads is the finished one.
- A consumer that leaves an output unread for ``write_timeout`` seconds is gone as far as the
  engine is concerned: its request is aborted (``on_stalled``), so a client that stopped reading
  holds no batch slot or KV blocks beyond that.
- Created, fed and read on the event loop only.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Callable

from conveyor.engine.outputs import CompletionOutput, Logprob, RequestOutput

logger = logging.getLogger("conveyor.serving")


@dataclass(slots=True)
class _ChoiceDelta:
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)


class _Unread:
    """The outputs pushed since the consumer last read, merged into one."""

    __slots__ = ("latest", "deltas")

    def __init__(self, out: RequestOutput):
        self.latest = out
        self.deltas = [_ChoiceDelta() for _ in out.outputs]
        self._add_deltas(out)

    def merge(self, out: RequestOutput) -> None:
        self.latest = out
        self._add_deltas(out)

    def _add_deltas(self, out: RequestOutput) -> None:
        for c in out.outputs:
            d = self.deltas[c.index]
            if c.delta_text:
                d.texts.append(c.delta_text)
            d.token_ids.extend(c.delta_token_ids)
            d.logprobs.extend(c.delta_logprobs)

    def build(self) -> RequestOutput:
        """The newest output with the merged deltas (fresh objects; nothing shared is changed)."""
        out = self.latest
        choices = []
        for c in out.outputs:
            d = self.deltas[c.index]
            choices.append(CompletionOutput(
                c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason, c.logprobs,
                c.cumulative_logprob, delta_text="".join(d.texts), delta_token_ids=d.token_ids,
                delta_logprobs=d.logprobs))
        return RequestOutput(out.request_id, out.prompt, out.prompt_token_ids, choices,
                             out.finished, out.metrics, out.num_cached_tokens, out.error)


class RequestStream:
    """The outputs of one request, in order; iteration ends after the finished one.

    Each output's ``delta_*`` fields hold exactly what is new since the previous output this
    stream returned (several engine steps' worth when the reader was slow). ``close()`` aborts the
    request if it has not finished; it is safe to call twice.
    """

    __slots__ = ("request_id", "finished", "write_timeout", "_unread", "_waiter", "_on_close",
                 "_on_stalled", "_timer", "_stall_timer")

    def __init__(self, request_id: str, on_close: Callable[[str], None],
                 write_timeout: float | None = None,
                 on_stalled: Callable[[str], None] | None = None):
        self.request_id = request_id
        self.finished = False
        self.write_timeout = write_timeout
        self._unread: _Unread | None = None
        self._waiter: asyncio.Future | None = None
        self._on_close = on_close
        self._on_stalled = on_stalled or on_close
        self._timer: asyncio.TimerHandle | None = None         # the request timeout
        self._stall_timer: asyncio.TimerHandle | None = None   # the unread-output timeout

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        while self._unread is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        unread, self._unread = self._unread, None
        self._cancel_stall_timer()
        out = unread.build()
        self.finished = out.finished
        return out

    @property
    def num_unread(self) -> int:
        """Outputs waiting for the consumer: 0 or 1 (they are merged)."""
        return 0 if self._unread is None else 1

    def close(self) -> None:
        if not self.finished:
            self._on_close(self.request_id)

    def push(self, out: RequestOutput) -> None:
        """Hand the consumer a new output (event loop only); merged if one is still unread."""
        if self._unread is None:
            self._unread = _Unread(out)
            if self.write_timeout is not None and not out.finished:
                loop = asyncio.get_running_loop()
                self._stall_timer = loop.call_later(self.write_timeout, self._stalled)
        else:
            self._unread.merge(out)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def cancel_timers(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._cancel_stall_timer()

    def _cancel_stall_timer(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _stalled(self) -> None:
        self._stall_timer = None
        if self._unread is not None and not self._unread.latest.finished:
            logger.info("request %s: its client read nothing for %.0f s; aborting it",
                        self.request_id, self.write_timeout)
            self._on_stalled(self.request_id)
