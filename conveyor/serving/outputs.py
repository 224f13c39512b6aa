"""What the engine hands back to callers, shaped like vLLM's ``RequestOutput``.

``CompletionOutput`` carries the cumulative text/tokens and this step's delta, so the same type
serves the offline API (read the final one) and streaming (send the deltas). Each step hands out
new objects; an output a caller holds does not change afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestMetrics:
    """Per-request timings in ``time.monotonic()`` seconds (0.0 = not reached)."""

    arrival_time: float
    first_scheduled_time: float = 0.0
    first_token_time: float = 0.0
    finished_time: float = 0.0
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        return self.first_token_time - self.arrival_time if self.first_token_time else None

    @property
    def e2e_latency(self) -> float | None:
        return self.finished_time - self.arrival_time if self.finished_time else None

    @property
    def queue_time(self) -> float | None:
        return self.first_scheduled_time - self.arrival_time if self.first_scheduled_time else None


@dataclass(slots=True)
class Logprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None          # "stop" | "length" | "abort" | "error" | None
    stop_reason: int | str | None = None      # the stop string or stop token id that ended it
    logprobs: list[Logprob] | None = None
    cumulative_logprob: float | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[Logprob] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    error: str | None = None
