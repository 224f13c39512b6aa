"""Per-request sampling and stopping parameters (pure Python, validated at construction).

``SamplingParams`` mirrors vLLM's fields and defaults so that code written for vLLM's
``SamplingParams`` works unchanged. Construction validates every field and raises
``InvalidRequestError`` naming the field and its accepted range; an instance is never mutated
afterwards (stop strings are normalised to a tuple).
"""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.errors import InvalidRequestError

_GREEDY_EPS = 1e-5


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature: 0 means greedy; top_k: 0 or -1 disables; top_p in (0, 1]; min_p in [0, 1].
    repetition_penalty (> 0, 1 = off) scales logits of tokens seen in the prompt or output;
    presence/frequency penalties in [-2, 2] subtract per output-token occurrence.
    seed: the same seed gives the same tokens whatever else runs in the batch.
    max_tokens: None means "until the context is full". min_tokens: EOS and stop_token_ids are
    suppressed until this many tokens exist. stop: strings matched on the decoded text (across token
    boundaries) and trimmed from the output unless include_stop_str_in_output.
    logprobs: None, or how many top log-probabilities to return beside the sampled token's.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: tuple[str, ...] | list[str] | str | None = None
    stop_token_ids: tuple[int, ...] | list[int] | None = None
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _normalise_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", _normalise_stop_ids(self.stop_token_ids))
        _check_number("n", self.n, int, lo=1, lo_open=False)
        _check_number("temperature", self.temperature, (int, float), lo=0.0, lo_open=False)
        _check_number("top_p", self.top_p, (int, float), lo=0.0, lo_open=True, hi=1.0)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise InvalidRequestError(
                f"top_k must be -1 or 0 (disabled) or a positive integer, got {self.top_k!r}", "top_k")
        _check_number("min_p", self.min_p, (int, float), lo=0.0, lo_open=False, hi=1.0)
        _check_number("repetition_penalty", self.repetition_penalty, (int, float), lo=0.0, lo_open=True)
        for name in ("presence_penalty", "frequency_penalty"):
            _check_number(name, getattr(self, name), (int, float), lo=-2.0, lo_open=False, hi=2.0)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise InvalidRequestError(f"seed must be an integer, got {self.seed!r}", "seed")
        if self.max_tokens is not None:
            _check_number("max_tokens", self.max_tokens, int, lo=1, lo_open=False)
        _check_number("min_tokens", self.min_tokens, int, lo=0, lo_open=False)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})", "min_tokens")
        if self.logprobs is not None:
            _check_number("logprobs", self.logprobs, int, lo=0, lo_open=False, hi=20)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS


def _check_number(name, value, types, lo=None, lo_open=False, hi=None) -> None:
    if isinstance(value, bool) or not isinstance(value, types):
        kind = "an integer" if types is int else "a number"
        raise InvalidRequestError(f"{name} must be {kind}, got {value!r}", name)
    if lo is not None and (value <= lo if lo_open else value < lo):
        bound = f"> {lo}" if lo_open else f">= {lo}"
        raise InvalidRequestError(f"{name} must be {bound}, got {value!r}", name)
    if hi is not None and value > hi:
        raise InvalidRequestError(f"{name} must be <= {hi}, got {value!r}", name)


def _normalise_stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequestError(
            f"stop must be a string or a list of strings, got {stop!r}", "stop")
    if any(s == "" for s in stop):
        raise InvalidRequestError("stop strings must not be empty", "stop")
    return tuple(stop)


def _normalise_stop_ids(ids) -> tuple[int, ...]:
    if ids is None:
        return ()
    if not isinstance(ids, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise InvalidRequestError(
            f"stop_token_ids must be a list of non-negative integers, got {ids!r}", "stop_token_ids")
    return tuple(ids)
