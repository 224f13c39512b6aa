"""Just enough JSON reading to follow a tool call while its text is still arriving.

Owns two pieces the streaming parser needs: ``ObjectScanner`` (where does the JSON object that
starts at a given ``{`` end, fed a growing text) and ``call_header`` (has a call's
``{"name": "...", "arguments": `` prefix fully arrived). Invariant: both give the same answer
however the text was split into pieces, because they only answer once the deciding characters
are there (the header needs the ``{`` that opens the arguments).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass


@dataclass(slots=True)
class ObjectScanner:
    """Finds the end of the JSON value opened by the ``{`` or ``[`` at ``start`` of a growing
    text; strings (with escapes) are skipped, so braces inside them do not count."""

    start: int
    _pos: int = -1
    _depth: int = 0
    _in_string: bool = False
    _escape: bool = False
    _end: int | None = None

    def end(self, text: str) -> int | None:
        """Index just past the value's closing bracket, or None while it is still open.
        ``text`` must extend the text passed before."""
        if self._end is not None:
            return self._end
        if self._pos < 0:
            self._pos = self.start
        for i in range(self._pos, len(text)):
            c = text[i]
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif c == "\\":
                    self._escape = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._end = i + 1
                    return self._end
        self._pos = len(text)
        return None


def header_pattern(argument_keys: tuple[str, ...]) -> re.Pattern:
    """``{"name": "<name>", "<key>": `` followed by the ``{`` of the arguments object."""
    keys = "|".join(re.escape(k) for k in argument_keys)
    return re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:' + keys +
                      r')"\s*:\s*(?=\{)')


def call_header(pattern: re.Pattern, body: str) -> tuple[str, int] | None:
    """(function name, index where the arguments object starts) once the header has arrived."""
    m = pattern.match(body)
    if m is None:
        return None
    try:
        name = json.loads(f'"{m.group(1)}"')
    except ValueError:
        return None
    return name, m.end()


def parse_call(body: str, argument_keys: tuple[str, ...]) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of a complete call object, or None if it is not one.
    Arguments sent as a JSON string holding an object are accepted too."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = next((obj[k] for k in argument_keys if k in obj), None)
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)
