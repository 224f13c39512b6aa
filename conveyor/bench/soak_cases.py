"""What a soak run sends: valid generation requests, invalid ones and bodies that are not JSON.

Owns the request catalogue. Valid requests are small (prompts of at most ~100 words, at most
48 new tokens, ``n`` at most 2) so that they fit a small context and finish quickly. An invalid
case with ``must_reject`` must get a 4xx; the others (a lone surrogate, an unknown chat role,
a huge priority...) may be served or refused, but never with a 5xx.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

_WORDS = ("the a river stone light quick blue engine token cache seven north paper window "
          "bright garden silver music orange winter calm signal forest number").split()


@dataclass(frozen=True, slots=True)
class BodyCase:
    """One request: a JSON-able body (the served model name is added) or raw bytes (sent as is)."""

    name: str
    path: str
    body: dict[str, Any] | bytes
    must_reject: bool = True
    headers: dict[str, str] = field(default_factory=dict)

    def with_model(self, model: str) -> BodyCase:
        if isinstance(self.body, bytes) or "model" in self.body:
            return self
        return BodyCase(self.name, self.path, {"model": model, **self.body}, self.must_reject,
                        self.headers)


def prompt_text(rng: random.Random, low: int = 4, high: int = 100) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(low, high)))


def valid_request(rng: random.Random, model: str) -> tuple[str, dict[str, Any]]:
    """(path, body) of a small valid completion or chat completion, streamed or not."""
    body: dict[str, Any] = {"model": model, "max_tokens": rng.randint(1, 48),
                            "temperature": rng.choice((0.0, 0.7, 1.0)),
                            "stream": rng.random() < 0.5}
    if rng.random() < 0.3:
        body["n"] = 2
    if rng.random() < 0.3:
        body["seed"] = rng.randint(0, 2**31)
    if rng.random() < 0.2:
        body["stop"] = [rng.choice(_WORDS)]
    if body["stream"] and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.5:
        body["messages"] = [{"role": "user", "content": prompt_text(rng)}]
        if rng.random() < 0.3:
            body.update(logprobs=True, top_logprobs=rng.randint(0, 5))
        return "/v1/chat/completions", body
    body["prompt"] = prompt_text(rng)
    if rng.random() < 0.3:
        body["logprobs"] = rng.randint(0, 5)
    return "/v1/completions", body


_C, _CHAT = "/v1/completions", "/v1/chat/completions"
_HI = {"prompt": "hi", "max_tokens": 2}
_USER = [{"role": "user", "content": "hi"}]

INVALID: tuple[BodyCase, ...] = (
    BodyCase("unknown field", _C, {**_HI, "no_such_field": 1}),
    BodyCase("wrong type", _C, {**_HI, "max_tokens": "16"}),
    BodyCase("missing prompt", _C, {"max_tokens": 2}),
    BodyCase("negative max_tokens", _C, {**_HI, "max_tokens": -5}),
    BodyCase("negative temperature", _C, {**_HI, "temperature": -1.0}),
    BodyCase("top_p above 1", _C, {**_HI, "top_p": 2.0}),
    BodyCase("huge n", _C, {**_HI, "n": 10**6}),
    BodyCase("seed past uint64", _C, {**_HI, "seed": 2**64}),
    BodyCase("too many logprobs", _C, {**_HI, "logprobs": 1000}),
    BodyCase("too many stop strings", _C, {**_HI, "stop": ["x"] * 1000}),
    BodyCase("too many stop_token_ids", _C, {**_HI, "stop_token_ids": list(range(20000))}),
    BodyCase("token id past the vocabulary", _C, {"prompt": [10**9], "max_tokens": 2}),
    BodyCase("negative token id", _C, {"prompt": [-1], "max_tokens": 2}),
    BodyCase("unknown model", _C, {**_HI, "model": "no-such-model"}),
    BodyCase("infinite temperature", _C,
             b'{"prompt": "hi", "max_tokens": 2, "temperature": 1e999}'),
    BodyCase("top_logprobs without logprobs", _CHAT, {"messages": _USER, "top_logprobs": 2}),
    BodyCase("messages not a list", _CHAT, {"messages": "hi"}),
    BodyCase("tokenize prompt and messages", "/tokenize", {"prompt": "hi", "messages": _USER}),
    BodyCase("detokenize past the vocabulary", "/detokenize", {"tokens": [10**9]}),
    BodyCase("lone surrogate prompt", _C, b'{"prompt": "a\\ud800b", "max_tokens": 2}', False),
    BodyCase("lone surrogate chat", _CHAT,
             b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}', False),
    BodyCase("lone surrogate tokenize", "/tokenize", b'{"prompt": "\\ud83d"}', False),
    BodyCase("empty messages", _CHAT, {"messages": [], "max_tokens": 2}, False),
    BodyCase("unknown role", _CHAT, {"messages": [{"role": "wizard", "content": "x"}],
                                     "max_tokens": 2}, False),
    BodyCase("content not text", _CHAT, {"messages": [{"role": "user", "content": 5}],
                                         "max_tokens": 2}, False),
    BodyCase("huge priority", _C, {**_HI, "priority": 10**30}, False),
    BodyCase("X-Priority not a number", _C, dict(_HI), False, {"X-Priority": "high"}),
    BodyCase("long X-Tenant", _C, dict(_HI), False, {"X-Tenant": "t" * 4096}),
)

BAD_JSON: tuple[BodyCase, ...] = (
    BodyCase("truncated", _C, b'{"prompt": "hi", "max_tokens": '),
    BodyCase("NaN literal", _C, b'{"prompt": "hi", "temperature": NaN}'),
    BodyCase("trailing garbage", _C, b'{"prompt": "hi"} }'),
    BodyCase("array body", _C, b'[1, 2, 3]'),
    BodyCase("string body", _CHAT, b'"hello"'),
    BodyCase("not UTF-8", _C, b'{"prompt": "\xff\xfe"}'),
    BodyCase("deep nesting", _C, b'{"prompt": ' + b"[" * 50000 + b"]" * 50000 + b"}"),
    BodyCase("empty body", _CHAT, b""),
    BodyCase("duplicate keys", _C, b'{"prompt": "hi", "prompt": "ho", "max_tokens": 2}', False),
)
