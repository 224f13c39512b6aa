"""Per-request sampling and stopping parameters (pure Python, validated at construction).

``SamplingParams`` mirrors vLLM's fields and defaults so that code written for vLLM's
``SamplingParams`` works unchanged. Construction validates every field and raises
``InvalidRequestError`` naming the field and its accepted range; an instance is never mutated
afterwards (stop strings and stop token ids are normalised to tuples).

Invariants a valid instance guarantees to everything downstream (sampler, generators, stop checks):
every float is finite and within a range whose float32 arithmetic stays finite (so a row's
logits never turn into inf/NaN through its own parameters); ``seed + i`` for every child
``i < n`` is a seed ``torch.Generator.manual_seed`` accepts; lists are bounded in count and length;
stop strings are valid Unicode. Checks that need the model (token ids within the vocabulary,
``min_tokens`` within the context) are the engine's, at ``LLMEngine.add_request``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from conveyor.errors import InvalidRequestError, check_text
from conveyor.structured.params import StructuredOutputsParams

_GREEDY_EPS = 1e-5

# torch.Generator.manual_seed takes any value representable as int64 or uint64.
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1
MAX_TEMPERATURE = 100.0
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS_ENTRIES = 300


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature in [0, 100]: 0 means greedy; top_k: 0 or -1 disables; top_p in (0, 1];
    min_p in [0, 1]. repetition_penalty in [0.01, 100] (1 = off) scales logits of tokens seen in
    the prompt or output; presence/frequency penalties in [-2, 2] subtract per output-token
    occurrence. seed: the same seed gives the same tokens whatever else runs in the batch (with
    n > 1, child i uses seed + i). max_tokens: None means "until the context is full".
    min_tokens: EOS and stop_token_ids are suppressed until this many tokens exist. stop: up to
    16 strings of at most 256 characters, matched on the decoded text (across token boundaries)
    and trimmed from the output unless include_stop_str_in_output. stop_token_ids: up to 64.
    logprobs: None, or how many (at most 20) top log-probabilities to return beside the sampled
    token's. logit_bias: token id -> bias in [-100, 100] added to that token's logit (at most
    300 ids). structured_outputs: a constraint (JSON schema, regex, choice, grammar) every
    output obeys.
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
    logit_bias: dict[int, float] | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _normalise_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", _normalise_stop_ids(self.stop_token_ids))
        _check_int("n", self.n, lo=1)
        _check_float("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        _check_float("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        if not _is_int(self.top_k) or self.top_k < -1 or self.top_k > 2**31 - 1:
            raise InvalidRequestError(
                f"top_k must be -1 or 0 (disabled) or a positive integer below 2**31, got "
                f"{self.top_k!r}", "top_k")
        _check_float("min_p", self.min_p, 0.0, 1.0)
        _check_float("repetition_penalty", self.repetition_penalty, MIN_REPETITION_PENALTY,
                     MAX_REPETITION_PENALTY)
        for name in ("presence_penalty", "frequency_penalty"):
            _check_float(name, getattr(self, name), -2.0, 2.0)
        self._check_seed()
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, lo=1)
        _check_int("min_tokens", self.min_tokens, lo=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})", "min_tokens")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, lo=0)
            if self.logprobs > MAX_LOGPROBS:
                raise InvalidRequestError(
                    f"logprobs must be at most {MAX_LOGPROBS}, got {self.logprobs}", "logprobs")
        object.__setattr__(self, "logit_bias", _normalise_logit_bias(self.logit_bias))
        if self.structured_outputs is not None and not isinstance(
                self.structured_outputs, StructuredOutputsParams):
            raise InvalidRequestError("structured_outputs must be a StructuredOutputsParams",
                                      "structured_outputs")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(
                    f"{name} must be true or false, got {getattr(self, name)!r}", name)

    def _check_seed(self) -> None:
        if self.seed is None:
            return
        if not _is_int(self.seed):
            raise InvalidRequestError(f"seed must be an integer, got {self.seed!r}", "seed")
        last = self.seed + self.n - 1       # child i of an n > 1 request uses seed + i
        if self.seed < SEED_MIN or last > SEED_MAX:
            raise InvalidRequestError(
                f"seed must be in [{SEED_MIN}, {SEED_MAX - self.n + 1}] with n={self.n} (child i "
                f"uses seed + i, at most {SEED_MAX}), got {self.seed}", "seed")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_int(name: str, value, lo: int) -> None:
    if not _is_int(value):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}", name)
    if value < lo:
        raise InvalidRequestError(f"{name} must be >= {lo}, got {value!r}", name)


def _check_float(name: str, value, lo: float, hi: float, lo_open: bool = False) -> None:
    """A finite number in [lo, hi] (or (lo, hi]); ints are accepted, NaN and +-inf never."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"{name} must be a number, got {value!r}", name)
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be a finite number, got {value!r}", name)
    if value <= lo if lo_open else value < lo:
        bound = f"> {lo}" if lo_open else f">= {lo}"
        raise InvalidRequestError(f"{name} must be {bound}, got {value!r}", name)
    if value > hi:
        raise InvalidRequestError(f"{name} must be <= {hi}, got {value!r}", name)


def _normalise_stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequestError(
            f"stop must be a string or a list of strings, got {_short(stop)}", "stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError(
            f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stop)}", "stop")
    for s in stop:
        if not s:
            raise InvalidRequestError("stop strings must not be empty", "stop")
        if len(s) > MAX_STOP_CHARS:
            raise InvalidRequestError(
                f"stop strings must be at most {MAX_STOP_CHARS} characters long", "stop")
        check_text(s, "stop")
    return tuple(stop)


def _normalise_stop_ids(ids) -> tuple[int, ...]:
    if ids is None:
        return ()
    if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
        raise InvalidRequestError(
            f"stop_token_ids must be a list of non-negative integers, got {_short(ids)}",
            "stop_token_ids")
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequestError(
            f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed, got {len(ids)}",
            "stop_token_ids")
    return tuple(ids)


def _normalise_logit_bias(bias) -> dict[int, float] | None:
    """A private copy with token ids >= 0 and biases in [-100, 100] (OpenAI's rules); ids
    within the vocabulary are the engine's check."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise InvalidRequestError(
            f"logit_bias must map token ids to numbers, got {_short(bias)}", "logit_bias")
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidRequestError(f"logit_bias may list at most {MAX_LOGIT_BIAS_ENTRIES} token "
                                  f"ids, got {len(bias)}", "logit_bias")
    for token, value in bias.items():
        if not _is_int(token) or token < 0:
            raise InvalidRequestError(
                f"logit_bias keys must be token ids (integers >= 0), got {_short(token)}",
                "logit_bias")
        _check_float("logit_bias", value, -100.0, 100.0)
    return {token: float(value) for token, value in bias.items()} or None
