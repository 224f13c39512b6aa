"""The one message the front door sends to an engine replica: an HTTP request, as data.

The ingress deployment forwards each OpenAI request unchanged (method, path, query, headers,
body bytes) to one replica, which answers it with conveyor's own server app, so validation,
errors and streaming are the single-server ones. Request routers read ``body`` (the JSON of a
completion or chat request) to choose the replica; they never change it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ForwardedRequest:
    """An HTTP request crossing from the ingress to a replica (picklable, immutable)."""

    method: str
    path: str                                 # e.g. "/v1/chat/completions"
    query: str = ""                           # the raw query string, without "?"
    headers: tuple[tuple[str, str], ...] = ()  # lower-case names, in order
    body: bytes = b""

    def json_body(self) -> dict[str, Any] | None:
        """The body parsed as a JSON object, or None when it is not one (never raises)."""
        try:
            value = json.loads(self.body) if self.body else None
        except (ValueError, UnicodeDecodeError):
            return None
        return value if isinstance(value, dict) else None


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """The first item a replica streams back for a ``ForwardedRequest``: status and headers; the
    response body follows as ``bytes`` chunks, in order, ending when the stream ends."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()  # lower-case names, in order

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower case), or None."""
        return next((v for k, v in self.headers if k == name), None)

    @property
    def is_event_stream(self) -> bool:
        """A server-sent events response (a streamed completion or chat)."""
        return (self.header("content-type") or "").startswith("text/event-stream")
