"""The OpenAI-compatible HTTP server: app factory, access guard, model loading and lifecycle.

``build_app(config, load_engine)`` returns a FastAPI app that starts answering at once: the model
loads on a worker thread while ``/health`` says 503 "loading". ``run_server(args)`` serves it with
uvicorn and implements graceful shutdown. Invariants:

- Every route except ``/health`` requires a configured API key (compared with
  ``hmac.compare_digest`` against every key, so timing does not reveal which one matched).
- On the first SIGTERM/SIGINT new requests get 503 while in-flight ones may finish for
  ``shutdown_timeout`` seconds; the rest are aborted ("abort"), then the process exits 0. A second
  signal exits at once. No child process is ever started.
- Each app has its own metrics registry and state (``app.state.conveyor``); nothing is global.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hmac
import logging
import os
import threading
from contextlib import asynccontextmanager
from typing import Any, Callable

import uvicorn
from fastapi import FastAPI

from conveyor.errors import ConveyorError, InvalidRequestError
from conveyor.metrics.prometheus import ServingMetrics
from conveyor.serving.app_state import AppState, ServerConfig
from conveyor.serving.async_engine import AsyncEngine
from conveyor.serving.http_errors import error_response, install_error_handlers
from conveyor.serving.openai_routes import add_openai_routes
from conveyor.serving.protocol import RequestLimits
from conveyor.serving.utility_routes import add_utility_routes

logger = logging.getLogger("conveyor.serving")

__all__ = ["ServerConfig", "build_app", "drain_app", "run_server"]


def build_app(config: ServerConfig, load_engine: Callable[[], Any],
              on_load_error: Callable[[str], None] | None = None) -> FastAPI:
    """A FastAPI app serving the ``LLMEngine`` that ``load_engine()`` returns.

    ``load_engine`` runs on a worker thread when the app starts (lifespan); until it returns, every
    route but ``/health`` and ``/metrics`` answers 503. If it raises, ``on_load_error(message)`` is
    called (the CLI uses it to exit). The app's ``AppState`` is ``app.state.conveyor``.
    """
    state = AppState(config, RequestLimits(max_n=config.max_n))
    state.metrics = ServingMetrics(lambda: state.engine.snapshot if state.engine else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(_load(state, load_engine, on_load_error))
        try:
            yield
        finally:
            await loader
            if state.engine is not None:
                await state.engine.shutdown()
            state.tokenizer_pool.shutdown(wait=False)

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.conveyor = state
    install_error_handlers(app)
    add_openai_routes(app)
    add_utility_routes(app)
    app.add_middleware(GuardMiddleware, state=state)
    return app


async def drain_app(app: FastAPI) -> None:
    """Graceful stop: 503 for new requests, let in-flight ones finish up to the shutdown timeout,
    then abort the rest; returns once every response got its last output."""
    state: AppState = app.state.conveyor
    state.draining = True
    if state.engine is not None:
        logger.info("draining: %d request(s) in flight, waiting up to %.0f s",
                    state.engine.num_in_flight, state.config.shutdown_timeout)
        await state.engine.drain(state.config.shutdown_timeout)


async def _load(state: AppState, load_engine: Callable[[], Any],
                on_load_error: Callable[[str], None] | None) -> None:
    try:
        engine = await run_on_own_thread(load_engine)
    except Exception as exc:  # noqa: BLE001 - reported through /health and on_load_error
        state.load_error = f"the model failed to load: {exc}"
        logger.error(state.load_error, exc_info=exc)
        if on_load_error is not None:
            on_load_error(state.load_error)
        return
    # The front end gets its own tokenizer: HF fast tokenizers must not be shared across threads.
    state.tokenizer = dataclasses.replace(engine.tokenizer, hf=copy.deepcopy(engine.tokenizer.hf))
    state.model_path = engine.model_path
    state.model_name = state.config.served_model_name or os.path.basename(engine.model_path)
    state.max_model_len = engine.max_model_len
    async_engine = AsyncEngine(engine, max_waiting_requests=state.config.max_waiting_requests,
                               request_timeout=state.config.request_timeout,
                               observer=state.metrics)
    async_engine.start()
    state.engine = async_engine
    _log_ready(state, engine)


async def run_on_own_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` on a new thread that exits when it returns (not an executor thread, which lives on).

    Loading a model runs OpenMP parallel regions, and libgomp keeps a thread pool for every thread
    that ever started one, for as long as that thread lives. A loader thread kept alive (as
    ``asyncio.to_thread``'s executor keeps its threads) leaves a second pool beside the engine
    thread's: libgomp then counts more OpenMP threads than CPUs and its workers stop spinning
    between parallel regions and sleep instead. On 2 cores that made every decode step through the
    server ~1.5x slower than the same step in-process (34 vs 21 ms at one running request).
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def target() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(_settle, done, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, done, result, None)

    thread = threading.Thread(target=target, name="conveyor-load", daemon=True)
    thread.start()
    result = await done
    thread.join()     # it is past fn() already; once gone, its OpenMP pool is gone with it
    return result


def _settle(fut: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if fut.cancelled():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def _log_ready(state: AppState, engine: Any) -> None:
    c, snap = state.config, state.engine.snapshot
    block_size = engine.config.cache.block_size
    logger.info("serving %s as %r: context %d tokens; KV cache %d blocks x %d = %d tokens",
                engine.model_path, state.model_name, engine.max_model_len, snap.num_total_blocks,
                block_size, snap.num_total_blocks * block_size)
    logger.info("limits: max_n %d, max_waiting_requests %d, max_body_bytes %d, request_timeout %s, "
                "shutdown_timeout %.0f s, %d API key(s)", c.max_n, c.max_waiting_requests,
                c.max_body_bytes, c.request_timeout, c.shutdown_timeout, len(c.api_keys))


class GuardMiddleware:
    """Pure ASGI: API keys on every route but ``/health``; 503 for new requests while draining."""

    def __init__(self, app, state: AppState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        keys = self.state.config.api_keys
        if keys:
            index = match_api_key(_bearer_token(scope), keys)
            if index is None:
                response = error_response(401, "missing or wrong API key; send 'Authorization: "
                                               "Bearer <key>'", code="invalid_api_key")
                return await response(scope, receive, send)
            scope.setdefault("state", {})["api_key_index"] = index
        if self.state.draining and scope["path"] != "/metrics":
            response = error_response(503, "the server is shutting down and takes no new requests",
                                      code="shutting_down")
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


def match_api_key(given: str | None, keys: tuple[str, ...]) -> int | None:
    """Index of the key equal to ``given``; every key is compared, in constant time each."""
    if given is None:
        return None
    given_bytes, found = given.encode(), None
    for i, key in enumerate(keys):
        if hmac.compare_digest(given_bytes, key.encode()) and found is None:
            found = i
    return found


def _bearer_token(scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class _GracefulServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains the app before uvicorn stops; the signal is
    not re-raised afterwards, so the process exits 0."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self._app = app
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain_task: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self._draining or self._loop is None:
            self.force_exit = self._draining     # a second signal: stop waiting for anything
            self.should_exit = True
            return
        self._draining = True
        logger.info("signal %d: draining before exit (a second signal exits at once)", sig)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            await drain_app(self._app)
        finally:
            self.should_exit = True


def run_server(args) -> int:
    """``conveyor serve``: build the app from parsed flags and serve it until SIGTERM."""
    from conveyor.cli.args import engine_kwargs
    from conveyor.serving.engine import LLMEngine

    config = server_config_from_args(args)
    kwargs = engine_kwargs(args)
    failures: list[str] = []
    server: _GracefulServer | None = None

    def on_load_error(message: str) -> None:
        failures.append(message)
        server.should_exit = True

    app = build_app(config, lambda: LLMEngine.from_kwargs(
        attention_backend=args.attention_backend, **kwargs), on_load_error)
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None,
                               log_level=args.log_level, access_log=args.log_level == "debug",
                               timeout_graceful_shutdown=10, ws="none")
    server = _GracefulServer(uv_config, app)
    server.run()
    if failures:
        raise ConveyorError(failures[0])
    return 0 if server.started else 1


def server_config_from_args(args) -> ServerConfig:
    for name in ("max_body_bytes", "max_waiting_requests", "max_n"):
        if getattr(args, name) <= 0:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be positive")
    if args.request_timeout is not None and args.request_timeout <= 0:
        raise InvalidRequestError("--request-timeout must be positive")
    if args.shutdown_timeout < 0:
        raise InvalidRequestError("--shutdown-timeout must not be negative")
    return ServerConfig(args.served_model_name, tuple(args.api_key or ()), args.max_body_bytes,
                        args.max_waiting_requests, args.max_n, args.request_timeout,
                        args.shutdown_timeout, args.tenant_max_concurrency,
                        args.tenant_max_tokens_per_minute)
