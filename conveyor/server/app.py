"""The OpenAI-compatible HTTP server: app factory, access guard, model loading and lifecycle.

``build_app(config, load_engine)`` returns a FastAPI app that starts answering at once: the model
loads on a worker thread while ``/health`` says 503 "loading". ``run_server(args, engine_kwargs)``
serves it with uvicorn and implements graceful shutdown. Never imports ``conveyor.cli``: the CLI
hands over its parsed flags. Invariants:

- Every route except ``api_docs.PUBLIC_PATHS`` (``/health``, ``/openapi.json``, ``/docs``)
  requires a configured API key (``server.auth``: compared in constant time against every key),
  sent as ``Bearer <key>`` or as the password of HTTP Basic credentials (what a browser sends for
  ``/dashboard`` once its 401 asked for them);
  the key's identity (tenant, trusted, min_priority) travels in ``scope["state"]["identity"]``.
- On the first SIGTERM/SIGINT new requests get 503 while in-flight ones may finish for
  ``shutdown_timeout`` seconds; the rest are aborted ("abort"), then the process exits 0 (1 when
  a wedged engine made the drain give up, see ``lifecycle``). A second signal exits at once.
  No child process is ever started.
- Connections are capped and every read of a request (head, body) and every stalled write has
  a deadline (``connection_guard``).
- Each app has its own metrics registry and state (``app.state.conveyor``); nothing is global.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import os
import threading
from contextlib import asynccontextmanager
from typing import Any, Callable

from fastapi import FastAPI

from conveyor.config_flags import config_from_args
from conveyor.errors import ConveyorError
from conveyor.metrics.prometheus import ServingMetrics
from conveyor.server.api_docs import OPENAPI_URL, PUBLIC_PATHS, add_api_docs
from conveyor.server.admission import max_token_chars
from conveyor.server.app_state import AppState, ServerConfig
from conveyor.engine.async_engine import AsyncEngine
from conveyor.server.auth import ANONYMOUS, exposure_warning
from conveyor.server.connection_guard import ConnectionLimits
from conveyor.server.dashboard import add_dashboard_routes, basic_key, challenge_headers
from conveyor.server.http_errors import error_response, install_error_handlers
from conveyor.server.lifecycle import build_server, exit_now
from conveyor.server.openai_routes import add_openai_routes
from conveyor.server.protocol import RequestLimits
from conveyor.server.utility_routes import add_utility_routes

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
    state.metrics = ServingMetrics(lambda: state.engine.snapshot if state.engine else None,
                                   lambda: state.engine, config.price_per_hour,
                                   config.metrics_names, lambda: state.model_name or None)

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

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=OPENAPI_URL)
    app.state.conveyor = state
    install_error_handlers(app)
    add_openai_routes(app)
    add_utility_routes(app)
    add_dashboard_routes(app)
    add_api_docs(app, has_api_keys=bool(config.api_keys), model_name=lambda: state.model_name)
    app.add_middleware(GuardMiddleware, state=state)
    return app


async def drain_app(app: FastAPI) -> bool:
    """Graceful stop: 503 for new requests, let in-flight ones finish up to the shutdown timeout,
    then abort the rest; returns once every response got its last output, within the shutdown
    timeout plus the abort grace even when the engine is wedged (then it returns False)."""
    state: AppState = app.state.conveyor
    state.draining = True
    if state.engine is None:
        return True
    logger.info("draining: %d request(s) in flight, waiting up to %.0f s",
                state.engine.num_in_flight, state.config.shutdown_timeout)
    clean = await state.engine.drain(state.config.shutdown_timeout)
    if not clean:
        logger.error("the engine did not finish its requests while draining; they were failed")
    return clean


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
    state.metrics.engine_ready(engine.max_model_len, engine.cache_config_info())
    token_chars = await state.run_tokenizer(max_token_chars, state.tokenizer)
    state.max_prompt_chars = token_chars * max(1, engine.max_model_len - 1)
    c = state.config
    async_engine = AsyncEngine(engine, max_waiting_requests=c.max_waiting_requests,
                               request_timeout=c.request_timeout, observer=state.metrics,
                               stream_write_timeout=c.stream_write_timeout,
                               watchdog_timeout=c.watchdog_timeout)
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
    """Pure ASGI: API keys on every route but ``PUBLIC_PATHS``; 503 for new requests while
    draining."""

    def __init__(self, app, state: AppState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        identity = ANONYMOUS
        if self.state.key_ring.enabled:
            identity = self.state.key_ring.authenticate(_bearer_token(scope))
            if identity is None:
                response = error_response(401, "missing or wrong API key; send 'Authorization: "
                                               "Bearer <key>'", code="invalid_api_key",
                                          headers=challenge_headers(scope["path"]))
                return await response(scope, receive, send)
        scope.setdefault("state", {})["identity"] = identity     # read by request_identity
        if self.state.draining and scope["path"] != "/metrics":
            response = error_response(503, "the server is shutting down and takes no new requests",
                                      code="shutting_down")
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


def _bearer_token(scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "basic":             # a browser on /dashboard (see dashboard)
                return basic_key(token.strip())
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def run_server(args, engine_kwargs: dict) -> int:
    """``conveyor serve``: build the app from parsed flags (``engine_kwargs``: the engine's
    options, which the CLI gathers) and serve it until SIGTERM (see ``lifecycle``)."""
    from conveyor.engine.llm_engine import LLMEngine

    config = server_config_from_args(args)
    limits = connection_limits_from_args(args)
    kwargs = engine_kwargs
    failures: list[str] = []

    def on_load_error(message: str) -> None:
        failures.append(message)
        server.should_exit = True

    app = build_app(config, lambda: LLMEngine.from_kwargs(**kwargs), on_load_error)
    server = build_server(app, lambda: drain_app(app), limits, host=args.host, port=args.port,
                          log_level=args.log_level)
    server.run()
    if failures:
        raise ConveyorError(failures[0])
    engine = app.state.conveyor.engine
    if engine is not None and engine.left_behind:
        exit_now(1, "exiting without waiting for the engine thread, which is stuck in a step")
    return 0 if server.started and server.drained_cleanly else 1


def connection_limits_from_args(args) -> ConnectionLimits:
    return ConnectionLimits(args.max_connections, args.header_timeout, args.body_timeout,
                            args.stream_write_timeout)


def server_config_from_args(args) -> ServerConfig:
    """The ``conveyor serve`` flags as a (self-validating) ``ServerConfig``; warns when the
    address is reachable from other machines and no key is required."""
    config = config_from_args(ServerConfig, args)
    warning = exposure_warning(config.host, bool(config.api_keys))
    if warning:
        logger.warning(warning)
    return config
