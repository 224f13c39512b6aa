"""``/dashboard`` in-process (httpx ASGI transport, the real small model): behind the API keys
(bearer, or HTTP Basic for browsers), the page and its assets, a frame after real requests, the
event stream's first frame, and the cost on /metrics."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import pytest
from engine_helpers import assert_all_blocks_free, small_engine

from conveyor.errors import ConfigError
from conveyor.server.app import ServerConfig, build_app

KEY = "dash-key-1"
BEARER = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def engine():
    return small_engine()


def _basic(password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"me:{password}".encode()).decode()}


async def _serve(app, scenario):
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            while (await client.get("/health")).status_code != 200:
                await asyncio.sleep(0.05)
            return await scenario(client)


def test_dashboard_is_behind_the_keys_and_takes_basic_credentials(engine):
    app = build_app(ServerConfig(api_keys=(KEY,)), lambda: engine)

    async def scenario(client):
        return {name: await client.get(path, headers=headers) for name, path, headers in (
            ("anonymous", "/dashboard", {}), ("metrics", "/metrics", {}),
            ("bearer", "/dashboard", BEARER), ("basic", "/dashboard", _basic(KEY)),
            ("wrong", "/dashboard/frame", _basic("nope")), ("garbled", "/dashboard", {
                "Authorization": "Basic %%%"}),
            ("js", "/dashboard/dashboard.js", BEARER), ("css", "/dashboard/dashboard.css", BEARER),
            ("events", "/dashboard/events", {}))}

    r = asyncio.run(_serve(app, scenario))
    assert r["anonymous"].status_code == 401
    assert r["anonymous"].headers["www-authenticate"].startswith('Basic realm="conveyor')
    assert r["metrics"].status_code == 401 and "www-authenticate" not in r["metrics"].headers
    for name in ("wrong", "garbled", "events"):
        assert r[name].status_code == 401, name
    for name in ("bearer", "basic"):
        assert r[name].status_code == 200
        assert r[name].headers["content-type"].startswith("text/html")
        for test_id in ("num-running", "num-waiting", "kv-usage", "tokens-per-s", "belt",
                        "cost-per-mtok"):
            assert f'data-testid="{test_id}"' in r[name].text
    assert r["js"].headers["content-type"].startswith("text/javascript")
    assert "EventSource" in r["js"].text and "/dashboard/events" in r["js"].text
    assert r["css"].headers["content-type"].startswith("text/css")


def test_a_frame_after_requests_has_belt_tokens_latency_and_cost(engine):
    app = build_app(ServerConfig(price_per_hour=3.6), lambda: engine)

    async def scenario(client):
        body = {"prompt": "The belt moves", "max_tokens": 6, "temperature": 0.0,
                "ignore_eos": True}
        done = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(3)))
        assert all(d.status_code == 200 for d in done)
        prompt_tokens = sum(d.json()["usage"]["prompt_tokens"] for d in done)
        frame = (await client.get("/dashboard/frame")).json()
        return frame, (await client.get("/metrics")).text, prompt_tokens

    frame, metrics, prompt_tokens = asyncio.run(_serve(app, scenario))
    recent = app.state.conveyor.metrics.recent
    assert (recent.num_generated_tokens, recent.num_prompt_tokens) == (18, prompt_tokens)
    assert frame["status"] == "ok" and frame["num_running"] == 0 and frame["num_waiting"] == 0
    belt = frame["belt"]
    assert belt["num_slots"] == 4 and len(belt["requests"]) == 3
    kinds = {belt["kinds"][k] for s in belt["steps"] for _, _, k in s["cells"]}
    assert kinds == {"prefill", "decode"}              # continuous batching: no padding
    decodes = sum(belt["kinds"][k] == "decode" for s in belt["steps"] for _, _, k in s["cells"])
    assert decodes == 3 * 5                            # 6 tokens: 1 from the prefill, 5 decodes
    assert 0 < frame["tokens_per_s"]["out"] <= 18 / 5.0     # at most 18 tokens in the 5 s window
    assert frame["ttft_ms"]["p50"] > 0 and frame["itl_ms"]["p99"] >= frame["itl_ms"]["p50"]
    assert frame["kv"]["live"] == 0 and frame["kv"]["total"] == frame["kv"]["free"] + \
        frame["kv"]["cached"]
    assert 0 < frame["batch"]["slot_utilization"] <= 1
    cost = frame["cost"]
    assert cost["price_per_hour"] == 3.6
    assert cost["since_start"]["total"] < cost["since_start"]["output"]
    assert 'conveyor:cost_per_million_tokens_usd{tokens="output",window="1m"}' in metrics
    assert 'conveyor:batch_slot_steps_total{state="useful"}' in metrics
    assert_all_blocks_free(engine)


def test_event_stream_sends_frames(engine):
    """The ASGI app driven by hand: read the first ``data:`` event, then disconnect."""
    app = build_app(ServerConfig(), lambda: engine)
    scope = {"type": "http", "method": "GET", "path": "/dashboard/events", "raw_path": b"",
             "query_string": b"", "headers": [], "http_version": "1.1", "scheme": "http",
             "server": ("app", 80), "client": ("127.0.0.1", 1), "root_path": ""}

    async def scenario(client):
        got_data, messages = asyncio.Event(), []

        async def receive():
            await got_data.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            messages.append(message)
            if b"data: " in message.get("body", b""):
                got_data.set()

        await asyncio.wait_for(app(dict(scope), receive, send), 30)
        return messages

    messages = asyncio.run(_serve(app, scenario))
    assert messages[0]["status"] == 200
    assert dict(messages[0]["headers"])[b"content-type"].startswith(b"text/event-stream")
    body = b"".join(m.get("body", b"") for m in messages[1:]).decode()
    data = [ln[len("data: "):] for ln in body.splitlines() if ln.startswith("data: ")]
    frame = json.loads(data[0])
    assert frame["status"] == "ok" and frame["cost"]["price_per_hour"] is None


def test_price_per_hour_must_be_positive():
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="price-per-hour"):
            ServerConfig(price_per_hour=bad)
