"""Per-app server state and the request helpers every route shares.

Owns: the server's configuration, the engine once it has loaded, the front end's own tokenizer
copy and the single thread it runs on, the metrics, and the draining flag. Invariants:

- One ``AppState`` per FastAPI app (``app.state.conveyor``); nothing is module-global.
- The front-end tokenizer is a copy of the engine's and is only used on ``tokenizer_pool``'s one
  thread, so it never races the engine thread's detokenizers (HF fast tokenizers are not
  safe to share across threads).
- Bodies are read with a byte cap (Content-Length first, then the streamed bytes) and parsed as
  strict JSON (no NaN/Infinity); nothing from a request is unpickled, evaluated or used as a path.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from fastapi import Request

from conveyor.metrics.prometheus import ServingMetrics
from conveyor.serving.async_engine import AsyncEngine
from conveyor.serving.tenant_limits import TenantLimiter
from conveyor.serving.http_errors import ApiError
from conveyor.serving.protocol import RequestLimits

_MAX_TENANT_CHARS = 128


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """HTTP-side limits and identity; engine sizing lives in the engine's own config.

    served_model_name: the name clients must use (None: the model path's basename).
    api_keys: accepted bearer tokens; empty means no authentication.
    request_timeout: seconds after which a request is aborted (None: never).
    shutdown_timeout: seconds in-flight requests get to finish after SIGTERM.
    """

    served_model_name: str | None = None
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    max_waiting_requests: int = 1024
    max_n: int = 8
    request_timeout: float | None = None
    shutdown_timeout: float = 30.0
    tenant_max_concurrency: int | None = None
    tenant_max_tokens_per_minute: int | None = None


@dataclass(slots=True)
class AppState:
    """Everything the routes of one app share. ``engine`` is None until the model has loaded;
    ``metrics`` is set by the app factory right after construction."""

    config: ServerConfig
    limits: RequestLimits
    metrics: ServingMetrics = field(init=False)
    engine: AsyncEngine | None = None
    tokenizer: Any = None
    model_name: str = ""
    model_path: str = ""
    max_model_len: int = 0
    load_error: str | None = None
    draining: bool = False
    tokenizer_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="conveyor-tokenizer"))
    tenant_limiter: TenantLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.tenant_limiter = TenantLimiter(self.config.tenant_max_concurrency,
                                            self.config.tenant_max_tokens_per_minute)

    def require_engine(self) -> AsyncEngine:
        if self.engine is None:
            message = self.load_error or "the model is still loading; retry when /health says ok"
            raise ApiError(503, message, code="model_loading")
        return self.engine

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                                f"{self.model_name!r}", param="model", code="model_not_found")

    async def run_tokenizer(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the tokenizer thread (the only user of ``self.tokenizer``)."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, fn, *args)

    async def token_texts(self, token_ids: set[int]) -> dict[int, str]:
        """Each id's text (as decoding it alone gives), for logprobs."""
        ids = sorted(token_ids)
        texts = await self.run_tokenizer(
            lambda: [self.tokenizer.decode([i], skip_special_tokens=False) for i in ids])
        return dict(zip(ids, texts))

    def check_prompt_length(self, num_tokens: int) -> None:
        if num_tokens >= self.max_model_len:
            raise ApiError(400, f"the prompt has {num_tokens} tokens but the context length is "
                                f"{self.max_model_len}; shorten the prompt", param="prompt",
                           code="context_length_exceeded")


def app_state(request: Request) -> AppState:
    return request.app.state.conveyor


async def read_json(request: Request, max_bytes: int) -> Any:
    """The request body as JSON, refusing more than ``max_bytes`` (413) and bad JSON (400)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > max_bytes):
        raise _too_large(max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {max_bytes} bytes", code="body_too_large")


def request_identity(request: Request, body_priority: int | None) -> tuple[int, str]:
    """(priority, tenant): body ``priority`` > ``X-Priority`` header > 0; ``X-Tenant`` header >
    the API key's index (``key0``, ``key1``...) > ``default``."""
    priority = body_priority
    header = request.headers.get("x-priority")
    if priority is None and header is not None:
        try:
            priority = int(header)
        except ValueError:
            raise ApiError(400, f"X-Priority must be an integer, got {header!r}",
                           param="X-Priority") from None
    tenant = request.headers.get("x-tenant", "").strip()
    if len(tenant) > _MAX_TENANT_CHARS:
        raise ApiError(400, f"X-Tenant must be at most {_MAX_TENANT_CHARS} characters",
                       param="X-Tenant")
    if not tenant:
        key_index = request.scope.get("state", {}).get("api_key_index")
        tenant = f"key{key_index}" if key_index is not None else "default"
    return priority or 0, tenant
