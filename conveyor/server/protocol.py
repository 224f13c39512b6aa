"""OpenAI request bodies as strict pydantic models, and their translation to ``SamplingParams``.

Owns what a request may contain. Invariants:

- Unknown fields are rejected (``extra="forbid"``) with a 400 naming the field; the OpenAI fields
  accepted without effect are listed in ``chat_fields`` (plus ``user``; ``stream_options`` only
  reports usage).
- Types are strict (no "5" for 5, no 1.5 for an integer); values and ranges are checked once, at
  the engine's entry (``SamplingParams`` and ``LLMEngine.add_request``, which name the field);
  here only the server's own policy (``RequestLimits``) is added, and errors are translated to
  the names this API uses (chat's ``top_logprobs``, ``max_completion_tokens``).
- Nothing from a request is unpickled, evaluated or used as a path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from conveyor.errors import InvalidRequestError
from conveyor.sampling_params import SamplingParams
from conveyor.server.chat_fields import ChatClientFields, refused_field_message
from conveyor.server.structured_protocol import (ResponseFormat, StructuredOutputsBody,
                                                  logit_bias_ids, removed_field_error,
                                                  structured_params)


MAX_CACHE_SALT_CHARS = 256


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """The operator's caps on top of the engine's own validation (``--max-n``)."""

    max_n: int = 8


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
    # vLLM's per-request prefix-cache salt: only requests of the same tenant with the same salt
    # share cached blocks (server.auth / core.kv_cache_manager).
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT_CHARS)
    # Structured outputs (server.structured_protocol): OpenAI's and vLLM's spelling.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None
    logit_bias: dict[str, float] | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def to_sampling_params(self, max_tokens: int | None, logprobs: int | None,
                           limits: RequestLimits) -> SamplingParams:
        """Check the server's caps, then build ``SamplingParams`` (which checks every value)."""
        if self.n is not None and self.n > limits.max_n:
            raise InvalidRequestError(f"n must be at most {limits.max_n}, got {self.n}", "n")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        names = ("n", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty",
                 "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos",
                 "stop_token_ids", "include_stop_str_in_output", "skip_special_tokens")
        given = {k: getattr(self, k) for k in names if getattr(self, k) is not None}
        return SamplingParams(
            max_tokens=max_tokens, logprobs=logprobs, stop=stops or None,
            logit_bias=logit_bias_ids(self.logit_bias),
            structured_outputs=structured_params(self.response_format, self.structured_outputs),
            **given)


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


class ChatCompletionRequest(_SamplingFields, ChatClientFields):
    """``POST /v1/chat/completions``; messages are checked by the chat-template renderer, tool
    and client fields by ``chat_fields``."""

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
        try:
            return self.to_sampling_params(max_tokens, logprobs, limits)
        except InvalidRequestError as exc:
            raise self._in_chat_names(exc) from None

    def _in_chat_names(self, exc: InvalidRequestError) -> InvalidRequestError:
        """The error named after the field this body used (``top_logprobs`` is the count)."""
        renamed = {"logprobs": "top_logprobs"}
        if self.max_completion_tokens is not None:
            renamed["max_tokens"] = "max_completion_tokens"
        name = renamed.get(exc.param)
        if name is None:
            return exc
        return InvalidRequestError(str(exc).replace(exc.param, name, 1), name)


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
    refused = refused_field_message(field)
    if refused is not None:
        return InvalidRequestError(refused, field)
    if err["type"] == "extra_forbidden":
        path = ".".join(loc)
        removed = removed_field_error(path)
        if removed is not None:
            return removed
        return InvalidRequestError(
            f"unsupported field {path!r}: conveyor does not implement it; remove it", field)
    if err["type"] == "missing":
        return InvalidRequestError(f"field {'.'.join(loc)!r} is required", field)
    if field is None:       # the body itself, e.g. a key that is not valid Unicode
        return InvalidRequestError(f"the request body is invalid: {err['msg']}")
    return InvalidRequestError(f"invalid value for {field!r}: {err['msg']}", field)
