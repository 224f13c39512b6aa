"""The app factory in-process (httpx ASGI transport, lifespan running): /health while loading,
an engine failure seen over HTTP, request timeouts, and priority/tenant reaching the engine."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from engine_helpers import assert_all_blocks_free, prompt, small_engine

from conveyor.server.auth import ApiKey
from conveyor.server.app import ServerConfig, build_app, run_on_own_thread


@pytest.fixture(scope="module")
def engine():
    return small_engine()


async def _serve_in_process(app, scenario):
    """Run ``scenario(client)`` against ``app`` with its lifespan (model loading) running."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return await scenario(client)


def test_health_is_503_while_loading_then_200(engine):
    release = threading.Event()
    app = build_app(ServerConfig(), lambda: release.wait(60) and engine)

    async def scenario(client):
        loading = await client.get("/health")
        models = await client.get("/v1/models")
        release.set()
        for _ in range(200):
            ready = await client.get("/health")
            if ready.status_code == 200:
                break
            await asyncio.sleep(0.05)
        return loading, models, ready

    loading, models, ready = asyncio.run(_serve_in_process(app, scenario))
    assert loading.status_code == 503 and loading.json()["status"] == "loading"
    assert models.status_code == 503 and models.json()["error"]["code"] == "model_loading"
    assert ready.status_code == 200 and ready.json() == {"status": "ok"}


def test_model_loads_on_a_thread_that_is_gone_before_serving(engine):
    # libgomp keeps an OpenMP pool per thread that ever ran a parallel region; a loader thread that
    # lives on (an executor's) doubles the pools and slows every step of the engine thread
    loaders = []

    def load():
        loaders.append(threading.current_thread())
        return engine

    async def scenario(client):
        while (await client.get("/health")).status_code != 200:
            await asyncio.sleep(0.05)
        return threading.enumerate()

    alive = asyncio.run(_serve_in_process(build_app(ServerConfig(), load), scenario))
    (loader,) = loaders
    assert loader is not threading.main_thread() and loader.name == "conveyor-load"
    assert not loader.is_alive() and loader not in alive


def test_run_on_own_thread_returns_and_raises():
    async def both():
        value = await run_on_own_thread(lambda: threading.current_thread())
        with pytest.raises(ValueError, match="bad weights"):
            await run_on_own_thread(lambda: (_ for _ in ()).throw(ValueError("bad weights")))
        return value

    thread = asyncio.run(both())
    assert thread is not threading.main_thread() and not thread.is_alive()


def test_engine_failure_over_http_reports_errors_and_health_503(engine, monkeypatch):
    original = engine.runner.execute
    calls = []

    def execute(sched):
        calls.append(1)
        if len(calls) > 4:
            raise RuntimeError("simulated kernel crash")
        return original(sched)

    async def scenario(client):
        while (await client.get("/health")).status_code != 200:
            await asyncio.sleep(0.05)
        monkeypatch.setattr(engine.runner, "execute", execute)
        body = {"prompt": prompt(6), "max_tokens": 50, "ignore_eos": True}
        streamed, plain = await asyncio.gather(
            client.post("/v1/completions", json={**body, "stream": True}),
            client.post("/v1/completions", json=body))
        return streamed, plain, await client.get("/health"), \
            await client.post("/v1/completions", json=body)

    app = build_app(ServerConfig(), lambda: engine)
    streamed, plain, health, late = asyncio.run(_serve_in_process(app, scenario))
    monkeypatch.setattr(engine.runner, "execute", original)
    events = [e for e in streamed.text.split("\n\n") if e]
    assert streamed.status_code == 200 and events[-1] == "data: [DONE]"
    assert "simulated kernel crash" in json.loads(events[-2][6:])["error"]["message"]
    assert plain.status_code == 500 and "simulated kernel crash" in plain.json()["error"]["message"]
    assert health.status_code == 503 and health.json()["status"] == "dead"
    assert late.status_code == 503 and late.json()["error"]["code"] == "engine_dead"
    assert_all_blocks_free(engine)


def test_http_timeout_priority_and_tenant_reach_the_engine(engine, monkeypatch):
    seen = []
    original = engine.add_request

    def add_request(prompt, params, **kw):
        seen.append((kw["priority"], kw["tenant"]))
        return original(prompt, params, **kw)
    monkeypatch.setattr(engine, "add_request", add_request)

    async def scenario(client):
        while (await client.get("/health")).status_code != 200:
            await asyncio.sleep(0.05)
        body = {"prompt": prompt(6), "max_tokens": 370, "ignore_eos": True}
        timed_out = await client.post("/v1/completions", json=body,
                                      headers={"Authorization": "Bearer b", "X-Priority": "5"})
        short = {**body, "max_tokens": 2, "priority": 2}
        tagged = await client.post("/v1/completions", json=short,
                                   headers={"Authorization": "Bearer a", "X-Tenant": "acme"})
        return timed_out, tagged

    # The timeout must abort a 370-token generation yet let a 2-token one finish on a busy machine.
    # "a" is a trusted gateway (it may name the tenant); "b" is its own tenant, key1
    keys = (ApiKey("a", trusted=True), "b")
    app = build_app(ServerConfig(api_keys=keys, request_timeout=2.0), lambda: engine)
    timed_out, tagged = asyncio.run(_serve_in_process(app, scenario))
    choice = timed_out.json()["choices"][0]
    assert choice["finish_reason"] == "abort" and timed_out.json()["usage"]["completion_tokens"] < 370
    assert tagged.json()["choices"][0]["finish_reason"] == "length"
    assert seen == [(5, "key1"), (2, "acme")]
    assert_all_blocks_free(engine)


def test_tenant_limits_refuse_with_429_per_tenant_only(engine):
    async def scenario(client):
        while (await client.get("/health")).status_code != 200:
            await asyncio.sleep(0.05)
        long = {"prompt": prompt(6), "max_tokens": 120, "ignore_eos": True}
        first = asyncio.ensure_future(client.post("/v1/completions", json=long,
                                                  headers={"X-Tenant": "acme"}))
        while not engine.has_unfinished_requests():
            await asyncio.sleep(0.01)                          # acme's first request is in
        second = await client.post("/v1/completions", json=long, headers={"X-Tenant": "acme"})
        other = await client.post("/v1/completions", json={"prompt": prompt(4), "max_tokens": 2},
                                  headers={"X-Tenant": "globex"})
        await first
        after = await client.post("/v1/completions", json={"prompt": prompt(4), "max_tokens": 2},
                                  headers={"X-Tenant": "acme"})
        too_big = await client.post("/v1/completions", json={"prompt": prompt(4), "max_tokens": 300},
                                    headers={"X-Tenant": "initech"})
        return second, other, after, too_big

    app = build_app(ServerConfig(tenant_max_concurrency=1, tenant_max_tokens_per_minute=200),
                    lambda: engine)
    second, other, after, too_big = asyncio.run(_serve_in_process(app, scenario))
    assert second.status_code == 429 and second.json()["error"]["code"] == "tenant_concurrency_limit"
    assert "Retry-After" in second.headers
    assert other.status_code == 200 and after.status_code == 200
    assert too_big.status_code == 429 and too_big.json()["error"]["code"] == "tenant_token_limit"
    assert_all_blocks_free(engine)
