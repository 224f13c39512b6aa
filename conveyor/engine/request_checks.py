"""The engine's entry checks: everything about one request that needs the model or the engine.

``SamplingParams`` checks its own fields when it is built; what is left needs the model
(token ids within the vocabulary, lengths within the context) or is an argument of
``LLMEngine.add_request`` itself (request id, priority, tenant, cache salt, arrival time). Each
failure is an ``InvalidRequestError`` naming the field, raised before anything reaches the core,
so a request that passes cannot fail later because of a value it carried: nothing here is
checked again downstream, and the HTTP layer only maps these errors to 400.
"""

from __future__ import annotations

import math
from typing import Any

from conveyor.errors import ContextLengthError, InvalidRequestError, check_text
from conveyor.sampling_params import SamplingParams

# Within what every queue and metric handles as a plain integer.
PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1
MAX_TENANT_CHARS = 256
MAX_CACHE_SALT_CHARS = 1024
MAX_REQUEST_ID_CHARS = 256


def prompt_to_ids(prompt: Any, tokenizer: Any, vocab_size: int) -> tuple[str | None, list[int]]:
    """(prompt text or None, prompt token ids) for a non-empty string or list of token ids,
    every id in ``[0, vocab_size)``."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt must not be empty", "prompt")
        return prompt, tokenizer.encode(prompt)          # refuses invalid Unicode
    if not isinstance(prompt, (list, tuple)) or not all(_is_int(t) for t in prompt):
        raise InvalidRequestError("prompt must be a string or a list of token ids", "prompt")
    if not prompt:
        raise InvalidRequestError("prompt must not be empty", "prompt")
    check_token_ids(prompt, vocab_size, "prompt")
    return None, list(prompt)


def check_token_ids(ids, vocab_size: int, param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(
            f"{param}: token id {bad} is outside the vocabulary [0, {vocab_size})", param)


def resolve_max_tokens(num_prompt: int, params: SamplingParams, max_model_len: int) -> int:
    """The request's max_tokens with None resolved to what the context leaves; min_tokens must
    fit in it too."""
    if num_prompt >= max_model_len:
        raise ContextLengthError(
            f"the prompt has {num_prompt} tokens but the context length is {max_model_len};"
            " shorten the prompt", "prompt")
    room = max_model_len - num_prompt
    if params.max_tokens is not None and params.max_tokens > room:
        raise InvalidRequestError(
            f"prompt ({num_prompt} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
            f"length {max_model_len}; lower max_tokens to at most {room}", "max_tokens")
    max_tokens = room if params.max_tokens is None else params.max_tokens
    if params.min_tokens > max_tokens:
        raise InvalidRequestError(
            f"min_tokens ({params.min_tokens}) must not exceed the {max_tokens} tokens this "
            "request can generate; lower min_tokens", "min_tokens")
    return max_tokens


def check_request_args(params: Any, vocab_size: int, request_id: Any, priority: Any,
                       tenant: Any, cache_salt: Any, arrival_time: Any) -> None:
    """The ``add_request`` arguments besides the prompt (see the module docstring)."""
    if not isinstance(params, SamplingParams):
        raise InvalidRequestError(
            f"params must be a SamplingParams, got {type(params).__name__}", "params")
    check_token_ids(params.stop_token_ids, vocab_size, "stop_token_ids")
    if request_id is not None:
        _check_str("request_id", request_id, MAX_REQUEST_ID_CHARS)
    if not _is_int(priority) or not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise InvalidRequestError(
            f"priority must be an integer in [{PRIORITY_MIN}, {PRIORITY_MAX}], got "
            f"{str(priority)[:40]}", "priority")
    _check_str("tenant", tenant, MAX_TENANT_CHARS)
    _check_str("cache_salt", cache_salt, MAX_CACHE_SALT_CHARS)
    if arrival_time is not None and (isinstance(arrival_time, bool) or not isinstance(
            arrival_time, (int, float)) or not math.isfinite(arrival_time)):
        raise InvalidRequestError(
            f"arrival_time must be a finite number of seconds, got {arrival_time!r}",
            "arrival_time")


def _check_str(param: str, value: Any, max_chars: int) -> None:
    if not isinstance(value, str):
        raise InvalidRequestError(f"{param} must be a string, got {type(value).__name__}", param)
    if len(value) > max_chars:
        raise InvalidRequestError(f"{param} must be at most {max_chars} characters", param)
    check_text(value, param)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
