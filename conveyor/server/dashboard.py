"""``GET /dashboard``: a live page of the belt, the KV cache, the queue, latencies and cost.

Routes (all behind the API keys, like /metrics; none in the OpenAPI schema):

- ``/dashboard``: the page, self-contained (``static/dashboard.html`` + ``.js`` + ``.css``
  shipped as package data; no CDN, no build step);
- ``/dashboard/events``: Server-Sent Events, one ``frame`` JSON every ``FRAME_INTERVAL_S``
  until the client leaves or the server drains;
- ``/dashboard/frame``: one frame as JSON (scrapers, tests).

A frame is built on the event loop from the metrics' belt feed and recent outputs and the
engine snapshot (``build_frame``), never on the engine thread, so its cost does not land in a
step. Browsers cannot send a bearer header on their own: with keys configured, a 401 for a
dashboard path asks for HTTP Basic credentials (any user name, the key as password), which the
browser then sends with the event stream too (see ``basic_key`` and ``server.GuardMiddleware``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from conveyor.metrics.belt import BELT_STEPS, tenant_shares, usage_of
from conveyor.metrics.belt_collector import cost_summary
from conveyor.metrics.windows import percentiles_ms
from conveyor.server.app_state import app_state

FRAME_INTERVAL_S = 0.5
RATE_WINDOW_S = 5.0           # tokens/s over the last few seconds, so idle reads 0 soon
DASHBOARD_PREFIX = "/dashboard"
_ASSETS = {"dashboard.js": "text/javascript; charset=utf-8",
           "dashboard.css": "text/css; charset=utf-8"}
_KIND_CODES = {"prefill": 0, "decode": 1, "padding": 2}


def add_dashboard_routes(app: FastAPI) -> None:
    app.add_api_route(DASHBOARD_PREFIX, page, methods=["GET"], include_in_schema=False)
    app.add_api_route(DASHBOARD_PREFIX + "/frame", frame, methods=["GET"], include_in_schema=False)
    app.add_api_route(DASHBOARD_PREFIX + "/events", events, methods=["GET"],
                      include_in_schema=False)
    for name, media_type in _ASSETS.items():
        app.add_api_route(f"{DASHBOARD_PREFIX}/{name}", _asset_route(name, media_type),
                          methods=["GET"], include_in_schema=False)


def _read_asset(name: str) -> bytes:
    return resources.files("conveyor.server").joinpath("static", name).read_bytes()


def _asset_route(name: str, media_type: str):
    async def asset(request: Request) -> Response:
        return Response(_read_asset(name), media_type=media_type,
                        headers={"Cache-Control": "no-cache"})
    return asset


async def page(request: Request) -> Response:
    return Response(_read_asset("dashboard.html"), media_type="text/html; charset=utf-8",
                    headers={"Cache-Control": "no-cache"})


async def frame(request: Request) -> JSONResponse:
    return JSONResponse(build_frame(app_state(request))[0])


async def events(request: Request) -> StreamingResponse:
    state = app_state(request)

    async def stream():
        yield "retry: 2000\n\n"
        last_step = -1                 # the first frame has the whole belt, later ones what is new
        while not state.draining and not await request.is_disconnected():
            body, last_step = build_frame(state, last_step)
            yield f"data: {json.dumps(body, allow_nan=False)}\n\n"
            await asyncio.sleep(FRAME_INTERVAL_S)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def build_frame(state, after_step: int = -1) -> tuple[dict, int]:
    """Everything the page shows, as plain JSON values (None where a number is undefined), with
    the belt's steps after ``after_step`` only (-1: all of it, ``belt.full``); and the last step
    index it holds (to pass as ``after_step`` next time)."""
    metrics, engine = state.metrics, state.engine
    now = metrics.belt.clock()
    minute, _ = metrics.belt.window(now)
    last, last_span = metrics.belt.window(now, RATE_WINDOW_S)
    recent = metrics.recent
    snap = engine.snapshot if engine is not None else None
    records = metrics.belt.belt(after_step)
    belt = belt_json(records, metrics.belt.num_slots, full=after_step < 0)
    return {
        "status": _status(state),
        "model": state.model_name,
        "uptime_s": now - metrics.belt.started,
        "num_running": snap.num_running if snap else 0,
        "num_waiting": snap.num_waiting if snap else 0,
        "kv": _kv(snap),
        "tokens_per_s": {"in": last.prefill_tokens / last_span,
                         "out": recent.generated_tokens.total(now, RATE_WINDOW_S) / RATE_WINDOW_S},
        "ttft_ms": percentiles_ms(recent.ttft.values(now)),
        "itl_ms": percentiles_ms(recent.itl.values(now)),
        "preemptions": {"total": snap.num_preemptions_total if snap else 0,
                        "last_minute": minute.preemptions},
        "tenants": tenant_shares(minute),
        "batch": usage_of(minute),
        "cost": cost_summary(recent, metrics.belt.started, metrics.price_per_hour, now),
        "belt": belt,
    }, records[-1].step_index if records else after_step


def _status(state) -> str:
    if state.engine is None:
        return "failed" if state.load_error else "loading"
    if state.engine.is_dead:
        return "dead"
    return "draining" if state.draining else "ok"


def _kv(snap) -> dict:
    if snap is None:
        return {"live": 0, "cached": 0, "free": 0, "total": 0, "usage": 0.0}
    live = snap.num_total_blocks - snap.num_free_blocks
    return {"live": live, "cached": snap.num_cached_free_blocks,
            "free": snap.num_free_blocks - snap.num_cached_free_blocks,
            "total": snap.num_total_blocks, "usage": snap.kv_cache_usage}


def belt_json(records, num_slots: int, full: bool = True) -> dict:
    """The belt: ``steps`` oldest first, each ``{"step", "ms", "cells": [[slot, request index,
    kind code]]}`` with kind codes ``kinds``; ``requests`` lists the request ids indexed;
    ``full``: these are all the steps kept (else only the new ones, to append)."""
    index: dict[str, int] = {}
    steps = []
    for r in records[-BELT_STEPS:]:
        cells = [[slot, index.setdefault(rid, len(index)), _KIND_CODES[kind]]
                 for slot, rid, kind in r.cells]
        steps.append({"step": r.step_index, "ms": round(1000.0 * r.duration_s, 3), "cells": cells})
    return {"num_slots": num_slots, "kinds": list(_KIND_CODES), "steps": steps,
            "requests": list(index), "full": full, "num_columns": BELT_STEPS}


def basic_key(credentials: str) -> str | None:
    """The password of HTTP Basic ``credentials`` (base64 ``user:password``): the API key a
    browser sends for the dashboard; None when they do not decode."""
    try:
        decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _, sep, password = decoded.partition(":")
    return password if sep else None


def challenge_headers(path: str) -> dict[str, str]:
    """Headers of a 401 for ``path``: dashboard pages ask the browser for Basic credentials."""
    if path == DASHBOARD_PREFIX or path.startswith(DASHBOARD_PREFIX + "/"):
        return {"WWW-Authenticate": 'Basic realm="conveyor dashboard", charset="UTF-8"'}
    return {}
