"""Send one HTTP request to a replica through Serve and carry its answer back, surviving a death.

``Forwarder.forward`` turns a Starlette request into a ``ForwardedRequest``, calls the engine
deployment's ``forward`` through its ``DeploymentHandle`` as a stream, and answers with what the
replica's app said. Invariants:

- A replica that dies (or is unreachable) before it produced the response head is retried on
  another one, up to ``_ATTEMPTS`` times in all; nothing was sent to the client yet, and no
  replica had started the request, so a retry cannot duplicate work the client sees.
- A non-streamed answer is read whole before the client gets it, so a replica dying mid-way
  gives a clean 503 JSON error; a streamed one (server-sent events) is passed on chunk by
  chunk, and a replica dying mid-stream ends it with an SSE ``error`` event and ``[DONE]``.
- The client going away cancels the replica's call, so its app sees a disconnect and aborts
  the request (its KV blocks are freed there).
- The front door reads at most ``max_body_bytes + 1`` body bytes: a larger body reaches the
  replica already too large, and the replica answers its usual 413.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from conveyor.ray.forward import ForwardedRequest, ResponseHead
from conveyor.server.http_errors import error_event, error_response

logger = logging.getLogger("conveyor.ray")

_ATTEMPTS = 3
_RETRY_DELAY_S = 0.2
_HOP_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})


def replica_failures() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the replica (or its node) is gone", not "the request failed"."""
    from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError
    from ray.serve.exceptions import ReplicaUnavailableError
    return RayActorError, WorkerCrashedError, NodeDiedError, ReplicaUnavailableError


class Forwarder:
    """Forwards requests to the engine deployment ``engine`` (a ``DeploymentHandle``)."""

    def __init__(self, engine: Any, max_body_bytes: int, metrics: Any):
        self._engine = engine.options(stream=True)
        self._max_body_bytes = max_body_bytes
        self._metrics = metrics
        self._failures = replica_failures()

    async def forward(self, request: Request) -> Response:
        forwarded = ForwardedRequest(
            request.method, request.url.path, request.url.query,
            tuple((k.decode("latin-1").lower(), v.decode("latin-1"))
                  for k, v in request.scope["headers"]),
            await self._read_body(request))
        opened = await self._open(forwarded)
        if isinstance(opened, Response):
            return opened
        head, stream = opened
        headers = {k: v for k, v in head.headers if k not in _HOP_HEADERS}
        if head.is_event_stream:
            return StreamingResponse(self._relay_events(stream), status_code=head.status,
                                     headers=headers)
        try:
            body = b"".join([chunk async for chunk in stream])
        except self._failures as exc:
            return self._replica_lost(exc)
        return Response(body, status_code=head.status, headers=headers)

    async def _read_body(self, request: Request) -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self._max_body_bytes:
                break
        return bytes(body)

    async def _open(self, forwarded: ForwardedRequest):
        """(head, stream of body chunks) from a live replica, or an error ``Response``."""
        for attempt in range(1, _ATTEMPTS + 1):
            stream = self._engine.forward.remote(forwarded)
            try:
                head = await stream.__anext__()
            except self._failures as exc:
                stream.cancel()
                self._metrics.retries.inc()
                logger.warning("a replica failed before answering %s (attempt %d of %d): %s",
                               forwarded.path, attempt, _ATTEMPTS, type(exc).__name__)
                await asyncio.sleep(_RETRY_DELAY_S * attempt)
                continue
            except StopAsyncIteration:
                return error_response(500, "the replica sent no response", code="replica_error")
            if not isinstance(head, ResponseHead):
                stream.cancel()
                return error_response(500, "the replica sent no response head",
                                      code="replica_error")
            return head, stream
        self._metrics.replica_failures.inc()
        return error_response(503, f"no engine replica could take the request after {_ATTEMPTS} "
                                   "attempts; retry later", code="replica_unavailable")

    async def _relay_events(self, stream) -> AsyncIterator[bytes]:
        try:
            async for chunk in stream:
                yield chunk
        except self._failures as exc:
            self._metrics.replica_failures.inc()
            logger.warning("a replica failed mid-stream: %s", exc)
            yield error_event(503, "the engine replica serving this request failed; retry it",
                              code="replica_failed").encode()
            yield b"data: [DONE]\n\n"
        finally:
            stream.cancel()

    def _replica_lost(self, exc: BaseException) -> Response:
        self._metrics.replica_failures.inc()
        logger.warning("a replica failed mid-response: %s", exc)
        return error_response(503, "the engine replica serving this request failed; retry it",
                              code="replica_failed")

    @staticmethod
    def check_key(request: Request, key_ring: Any) -> Response | None:
        """None when the request may read a protected front-door path, else the 401."""
        if not key_ring.enabled:
            return None
        from conveyor.server.dashboard import basic_key
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        key = {"bearer": token.strip(), "basic": basic_key(token.strip())}.get(scheme.lower())
        if key_ring.authenticate(key) is None:
            return error_response(401, "missing or wrong API key; send 'Authorization: Bearer "
                                       "<key>'", code="invalid_api_key")
        return None
