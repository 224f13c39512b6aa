"""Incremental (streaming) detokenization with stop-string matching.

Owns: turning a growing list of output token ids into text deltas that are safe to send to a client.
Invariants:

- Emitted text is never retracted: the concatenation of every delta returned so far is always a
  prefix of the final output (``output_text`` is exactly that concatenation).
- No delta ends in a broken character: while the decoded window ends in U+FFFD (a multi-byte
  character split across byte tokens) its text is held back until the character completes or the
  request finishes.
- Per-token cost is O(window), not O(output length): only the tokens since the last-but-one emission
  (plus up to ``_PROMPT_CONTEXT_TOKENS`` prompt tokens at the start) are decoded each step, and the
  text is the difference between decoding the window with and without the newest tokens
  ("prefix offset / read offset").
- For byte-level BPE tokenizers the deltas plus ``flush()`` equal
  ``tokenizer.decode(output_ids, skip_special_tokens=...)`` exactly.
- Stop strings are matched on text across token boundaries. While stop strings exist the last
  ``max(len(stop)) - 1`` characters are held back, so a match can always be trimmed without
  retracting text; after a match further tokens are ignored.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, InitVar, dataclass, field
from typing import Sequence

from conveyor.errors import InvalidRequestError
from conveyor.tokenizer.tokenizer import Tokenizer

# Decoding a few prompt tokens in front of the first output token gives tokenizers whose decoders
# depend on the preceding piece (leading-space handling) the same context a full decode would have.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


@dataclass(slots=True, eq=False)
class IncrementalDetokenizer:
    """Streams one request's output text.

    Call ``add_tokens`` with each batch of newly generated ids and send back the returned delta; stop
    the request with reason "stop" once ``stop_matched`` is not None; call ``flush()`` when the request
    finishes for any other reason and send its return value as the final delta.
    """

    tokenizer: Tokenizer
    prompt_token_ids: InitVar[Sequence[int]]
    _: KW_ONLY
    skip_special_tokens: bool = True
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    stop_matched: str | None = field(init=False, default=None)
    _tokens: list[int] = field(init=False, repr=False)
    _prefix_offset: int = field(init=False, repr=False, default=0)
    _read_offset: int = field(init=False, repr=False, default=0)
    _pending: str = field(init=False, repr=False, default="")
    _chunks: list[str] = field(init=False, repr=False, default_factory=list)
    _max_stop_len: int = field(init=False, repr=False, default=0)
    _finished: bool = field(init=False, repr=False, default=False)

    def __post_init__(self, prompt_token_ids: Sequence[int]) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop must be a list of non-empty strings", "stop")
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        # Only the prompt's tail is kept: it is all the decode window ever looks at.
        self._tokens = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:]) if prompt_token_ids else []
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)

    @property
    def output_text(self) -> str:
        """All text emitted so far (the concatenation of every returned delta)."""
        if len(self._chunks) > 1:
            self._chunks[:] = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def finished(self) -> bool:
        """True once a stop string matched or ``flush()`` was called."""
        return self._finished or self.stop_matched is not None

    def add_tokens(self, new_token_ids: Sequence[int]) -> str:
        """Append generated ids and return the text that is now safe to emit (possibly "").

        After a stop string matched this returns "" and ignores the ids. Calling it after ``flush()``
        is a caller bug and raises RuntimeError.
        """
        if self._finished:
            raise RuntimeError("add_tokens called after flush(); the request is already finished")
        if self.stop_matched is not None or not new_token_ids:
            return ""
        self._tokens.extend(new_token_ids)
        text = self._decode_new_text(final=False)
        return self._commit(text, final=False) if text else ""

    def flush(self) -> str:
        """Finish the request: return held-back text (incomplete characters, stop-string hold-back)
        that is not part of a stop string. Idempotent; returns "" after a stop match."""
        if self._finished:
            return ""
        self._finished = True
        if self.stop_matched is not None:
            return ""
        return self._commit(self._decode_new_text(final=True), final=True)

    def _decode_window(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self._tokens[start:end], skip_special_tokens=self.skip_special_tokens)

    def _decode_new_text(self, final: bool) -> str:
        """Text added by the tokens after ``_read_offset``; "" (offsets untouched) while incomplete.

        Both decodes start at ``_prefix_offset`` so context-dependent decoders treat the shared
        prefix identically and the difference is exactly the new tokens' text.
        """
        if self._read_offset >= len(self._tokens):
            return ""
        prefix_text = self._decode_window(self._prefix_offset, self._read_offset)
        full_text = self._decode_window(self._prefix_offset)
        grew = len(full_text) > len(prefix_text)
        # A trailing U+FFFD means the last character's bytes are not all here yet; wait for more tokens
        # unless the request is over, where the replacement character is the honest result.
        if not final and (not grew or full_text.endswith(_REPLACEMENT_CHAR)):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        return full_text[len(prefix_text):]

    def _commit(self, text: str, final: bool) -> str:
        """Add decoded ``text``, check stop strings, and return the part that may be emitted now."""
        searched_from = max(0, len(self._pending) - self._max_stop_len + 1)
        self._pending += text
        match = self._find_stop(searched_from) if self.stop else None
        if match is not None:
            index, stop = match
            self.stop_matched = stop
            end = index + len(stop) if self.include_stop_str_in_output else index
            delta, self._pending = self._pending[:end], ""
        else:
            hold = 0 if final or not self.stop else self._max_stop_len - 1
            cut = max(0, len(self._pending) - hold)
            delta, self._pending = self._pending[:cut], self._pending[cut:]
        if delta:
            self._chunks.append(delta)
        return delta

    def _find_stop(self, start: int) -> tuple[int, str] | None:
        """Earliest stop string in ``_pending`` beginning at or after ``start``.

        Searching only ``_pending`` is enough: text already emitted is at least ``max_stop_len - 1``
        characters before the end of the text at the time, so no unmatched stop string can begin in it.
        """
        best: tuple[int, str] | None = None
        for stop in self.stop:
            index = self._pending.find(stop, start)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        return best
