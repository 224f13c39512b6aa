"""OpenAI request bodies as strict pydantic models, and their translation to ``SamplingParams``.

Owns what a request may contain. Invariants:

- Unknown fields are rejected (``extra="forbid"``) with a 400 naming the field; only ``user`` and
  ``stream_options`` are accepted without affecting generation beyond usage reporting.
- Types are strict (no "5" for 5, no 1.5 for an integer); ranges are checked by ``SamplingParams``
  (which names the field) plus the server's own caps in ``RequestLimits``.
- Nothing from a request is unpickled, evaluated or used as a path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from conveyor.errors import InvalidRequestError
from conveyor.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Caps the server enforces on top of ``SamplingParams``' own validation."""

    max_n: int = 8
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    max_logprobs: int = 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields shared by completions and chat completions (OpenAI names plus vLLM extras)."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    priority: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def to_sampling_params(self, max_tokens: int | None, logprobs: int | None,
                           limits: RequestLimits) -> SamplingParams:
        """Check the server's caps, then build ``SamplingParams`` (which checks ranges)."""
        if self.n is not None and self.n > limits.max_n:
            raise InvalidRequestError(f"n must be at most {limits.max_n}, got {self.n}", "n")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > limits.max_stop_strings:
            raise InvalidRequestError(
                f"at most {limits.max_stop_strings} stop strings are allowed, got {len(stops)}", "stop")
        if any(len(s) > limits.max_stop_chars for s in stops):
            raise InvalidRequestError(
                f"stop strings must be at most {limits.max_stop_chars} characters long", "stop")
        if logprobs is not None and logprobs > limits.max_logprobs:
            raise InvalidRequestError(
                f"logprobs must be at most {limits.max_logprobs}, got {logprobs}", "logprobs")
        names = ("n", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty",
                 "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos",
                 "stop_token_ids", "include_stop_str_in_output", "skip_special_tokens")
        given = {k: getattr(self, k) for k in names if getattr(self, k) is not None}
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, stop=stops or None, **given)


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``: prompt is a string, a list of token ids, or a list of one string."""

    prompt: str | list[int] | list[str]
    max_tokens: int | None = 16
    logprobs: int | None = None

    def single_prompt(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise InvalidRequestError(
                    f"send one prompt per request (got a list of {len(prompt)} strings)", "prompt")
            prompt = prompt[0]
        if not prompt:
            raise InvalidRequestError("prompt must not be empty", "prompt")
        return prompt

    def sampling_params(self, limits: RequestLimits) -> SamplingParams:
        return self.to_sampling_params(self.max_tokens, self.logprobs, limits)


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``; messages are checked by the chat-template renderer."""

    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def sampling_params(self, limits: RequestLimits) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true", "top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens
        return self.to_sampling_params(max_tokens, logprobs, limits)


class TokenizeRequest(_Strict):
    """``POST /tokenize`` (vLLM): a prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    """``POST /detokenize`` (vLLM)."""

    model: str | None = None
    tokens: list[int]


def parse_body(model: type[BaseModel], body: Any) -> Any:
    """Validate a decoded JSON body; errors become ``InvalidRequestError`` naming the field."""
    if not isinstance(body, dict):
        raise InvalidRequestError(
            f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _to_invalid_request(exc) from None


def _to_invalid_request(exc: ValidationError) -> InvalidRequestError:
    err = exc.errors(include_url=False)[0]
    loc = [str(p) for p in err["loc"]]
    field = loc[0] if loc else None
    if err["type"] == "extra_forbidden":
        path = ".".join(loc)
        return InvalidRequestError(
            f"unsupported field {path!r}: conveyor does not implement it; remove it", field)
    if err["type"] == "missing":
        return InvalidRequestError(f"field {'.'.join(loc)!r} is required", field)
    return InvalidRequestError(f"invalid value for {field!r}: {err['msg']}", field)
