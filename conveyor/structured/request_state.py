"""The per-request constraint the engine core carries, and one step's grammar bitmask.

A ``StructuredRequest`` belongs to one core ``Request`` (each ``n > 1`` child has its own): it
waits for its grammar's compile future, then holds the request's own matcher, which has consumed
exactly the request's output tokens so far. Because the matcher lives with the output tokens
(not with the KV cache or the runner), recompute and swap preemption, prefix caching and chunked
prefill leave it consistent without any extra work. Pure Python plus numpy: the core may use it.

Invariants:
- ``poll`` never blocks; the engine moves a request to the scheduler only once it is READY.
- ``release()`` (on finish, in every state) drops the matcher; a released request is never
  polled, filled or advanced again.
"""

from __future__ import annotations

import concurrent.futures
import enum
from dataclasses import dataclass

import numpy as np

from conveyor.errors import InvalidRequestError
from conveyor.structured.backend import GrammarCompileError, Matcher, allocate_bitmask
from conveyor.structured.compile_service import compile_timeout_error
from conveyor.structured.params import StructuredOutputsParams


class GrammarStatus(enum.Enum):
    COMPILING = "compiling"
    READY = "ready"
    FAILED = "failed"


@dataclass(slots=True)
class StructuredRequest:
    """spec: the constraint; future: its compile; deadline: clock time after which a compile
    still running fails the request; vocab_size: width of the logits the bitmask covers."""

    spec: StructuredOutputsParams
    future: concurrent.futures.Future
    deadline: float
    vocab_size: int
    timeout_s: float = 0.0
    matcher: Matcher | None = None
    error: str | None = None
    rejected: bool = False            # a sampled token the grammar did not allow

    def poll(self, now: float) -> GrammarStatus:
        """READY once a matcher exists; FAILED (``error`` set) if the compile failed or the
        deadline passed first; COMPILING otherwise. Never waits."""
        if self.matcher is not None:
            return GrammarStatus.READY
        if self.error is None and self.future.done():
            try:
                self.matcher = self.future.result().matcher()
                return GrammarStatus.READY
            except GrammarCompileError as exc:
                self.error = str(exc.for_spec(self.spec))
            except InvalidRequestError as exc:
                self.error = str(exc)
            except Exception as exc:  # noqa: BLE001 - a backend fault fails this request only
                self.error = (f"{self.spec.param} could not be compiled "
                              f"({type(exc).__name__}: {exc})")
        elif self.error is None and now >= self.deadline:
            self.error = str(compile_timeout_error(self.spec, self.timeout_s))
        return GrammarStatus.FAILED if self.error is not None else GrammarStatus.COMPILING

    def accept(self, token: int) -> None:
        """Advance by one sampled token (a finished or released request is left alone)."""
        if self.matcher is not None and not self.matcher.accept(token):
            self.rejected = True

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and takes no more tokens (the request finishes with stop)."""
        return self.matcher is not None and not self.rejected and self.matcher.is_terminated()

    def release(self) -> None:
        self.matcher = None


@dataclass(slots=True)
class GrammarBitmask:
    """The allowed next tokens of the constrained requests that sample this step.

    request_ids[i]'s mask is ``bitmask[i]`` (``[len(request_ids), ceil(vocab / 32)]`` int32); a
    request verifying drafts appears once per position, in order.
    Rows of other requests are not in it: they are not masked at all.
    """

    request_ids: list[str]
    bitmask: np.ndarray


def build_grammar_bitmask(rows: list[tuple[str, StructuredRequest, list[int]]]
                          ) -> GrammarBitmask | None:
    """The bitmask for ``rows`` (request id, its READY constraint, its draft tokens this step),
    or None when there are none. A request with drafts gets ``1 + len(drafts)`` consecutive rows:
    the mask after its output so far, then after each draft (the matcher is advanced through the
    drafts, which it allows, and rolled back: it still has consumed exactly the output)."""
    if not rows:
        return None
    total = sum(1 + len(drafts) for _, _, drafts in rows)
    bitmask = allocate_bitmask(total, rows[0][1].vocab_size)  # [total, words]
    ids, i = [], 0
    for rid, sr, drafts in rows:
        sr.matcher.fill_bitmask(bitmask, i)
        for token in drafts:
            sr.matcher.accept(token)
            i += 1
            sr.matcher.fill_bitmask(bitmask, i)
        sr.matcher.rollback(len(drafts))
        ids += [rid] * (1 + len(drafts))
        i += 1
    return GrammarBitmask(ids, bitmask)
