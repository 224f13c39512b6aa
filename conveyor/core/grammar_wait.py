"""Requests whose structured-outputs grammar is still compiling, and each step's grammar bitmask.

A request with structured outputs whose grammar is not compiled yet waits here, outside the
scheduler's queue, so it neither holds KV blocks nor blocks the queue's head; ``EngineCore``
polls this queue at the start of every step (never waiting on a compile) and hands each request
to the scheduler once its matcher exists, keeping its arrival time (so its place in the queue's
order is the one it would have had). A request whose compile failed or timed out finishes with
"error" here. Invariants: a request is in exactly one of this queue and the scheduler; nothing
here holds blocks, so the block-pool invariant is the scheduler's alone.
"""

from __future__ import annotations

from conveyor.core.outputs import EngineCoreOutput, SchedulerOutput
from conveyor.core.request import FinishReason, Request
from conveyor.errors import InvalidRequestError
from conveyor.structured.request_state import (GrammarBitmask, GrammarStatus,
                                               build_grammar_bitmask)


class GrammarWaitQueue:
    """Requests waiting for their grammar, in arrival order."""

    def __init__(self):
        self._waiting: dict[str, Request] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._waiting

    def hold(self, request: Request, now: float) -> bool:
        """Keep ``request`` if its grammar is still compiling (True); False when it can go to the
        scheduler now. Raises the compile error if the grammar is already known to fail."""
        sr = request.structured
        status = sr.poll(now) if sr is not None else GrammarStatus.READY
        if status == GrammarStatus.FAILED:
            raise InvalidRequestError(sr.error, sr.spec.param)
        if status == GrammarStatus.COMPILING:
            self._waiting[request.request_id] = request
            return True
        return False

    def poll(self, now: float) -> tuple[list[Request], list[EngineCoreOutput]]:
        """(requests now ready, in arrival order; outputs of requests that failed, finished)."""
        ready, failed = [], []
        for rid, req in list(self._waiting.items()):
            status = req.structured.poll(now)
            if status == GrammarStatus.COMPILING:
                continue
            del self._waiting[rid]
            if status == GrammarStatus.READY:
                ready.append(req)
                continue
            error = req.structured.error
            req.finish(FinishReason.ERROR, now)
            failed.append(EngineCoreOutput(rid, [], finish_reason=FinishReason.ERROR.value,
                                           error=error).stamp(req))
        return ready, failed

    def finish(self, request_ids, reason: FinishReason, now: float) -> list[Request]:
        """Finish (abort) the listed requests that wait here; returns them."""
        done = []
        for rid in request_ids:
            req = self._waiting.pop(rid, None)
            if req is not None:
                req.finish(reason, now)
                done.append(req)
        return done


def grammar_bitmask(sched: SchedulerOutput, requests: dict[str, Request]) -> GrammarBitmask | None:
    """The bitmask of the constrained requests that sample in ``sched`` (their KV catches up with
    their tokens this step); requests still prefilling a chunk get no mask, nor do others. A
    request with drafts gets one row per verified position (``request_ids`` repeats it)."""
    rows = []
    for rid, n in sched.num_scheduled_tokens.items():
        req = requests[rid]
        sr = req.structured
        drafts = sched.scheduled_spec_tokens.get(rid, [])
        if sr is not None and sr.matcher is not None \
                and req.num_computed_tokens + n - len(drafts) == req.num_tokens:
            rows.append((rid, sr, drafts))
    return build_grammar_bitmask(rows)
