"""Answer a ``ForwardedRequest`` with an ASGI app in this process: the replica's side of the wire.

``respond(app, request)`` drives the app as an ASGI server would (one ``http`` scope, the body in
one ``http.request`` message) and yields a ``ResponseHead`` and then the body's ``bytes`` chunks
as the app sends them, so a streamed completion stays streamed. No Ray here. Invariants:

- The app sees a client disconnect (``http.disconnect``) when the consumer stops early (the
  generator is closed or cancelled: the front door's client went away), so conveyor's routes
  abort the request and free its KV blocks exactly as they do for a direct client.
- At most ``_QUEUE_MESSAGES`` messages wait for a slow consumer; beyond that the app's ``send``
  waits (its own stream-write timeout applies), so memory per request stays bounded.
- An app that raises before its response starts yields a 500 with an OpenAI-shaped body; one
  that raises after it started ends the stream (the consumer sees it end early).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator

from conveyor.ray.forward import ForwardedRequest, ResponseHead

logger = logging.getLogger("conveyor.ray")

_QUEUE_MESSAGES = 64
_CANCEL_GRACE_S = 5.0       # how long the app gets to react to the disconnect before cancellation
_END = object()


def scope_for(request: ForwardedRequest, client: tuple[str, int]) -> dict[str, Any]:
    """The ASGI ``http`` scope of ``request``."""
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1", "method": request.method.upper(), "scheme": "http",
        "path": request.path, "raw_path": request.path.encode("latin-1", "replace"),
        "query_string": request.query.encode("latin-1", "replace"), "root_path": "",
        "headers": [(k.encode("latin-1"), v.encode("latin-1", "replace"))
                    for k, v in request.headers],
        "client": client, "server": ("conveyor-replica", 0), "state": {},
    }


async def respond(app: Any, request: ForwardedRequest,
                  client: tuple[str, int] = ("ray-ingress", 0)
                  ) -> AsyncIterator[ResponseHead | bytes]:
    """Yield ``app``'s response to ``request``: one ``ResponseHead``, then body chunks."""
    sent: asyncio.Queue = asyncio.Queue(_QUEUE_MESSAGES)
    gone = asyncio.Event()
    body_taken = False

    async def receive() -> dict:
        nonlocal body_taken
        if not body_taken:
            body_taken = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if gone.is_set():
            raise OSError("the front door's client went away")
        await sent.put(message)

    task = asyncio.create_task(app(scope_for(request, client), receive, send))
    started = False
    try:
        while True:
            message = await _next(sent, task)
            if message is _END:
                break
            if message["type"] == "http.response.start":
                started = True
                yield ResponseHead(int(message["status"]), _headers(message.get("headers", ())))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    break
        if not started:
            exc = task.exception() if task.done() and not task.cancelled() else None
            logger.error("the replica's app ended without a response to %s %s",
                         request.method, request.path, exc_info=exc)
            yield ResponseHead(500, (("content-type", "application/json"),))
            yield json.dumps({"error": {"message": "the replica failed to answer",
                                        "type": "internal_error", "param": None,
                                        "code": None}}).encode()
    finally:
        gone.set()
        await _finish(task)


async def _next(sent: asyncio.Queue, task: asyncio.Task) -> Any:
    """The app's next message, or ``_END`` once the app is done and everything it sent was read."""
    if not sent.empty():
        return sent.get_nowait()
    if task.done():
        return _END
    getter = asyncio.ensure_future(sent.get())
    try:
        await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not getter.done():
            getter.cancel()
    if getter.done() and not getter.cancelled():
        return getter.result()
    return sent.get_nowait() if not sent.empty() else _END


async def _finish(task: asyncio.Task) -> None:
    if not task.done():
        done, _ = await asyncio.wait({task}, timeout=_CANCEL_GRACE_S)
        if not done:
            task.cancel()
    try:
        await task
    except (asyncio.CancelledError, OSError):
        pass
    except Exception:  # noqa: BLE001 - the response is over; the app's error is only logged
        logger.exception("the replica's app raised")


def _headers(raw) -> tuple[tuple[str, str], ...]:
    return tuple((bytes(k).decode("latin-1").lower(), bytes(v).decode("latin-1"))
                 for k, v in raw)
