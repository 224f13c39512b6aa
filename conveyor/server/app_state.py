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

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from fastapi import Request

from conveyor.errors import InvalidRequestError

from conveyor.metrics.prometheus import ServingMetrics
from conveyor.server.admission import check_prompt_chars
from conveyor.engine.async_engine import AsyncEngine
from conveyor.server.auth import ANONYMOUS, Identity, KeyRing, resolve
from conveyor.server.tenant_limits import TenantLimiter
from conveyor.server.http_errors import ApiError
from conveyor.server.protocol import RequestLimits
from conveyor.server.server_config import ServerConfig
from conveyor.server.tokenizer_pool import TokenizerPool


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
    max_prompt_chars: int = 0          # admission.py's character bound (0 until loaded)
    tokenizer_pool: TokenizerPool = field(init=False)
    tenant_limiter: TenantLimiter = field(init=False)
    key_ring: KeyRing = field(init=False)

    def __post_init__(self) -> None:
        self.tokenizer_pool = TokenizerPool(self.config.max_tokenizer_queue_chars)
        self.key_ring = KeyRing(self.config.api_keys)
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

    async def run_tokenizer(self, fn: Callable[..., Any], *args: Any, cost: int = 1) -> Any:
        """Run ``fn(*args)`` on the tokenizer thread (the only user of ``self.tokenizer``);
        ``cost`` is its size in characters (``TokenizerPool``: order and queue bound)."""
        return await self.tokenizer_pool.run(fn, *args, cost=cost)

    async def token_texts(self, token_ids: set[int]) -> dict[int, str]:
        """Each id's text (as decoding it alone gives), for logprobs."""
        ids = sorted(token_ids)
        texts = await self.run_tokenizer(
            lambda: [self.tokenizer.decode([i], skip_special_tokens=False) for i in ids],
            cost=4 * len(ids))
        return dict(zip(ids, texts))

    def check_prompt_chars(self, num_chars: int) -> None:
        """400 before tokenizing a prompt too long for the context under any tokenization."""
        check_prompt_chars(num_chars, self.max_prompt_chars, self.max_model_len)


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
    """(priority, tenant) of a request, as its API key's identity allows (``server.auth``)."""
    identity: Identity = request.scope.get("state", {}).get("identity", ANONYMOUS)
    return resolve(identity, request.headers, body_priority)
