"""The request state machine owned by the engine core.

    WAITING ──schedule──► RUNNING ──stop/length──► FINISHED_*
       ▲                    │
       └──── PREEMPTED ◄────┘   (KV freed; resumes by recomputing prompt + output so far)

Any non-finished state can go to FINISHED_ABORTED (client gone, stop string, timeout) or
FINISHED_ERROR. Invariant: ``0 <= num_computed_tokens <= num_tokens``; the request samples a new
token only in the step where ``num_computed_tokens`` reaches ``num_tokens``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from conveyor.sampling_params import SamplingParams
from conveyor.structured.request_state import StructuredRequest


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"
    FINISHED_ERROR = "finished_error"

    @property
    def is_finished(self) -> bool:
        return self.value.startswith("finished")


class FinishReason(str, enum.Enum):
    """The OpenAI-visible reason a request ended."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


_STATUS_FOR_REASON = {
    FinishReason.STOP: RequestStatus.FINISHED_STOPPED,
    FinishReason.LENGTH: RequestStatus.FINISHED_LENGTH,
    FinishReason.ABORT: RequestStatus.FINISHED_ABORTED,
    FinishReason.ERROR: RequestStatus.FINISHED_ERROR,
}


@dataclass(slots=True)
class Request:
    """One generation request as the core sees it: token ids in, token ids out.

    max_tokens is resolved (never None) by the engine before the request reaches the core.
    Times are ``time.monotonic()`` seconds; 0.0 means "not yet". ``structured`` (structured
    outputs) holds the request's grammar matcher, which has consumed exactly
    ``output_token_ids``; it is released when the request finishes.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = 0.0
    priority: int = 0
    tenant: str = ""
    cache_salt: str = ""                # isolates this request's prefix-cache entries
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    num_cached_tokens: int = 0          # prompt tokens served from the prefix cache at admission
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    first_scheduled_time: float = 0.0
    first_token_time: float = 0.0
    finished_time: float = 0.0
    structured: StructuredRequest | None = None
    # Speculative decoding: draft tokens proposed for the next step (never output tokens; their
    # KV is computed only when scheduled; dropped on preemption and replaced every step).
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token: int) -> None:
        """Append a sampled token (and advance the grammar matcher, if any, by it)."""
        self.output_token_ids.append(token)
        if self.structured is not None:
            self.structured.accept(token)

    def finish(self, reason: FinishReason, now: float, stop_reason: int | str | None = None) -> None:
        if self.structured is not None:
            self.structured.release()
        self.status = _STATUS_FOR_REASON[reason]
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.finished_time = now


def check_stop(request: Request, max_model_len: int) -> tuple[FinishReason, int | None] | None:
    """Token-level stop check after a token was appended; stop strings are checked on text elsewhere.

    Returns (reason, stop_reason) or None. EOS and stop_token_ids only count once min_tokens exist
    (the sampler also bans them before that, this is the backstop). With structured outputs, a
    token the grammar rejected is an error and a complete grammar is a stop (it takes no more).
    """
    params = request.sampling_params
    last = request.output_token_ids[-1]
    if request.structured is not None and request.structured.rejected:
        return FinishReason.ERROR, None
    if request.structured is not None and request.structured.is_terminated:
        return FinishReason.STOP, None
    if request.num_output_tokens >= params.min_tokens:
        if not params.ignore_eos and last in request.eos_token_ids:
            return FinishReason.STOP, None
        if last in params.stop_token_ids:
            return FinishReason.STOP, last
    if request.num_output_tokens >= request.max_tokens or request.num_tokens >= max_model_len:
        return FinishReason.LENGTH, None
    return None
