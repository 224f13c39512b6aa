"""The interface every constrained-decoding backend implements (llguidance first).

A ``Backend`` compiles a ``StructuredOutputsParams`` into a ``Grammar`` (expensive, done once per
spec on the compile service's threads, cached by ``spec.key()``); a ``Grammar`` hands out one
``Matcher`` per request (cheap, on the engine thread). A matcher tracks one request's output
tokens. Contracts:

- ``compile`` raises ``GrammarCompileError`` for a spec that cannot compile (bad schema, regex
  or grammar); any other exception is a backend fault. The error names no request field: the
  same spec may come from different fields (``response_format`` or ``structured_outputs``) and
  its failure is cached, so ``for_spec`` names the field of the request at hand.
- A matcher starts with no token consumed. ``fill_bitmask(bitmask, row)`` writes the allowed
  next tokens into ``bitmask[row]`` (int32 words, bit ``t % 32`` of word ``t // 32`` set when
  token ``t`` is allowed; EOS is set only where the grammar may end). ``accept(token)`` advances
  by one token and returns False when the token is not allowed (the matcher is then unusable).
  ``is_terminated()`` is True once the grammar can take nothing but EOS. ``rollback(n)`` undoes
  the last ``n`` accepted tokens, ``reset()`` all of them.
- Matchers are not thread-safe; the engine thread alone uses them.

xgrammar or outlines-core can sit behind the same three types; ``llguidance_backend`` is the
first implementation.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from conveyor.errors import InvalidRequestError
from conveyor.structured.params import StructuredOutputsParams


class GrammarCompileError(InvalidRequestError):
    """A spec that does not compile; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(f"does not compile: {reason}")
        self.reason = reason

    def for_spec(self, spec: StructuredOutputsParams) -> InvalidRequestError:
        """The 400 for a request whose ``spec`` failed, naming that request's field."""
        return InvalidRequestError(f"{spec.param} does not compile: {self.reason}", spec.param)


class Matcher(Protocol):
    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None: ...

    def accept(self, token: int) -> bool: ...

    def is_terminated(self) -> bool: ...

    def rollback(self, num_tokens: int) -> None: ...

    def reset(self) -> None: ...


class Grammar(Protocol):
    def matcher(self) -> Matcher: ...


class Backend(Protocol):
    name: str

    def compile(self, spec: StructuredOutputsParams) -> Grammar: ...


def bitmask_words(vocab_size: int) -> int:
    """int32 words per bitmask row for a vocabulary of ``vocab_size`` ids."""
    return (vocab_size + 31) // 32


def allocate_bitmask(num_rows: int, vocab_size: int) -> np.ndarray:
    """``[num_rows, words]`` int32, every token allowed."""
    return np.full((num_rows, bitmask_words(vocab_size)), -1, dtype=np.int32)
