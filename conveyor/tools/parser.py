"""Tool calls out of a model's text as it streams: one state machine for streamed and whole replies.

``ToolCallParser.feed(text)`` takes the next piece of a reply and returns events: content text,
the start of a call (id and name) and pieces of its arguments; ``finish()`` ends the reply. A
whole reply is one ``feed`` plus ``finish``, so streamed and non-streamed replies agree by
construction. Invariants:

- The result (content, and each call's name and arguments) does not depend on how the text was
  split into pieces; events are never retracted.
- A call is announced once its header (``{"name": "<a known function>", "arguments": {``) has
  arrived, and its arguments stream as the raw text of that object. A call whose header never
  arrives is read whole when its object closes; one that is not a call to a known function, or
  not JSON, is returned as content, verbatim (nothing the model wrote is lost).
- The call markup (opener, closer, separators) never appears in content, and neither does the
  whitespace between content and calls. A reply with no call has content equal to its text.
- Calls beyond ``max_calls`` are read and dropped (``parallel_tool_calls: false``).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

from conveyor.tools.json_scan import ObjectScanner, call_header, header_pattern, parse_call


@dataclass(frozen=True, slots=True)
class CallSyntax:
    """How a model family writes calls. ``opener``: a marker that starts a call anywhere in
    the text (then ``closer`` ends it); without one, calls are JSON objects that open the reply
    (after an optional ``start_marker``) and ``separator`` sits between them."""

    argument_keys: tuple[str, ...] = ("arguments",)
    opener: str | None = None
    closer: str | None = None
    separator: str | None = None
    start_marker: str | None = None


@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str


@dataclass(frozen=True, slots=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ArgumentsDelta:
    index: int
    text: str


Event = ContentDelta | CallStart | ArgumentsDelta


class _State(Enum):
    START = "start"          # opener-less syntax: nothing but whitespace seen yet
    CONTENT = "content"      # text, watching for the opener
    BODY = "body"            # inside a call's JSON object
    AFTER = "after"          # a call's object closed: closer or separator expected
    TEXT = "text"            # opener-less syntax, the reply is text from here on


@dataclass(slots=True)
class _Call:
    gap: str                  # consumed before the body (whitespace, opener); content if malformed
    body: str = ""
    scanner: ObjectScanner | None = None
    header_tried: bool = False
    index: int | None = None  # set once announced; None and suppressed: dropped past max_calls
    suppressed: bool = False
    args: ObjectScanner | None = None
    streamed: int = 0

    @property
    def committed(self) -> bool:
        return self.index is not None or self.suppressed


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class ToolCallParser:
    """One reply's parser; ``names`` are the functions it may call."""

    syntax: CallSyntax
    names: frozenset[str]
    max_calls: int | None = None
    new_id: Callable[[], str] = new_call_id
    num_calls: int = 0
    _state: _State = field(init=False)
    _header: re.Pattern = field(init=False, repr=False)
    _buf: str = ""
    _ws: str = ""              # trailing whitespace of content, held until we know what follows
    _after_call: bool = False  # drop whitespace that opens content following a call
    _call: _Call | None = None
    _events: list[Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._state = _State.CONTENT if self.syntax.opener else _State.START
        self._header = header_pattern(self.syntax.argument_keys)

    def feed(self, text: str) -> list[Event]:
        """Events for the next piece of the reply."""
        self._buf += text
        steps = {_State.START: self._start, _State.CONTENT: self._content_step,
                 _State.BODY: self._body_step, _State.AFTER: self._after_step,
                 _State.TEXT: self._text_step}
        while steps[self._state]():
            pass
        return self._take()

    def finish(self) -> list[Event]:
        """Events for the end of the reply (held-back text, an unfinished call)."""
        call = self._call
        if self._state in (_State.START, _State.CONTENT):
            self._content(self._buf)
        elif self._state is _State.BODY and call is not None and not call.committed:
            self._content(call.gap + call.body)
        self._buf, self._call = "", None
        if self._ws and self.num_calls == 0:
            self._emit(ContentDelta(self._ws))
        self._ws = ""
        return self._take()

    # -- states: each returns True when it changed state and the loop should go on --

    def _start(self) -> bool:
        text = self._buf.lstrip()
        marker = self.syntax.start_marker
        if not text or (marker and marker.startswith(text)):
            return False
        lead = self._buf[:len(self._buf) - len(text)]
        if marker and text.startswith(marker):
            lead, text = lead + marker, text[len(marker):].lstrip()
            if not text:
                return False
        if text.startswith("{"):
            self._open_call(lead)
            self._buf = text
        else:
            self._state = _State.TEXT
        return True

    def _content_step(self) -> bool:
        opener = self.syntax.opener
        i = self._buf.find(opener)
        if i < 0:
            keep = _partial_suffix(self._buf, opener)
            self._content(self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        gap = self._content(self._buf[:i], before_call=True)
        self._open_call(gap + opener)
        self._buf = self._buf[i + len(opener):]
        return True

    def _text_step(self) -> bool:
        self._content(self._buf)
        self._buf = ""
        return False

    def _body_step(self) -> bool:
        call = self._call
        call.body += self._buf
        self._buf = ""
        if call.scanner is None:
            text = call.body.lstrip()
            if not text:
                return False
            lead = len(call.body) - len(text)
            if not text.startswith("{"):
                return self._malformed(call, lead, call.gap + call.body[:lead])
            call.scanner = ObjectScanner(lead)
        end = call.scanner.end(call.body)
        if not call.header_tried:
            self._try_header(call)
        if call.index is not None:
            self._stream_arguments(call, end)
        if end is None:
            return False
        self._buf, call.body = call.body[end:], call.body[:end]
        if not call.committed:
            return self._complete(call)
        self._state = _State.AFTER
        return True

    def _after_step(self) -> bool:
        self._buf = self._buf.lstrip()
        if not self._buf:
            return False
        closer, sep = self.syntax.closer, self.syntax.separator
        if closer and closer.startswith(self._buf) and self._buf != closer:
            return False
        if closer and self._buf.startswith(closer):
            self._buf = self._buf[len(closer):]
        elif sep and self._buf.startswith(sep):
            self._buf = self._buf[len(sep):]
            self._open_call(sep)
            return True
        self._after_call = True
        self._state = _State.CONTENT if self.syntax.opener else _State.TEXT
        return True

    # -- calls --

    def _open_call(self, gap: str) -> None:
        self._call = _Call(gap)
        self._state = _State.BODY

    def _try_header(self, call: _Call) -> None:
        header = call_header(self._header, call.body)
        if header is None:
            return
        call.header_tried = True
        name, args_start = header
        if name in self.names:
            self._announce(call, name)
            call.args = ObjectScanner(args_start)
            call.streamed = args_start

    def _announce(self, call: _Call, name: str) -> None:
        self._ws = ""
        if self.max_calls is not None and self.num_calls >= self.max_calls:
            call.suppressed = True
            return
        call.index = self.num_calls
        self.num_calls += 1
        self._emit(CallStart(call.index, self.new_id(), name))

    def _stream_arguments(self, call: _Call, end: int | None) -> None:
        args_end = call.args.end(call.body)
        upto = args_end if args_end is not None else len(call.body) if end is None else end
        if upto > call.streamed:
            self._emit(ArgumentsDelta(call.index, call.body[call.streamed:upto]))
            call.streamed = upto

    def _complete(self, call: _Call) -> bool:
        """A call object closed before its header was recognised: read it whole."""
        parsed = parse_call(call.body, self.syntax.argument_keys)
        if parsed is None or parsed[0] not in self.names:
            return self._malformed(call, len(call.body), call.gap + call.body)
        self._announce(call, parsed[0])
        if call.index is not None:
            self._emit(ArgumentsDelta(call.index, parsed[1]))
        self._state = _State.AFTER
        return True

    def _malformed(self, call: _Call, consumed: int, text: str) -> bool:
        """Not a call after all: ``text`` becomes content, the rest of the body is read again."""
        self._content(text)
        self._buf = call.body[consumed:] + self._buf
        self._call = None
        self._state = _State.CONTENT if self.syntax.opener else _State.TEXT
        return True

    # -- content --

    def _content(self, text: str, before_call: bool = False) -> str:
        """Emit content, holding trailing whitespace back. ``before_call``: a call follows, so
        the held whitespace is returned (content again only if the call is malformed)."""
        if self._after_call:
            text = text.lstrip()
            self._after_call = not text
        text = self._ws + text
        kept = text.rstrip()
        self._ws = "" if before_call else text[len(kept):]
        if kept:
            self._emit(ContentDelta(kept))
        return text[len(kept):] if before_call else ""

    def _emit(self, event: Event) -> None:
        if self._events and isinstance(event, ContentDelta) and \
                isinstance(self._events[-1], ContentDelta):
            self._events[-1] = ContentDelta(self._events[-1].text + event.text)
        elif isinstance(event, ArgumentsDelta) and self._events and \
                isinstance(self._events[-1], ArgumentsDelta) and \
                self._events[-1].index == event.index:
            self._events[-1] = ArgumentsDelta(event.index, self._events[-1].text + event.text)
        else:
            self._events.append(event)

    def _take(self) -> list[Event]:
        events, self._events = self._events, []
        return events


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0
