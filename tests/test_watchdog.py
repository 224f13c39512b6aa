"""The watchdog and bounded shutdown with an engine wedged inside a step: in-process (stall seen,
counted in the metrics, the drain gives up within its bound and fails the request), and as a real
server process (``/health`` 503 "stalled" beside half-open connections, SIGTERM exits within the
bound, a second SIGTERM exits at once)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time

import httpx
import pytest

from conveyor.metrics.prometheus import ServingMetrics
from conveyor.engine.async_engine import AsyncEngine
from engine_helpers import assert_all_blocks_free, greedy, prompt, small_engine
from server_process import ServerProcess
from test_connection_guard import half_open, wait_all_closed

WEDGED = os.path.join(os.path.dirname(__file__), "wedged_server.py")


def test_a_wedged_engine_is_reported_and_the_drain_is_bounded(monkeypatch):
    engine = small_engine()
    release, original = threading.Event(), engine.runner.execute

    def execute(sched):
        release.wait(120)
        return original(sched)
    monkeypatch.setattr(engine.runner, "execute", execute)

    async def scenario():
        ae = AsyncEngine(engine, watchdog_timeout=0.3, abort_grace=0.3, join_timeout=0.3)
        metrics = ServingMetrics(lambda: None, lambda: ae)
        ae.start()
        healthy = ae.is_stalled
        stream = await ae.add_request(prompt(8), greedy(4))
        for _ in range(1000):
            if ae.is_stalled:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)                 # let the periodic check count the stall
        exposition = metrics.render().decode()
        clean = await ae.drain(timeout=0.2)
        outs = [out async for out in stream]
        await ae.shutdown()
        stuck = ae.is_dead, ae._thread.is_alive()
        release.set()
        await asyncio.to_thread(ae._thread.join, 60)
        return healthy, exposition, clean, outs, stuck, ae.num_stalls

    healthy, exposition, clean, outs, stuck, num_stalls = asyncio.run(scenario())
    assert not healthy and num_stalls == 1 and stuck == (False, True)
    assert re.search(r"^conveyor:engine_stalled 1\.0$", exposition, re.M)
    assert re.search(r"^conveyor:engine_stalls_total 1\.0$", exposition, re.M)
    assert not clean and len(outs) == 1 and outs[0].outputs[0].finish_reason == "error"
    assert "shutdown timeout" in outs[0].error
    assert_all_blocks_free(engine)


def _stream_lines(url: str, lines: list[str]) -> None:
    body = {"prompt": "Hello", "max_tokens": 4, "stream": True}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as resp:
            lines.append(str(resp.status_code))
            lines.extend(resp.iter_lines())
    except httpx.HTTPError as exc:
        lines.append(f"client error: {exc!r}")


def _wedge(server: ServerProcess) -> tuple[threading.Thread, list[str]]:
    lines: list[str] = []
    thread = threading.Thread(target=_stream_lines, args=(server.url, lines), daemon=True)
    thread.start()
    return thread, lines


def _wait_health(server: ServerProcess, status: str) -> httpx.Response:
    for _ in range(600):
        resp = httpx.get(server.url + "/health", timeout=30)
        if resp.json()["status"] == status:
            return resp
        time.sleep(0.1)
    raise AssertionError(f"/health never said {status}: {resp.text}")


@pytest.fixture(scope="module")
def wedged_servers(tiny_llama_dir):
    flags = ("--model", tiny_llama_dir, "--max-model-len", "256", "--num-kv-blocks", "32",
             "--watchdog-timeout", "1")
    procs = {"bounded": ServerProcess(*flags, "--shutdown-timeout", "1", "--header-timeout", "2",
                                      "--max-connections", "64", script=WEDGED),
             "patient": ServerProcess(*flags, "--shutdown-timeout", "600", script=WEDGED)}
    yield procs
    for proc in procs.values():
        proc.stop()


def test_wedged_server_says_stalled_and_sigterm_exits_within_the_bound(wedged_servers):
    server = wedged_servers["bounded"].wait_healthy()
    socks = [half_open(server.port, i) for i in range(100)]    # beyond --max-connections 64
    client, lines = _wedge(server)
    stalled = _wait_health(server, "stalled")
    exposition = httpx.get(server.url + "/metrics", timeout=30).text
    still_open = wait_all_closed(socks)
    for sock in socks:
        sock.close()
    server.proc.send_signal(signal.SIGTERM)
    returncode = server.proc.wait(60)
    client.join(30)
    assert stalled.status_code == 503 and "--watchdog-timeout 1" in stalled.json()["error"]
    assert re.search(r"^conveyor:engine_stalled 1\.0$", exposition, re.M)
    assert not still_open
    assert returncode == 1, server.output()
    lines = [line for line in lines if line]
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert lines[0] == "200" and lines[-1] == "data: [DONE]"
    assert "shutdown timeout" in events[-1]["error"]["message"]


def test_a_second_sigterm_exits_at_once(wedged_servers):
    server = wedged_servers["patient"].wait_healthy()
    _wedge(server)
    _wait_health(server, "stalled")
    server.proc.send_signal(signal.SIGTERM)
    _wait_health(server, "stalled")            # draining (up to 600 s), still answering
    refused = httpx.post(server.url + "/v1/completions", json={"prompt": "late"}, timeout=30)
    server.proc.send_signal(signal.SIGTERM)
    returncode = server.proc.wait(30)
    assert refused.status_code == 503
    assert returncode == 128 + signal.SIGTERM, server.output()
