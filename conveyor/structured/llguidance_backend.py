"""The llguidance backend: specs -> llguidance grammars -> per-request ``LLMatcher`` objects.

Why llguidance first: it compiles JSON schemas, regexes and Lark/GBNF grammars lazily (no
per-schema vocabulary precomputation, so compiling takes milliseconds and a cold cache costs
little), computes a token mask in tens of microseconds on the CPU, ships CPU wheels with no
dependencies, and supports structural tags (tool calls inside free text).

Invariants:
- The ``LLTokenizer`` (built from the engine's HF fast tokenizer, ~0.6 s) is built once, on the
  first compile, on a compile thread; the engine thread never builds or compiles anything.
- ``compile`` checks the grammar by building a prototype matcher; a matcher per request is a
  ``deep_copy`` of it (microseconds, shares the compiled grammar).
- JSON is generated compactly on one line (``", "`` and ``": "`` separators, no free
  whitespace), so a small model cannot loop on newlines; a schema's ``x-guidance`` options
  override this.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

from conveyor.structured.backend import GrammarCompileError
from conveyor.structured.params import StructuredOutputsParams

_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_MAX_ERROR_CHARS = 300


class LLGuidanceMatcher:
    """One request's position in its grammar (see ``backend.Matcher``)."""

    __slots__ = ("_m",)

    def __init__(self, matcher: Any):
        self._m = matcher

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        v = bitmask[row]
        assert v.dtype == np.int32 and v.flags["C_CONTIGUOUS"]
        self._m.unsafe_compute_mask_ptr(v.ctypes.data, v.nbytes)

    def accept(self, token: int) -> bool:
        return self._m.consume_token(token)

    def is_terminated(self) -> bool:
        return self._m.is_stopped()

    def rollback(self, num_tokens: int) -> None:
        self._m.rollback(num_tokens)

    def reset(self) -> None:
        self._m.reset()

    @property
    def error(self) -> str:
        return self._m.get_error()


class LLGuidanceGrammar:
    """A compiled spec; ``matcher()`` copies its prototype matcher."""

    __slots__ = ("_proto",)

    def __init__(self, proto: Any):
        self._proto = proto

    def matcher(self) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(self._proto.deep_copy())


class LLGuidanceBackend:
    """Compiles specs for one tokenizer and vocabulary (``vocab_size`` = the model's logits)."""

    name = "llguidance"

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int]):
        self._hf = hf_tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._tokenizer = None
        self._lock = threading.Lock()

    def _ll_tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf, n_vocab=self.vocab_size, eos_token=self._eos or None)
            return self._tokenizer

    def compile(self, spec: StructuredOutputsParams) -> LLGuidanceGrammar:
        """Raises ``GrammarCompileError`` if the spec does not compile."""
        import llguidance
        grammar = _grammar_text(spec)
        proto = llguidance.LLMatcher(self._ll_tokenizer(), grammar, log_level=0)
        if proto.is_error():
            raise GrammarCompileError(_short(proto.get_error()))
        return LLGuidanceGrammar(proto)


def _grammar_text(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar for ``spec``; GrammarCompileError where its text cannot be read."""
    from llguidance import LLMatcher, StructTag
    from llguidance.gbnf_to_lark import any_to_lark
    try:
        if spec.json is not None or spec.json_object:
            schema = spec.json if spec.json is not None else {"type": "object"}
            return LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        if spec.regex is not None:
            return LLMatcher.grammar_from_regex(spec.regex)
        if spec.choice is not None:
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c)
                                                                      for c in spec.choice))
        if spec.grammar is not None:
            return LLMatcher.grammar_from_lark(any_to_lark(spec.grammar))
        tag = spec.structural_tag
        tags = [StructTag(trigger=next(t for t in tag["triggers"] if s["begin"].startswith(t)),
                          begin=s["begin"], grammar=s["schema"], end=s["end"])
                for s in tag["structures"]]
        return StructTag.to_grammar(tags)
    except (ValueError, AssertionError, KeyError, TypeError) as exc:
        raise GrammarCompileError(_short(str(exc))) from None


def _short(message: str) -> str:
    """The first line of an llguidance error (the rest is a parser state dump)."""
    first = (message.strip().splitlines() or ["unknown error"])[0]
    return first if len(first) <= _MAX_ERROR_CHARS else first[:_MAX_ERROR_CHARS] + "..."
