"""Errors at the HTTP edge: every failure leaves as OpenAI's JSON shape with the right status.

``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}``. Typed errors raised
anywhere below (``InvalidRequestError``, ``QueueFullError``, ...) are mapped here and nowhere else;
an unexpected exception becomes a 500 whose message does not leak internals beyond its type.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from conveyor.errors import CapacityError, ContextLengthError, InvalidRequestError
from conveyor.engine.async_engine import EngineDeadError, EngineStoppedError, QueueFullError

logger = logging.getLogger("conveyor.serving")

_TYPE_FOR_STATUS = {400: "invalid_request_error", 401: "authentication_error",
                    404: "not_found_error", 405: "invalid_request_error",
                    413: "invalid_request_error", 429: "rate_limit_error",
                    500: "internal_error", 503: "service_unavailable"}


class ApiError(Exception):
    """An error with an HTTP status, raised by route code and rendered by ``error_response``."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict:
    """The OpenAI error object; text echoed from a request (a field name that is a lone
    surrogate, say) is escaped so that the body can always be encoded as UTF-8."""
    return {"error": {"message": _encodable(message), "type": _TYPE_FOR_STATUS.get(status, "error"),
                      "param": None if param is None else _encodable(param), "code": code}}


def _encodable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status,
                        headers=headers)


def error_event(status: int, message: str, code: str | None = None) -> str:
    """The SSE event that reports an error after a stream has started."""
    return f"data: {json.dumps(error_body(status, message, code=code))}\n\n"


def to_api_error(exc: BaseException) -> ApiError:
    """Map a typed error to its status; anything unexpected is a 500."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidRequestError):
        code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else None
        return ApiError(400, str(exc), param=exc.param, code=code)
    if isinstance(exc, CapacityError):
        return ApiError(400, str(exc), code="kv_cache_too_small")
    if isinstance(exc, QueueFullError):
        return ApiError(429, str(exc), code="queue_full",
                        headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, EngineStoppedError):
        return ApiError(503, str(exc), code="shutting_down")
    if isinstance(exc, EngineDeadError):
        return ApiError(503, str(exc), code="engine_dead")
    if isinstance(exc, ClientDisconnect):
        return ApiError(499, "the client closed the connection", code="client_closed")
    logger.error("unexpected error while serving a request", exc_info=exc)
    return ApiError(500, f"internal server error ({type(exc).__name__})", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        err = to_api_error(exc)
        return error_response(err.status, err.message, err.param, err.code, err.headers)

    async def handle_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = f"no route for {request.method} {request.url.path}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    for exc_type in (ApiError, InvalidRequestError, CapacityError, QueueFullError,
                     EngineStoppedError, EngineDeadError, ClientDisconnect, Exception):
        app.add_exception_handler(exc_type, handle)
    app.add_exception_handler(StarletteHTTPException, handle_http)
