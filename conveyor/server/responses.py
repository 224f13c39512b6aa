"""OpenAI response bodies and stream chunks built from ``RequestOutput`` objects.

Pure functions of their inputs (no I/O): the routes fetch token texts for logprobs beforehand and
pass them in as ``texts`` (token id -> text). Shapes follow OpenAI's API: ``text_completion`` and
``chat.completion`` objects, their ``.chunk`` stream variants, and ``usage`` with
``prompt_tokens_details.cached_tokens``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from conveyor.engine.outputs import CompletionOutput, Logprob, RequestOutput

_MIN_LOGPROB = -9999.0   # JSON has no -Infinity; clients get a very unlikely value instead


@dataclass(frozen=True, slots=True)
class ResponseMeta:
    """What every body and chunk of one response repeats."""

    id: str
    created: int
    model: str
    chat: bool

    def envelope(self, chunk: bool) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        if chunk and self.chat:
            kind += ".chunk"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False,
                                                               separators=(",", ":"))
    return f"data: {data}\n\n"


def usage(out: RequestOutput) -> dict:
    prompt = len(out.prompt_token_ids)
    completion = sum(len(c.token_ids) for c in out.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens}}


def logprob_token_ids(logprobs: list[Logprob] | None) -> set[int]:
    ids: set[int] = set()
    for lp in logprobs or ():
        ids.add(lp.token_id)
        ids.update(t for t, _ in lp.top)
    return ids


def _finite(value: float) -> float:
    return value if math.isfinite(value) else _MIN_LOGPROB


def completion_logprobs(logprobs: list[Logprob], texts: dict[int, str], offset: int) -> dict:
    """Legacy completions shape; ``offset`` is the text length before the first token."""
    tokens, offsets = [], []
    for lp in logprobs:
        offsets.append(offset)
        tokens.append(texts[lp.token_id])
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [_finite(lp.logprob) for lp in logprobs],
            "top_logprobs": [{texts[t]: _finite(v) for t, v in lp.top} for lp in logprobs],
            "text_offset": offsets}


def _chat_entry(token_id: int, value: float, texts: dict[int, str]) -> dict:
    text = texts[token_id]
    return {"token": text, "logprob": _finite(value), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(logprobs: list[Logprob], texts: dict[int, str]) -> dict:
    content = []
    for lp in logprobs:
        entry = _chat_entry(lp.token_id, lp.logprob, texts)
        entry["top_logprobs"] = [_chat_entry(t, v, texts) for t, v in lp.top]
        content.append(entry)
    return {"content": content}


def _choice_logprobs(meta: ResponseMeta, logprobs: list[Logprob] | None, texts: dict[int, str],
                     offset: int) -> dict | None:
    if logprobs is None:
        return None
    return chat_logprobs(logprobs, texts) if meta.chat else \
        completion_logprobs(logprobs, texts, offset)


def full_response(meta: ResponseMeta, out: RequestOutput, texts: dict[int, str]) -> dict:
    """The non-streaming body for a finished request."""
    choices = []
    for c in out.outputs:
        choice = {"index": c.index, "logprobs": _choice_logprobs(meta, c.logprobs, texts, 0),
                  "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
        if meta.chat:
            choice["message"] = {"role": "assistant", "content": c.text}
        else:
            choice["text"] = c.text
        choices.append(choice)
    return {**meta.envelope(chunk=False), "choices": choices, "usage": usage(out)}


def role_chunk(meta: ResponseMeta, index: int, with_usage: bool) -> dict:
    """The first chat chunk of a choice: the assistant role, no content yet."""
    return _chunk(meta, {"index": index, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None}, with_usage)


def delta_chunk(meta: ResponseMeta, c: CompletionOutput, texts: dict[int, str],
                with_usage: bool) -> dict | None:
    """A chunk for what choice ``c`` produced since the last one, or None when there is nothing
    to say (tokens whose text is held back, and no logprobs asked for)."""
    has_logprobs = c.logprobs is not None and bool(c.delta_logprobs)
    if not c.delta_text and c.finish_reason is None and not has_logprobs:
        return None
    offset = len(c.text) - len(c.delta_text)
    logprobs = _choice_logprobs(meta, c.delta_logprobs if has_logprobs else None, texts, offset)
    choice = {"index": c.index, "logprobs": logprobs, "finish_reason": c.finish_reason,
              "stop_reason": c.stop_reason}
    if meta.chat:
        choice["delta"] = {"content": c.delta_text} if c.delta_text else {}
    else:
        choice["text"] = c.delta_text
    return _chunk(meta, choice, with_usage)


def usage_chunk(meta: ResponseMeta, out: RequestOutput) -> dict:
    """The last chunk with ``stream_options.include_usage``: no choices, the request's usage."""
    return {**meta.envelope(chunk=True), "choices": [], "usage": usage(out)}


def _chunk(meta: ResponseMeta, choice: dict, with_usage: bool) -> dict:
    body = {**meta.envelope(chunk=True), "choices": [choice]}
    if with_usage:
        body["usage"] = None
    return body
