"""``conveyor bench soak``: a short soak against a real ``conveyor serve`` (tiny random model)
passes every check and counts every kind of client; against a broken server (5xx answers, a
held KV block, an unhealthy /health) the verdict fails; only loopback targets are accepted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn
from server_process import ServerProcess, free_port
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from conveyor.bench.soak import SoakConfig, SoakReport, evaluate, parse_duration, run_soak
from conveyor.bench.soak_clients import Kind, Outcome
from conveyor.errors import InvalidRequestError


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    # A small token budget keeps the set of GEMM shapes (and so oneDNN's primitive caches) small,
    # so RSS settles within a short warm-up.
    proc = ServerProcess("--model", tiny_llama_dir, "--max-model-len", "256",
                         "--num-kv-blocks", "64", "--max-num-seqs", "4",
                         "--max-num-batched-tokens", "32", "--max-body-bytes", "65536",
                         omp_threads=1)
    try:
        yield proc.wait_healthy()
    finally:
        proc.stop()


def test_soak_against_a_real_server_passes_and_counts_every_kind(server, tmp_path):
    cmd = [sys.executable, "-m", "conveyor.cli", "bench", "soak", "--base-url", server.url,
           "--duration", "10s", "--warmup", "3s", "--max-warmup", "8s", "--concurrency", "4",
           "--server-pid", str(server.proc.pid), "--max-body-bytes", "65536",
           "--timeout", "60", "--output-dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    report = json.loads((tmp_path / "soak.json").read_text())
    assert done.returncode == 0, done.stdout + done.stderr + server.output()
    assert report["passed"] and "[ok] no request lost" in done.stdout
    counts = report["counts"]
    assert all(counts[k.value][Outcome.FAILED.value] == 0 for k in Kind)
    assert counts["valid"]["completed"] >= 1 and counts["slow_reader"]["completed"] >= 1
    assert counts["invalid"]["refused"] >= 1 and counts["bad_json"]["refused"] >= 1
    assert counts["oversize"]["refused"] >= 1 and counts["cancelled"]["cancelled"] >= 1
    assert report["kv_free_blocks"] == report["kv_total_blocks"] == 64
    assert report["rss_after_warmup"] > 0 and report["health_status"] == 200
    assert httpx.get(server.url + "/health").status_code == 200


def _broken_app() -> Starlette:
    """Lists a model, then answers every request with 500; one KV block stays held."""
    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def metrics(request):
        return PlainTextResponse("conveyor:num_requests_running 0.0\n"
                                 "conveyor:num_requests_waiting 0.0\n"
                                 "conveyor:kv_cache_free_blocks 63.0\n"
                                 "conveyor:kv_cache_total_blocks 64.0\n"
                                 "process_resident_memory_bytes 1.0e8\n")

    async def health(request):
        return JSONResponse({"status": "dead"}, status_code=503)

    async def fail(request):
        return JSONResponse({"error": {"message": "boom"}}, status_code=500)

    return Starlette(routes=[Route("/v1/models", models), Route("/metrics", metrics),
                             Route("/health", health),
                             Route("/{path:path}", fail, methods=["POST"])])


@contextlib.contextmanager
def _serving(app):
    """``app`` served by uvicorn on a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_soak_fails_on_5xx_a_held_block_and_bad_health():
    with _serving(_broken_app()) as url:
        report = run_soak(SoakConfig(url, duration_s=1.0, concurrency=2, warmup_s=0.5,
                                     max_warmup_s=0.5, timeout_s=10.0), log=lambda _: None)
    checks = {c.name: c.passed for c in report.checks}
    assert not report.passed
    assert checks == {"no request lost": False, "KV blocks all free": False, "RSS flat": True,
                      "/health 200": False}
    assert report.counts["valid"]["failed"] >= 1 and report.failures
    assert any("HTTP 500" in f["detail"] for f in report.failures)


def test_verdict_fails_on_rss_growth_and_missing_readings():
    base = dict(num_requests=10, kv_free_blocks=8, kv_total_blocks=8, health_status=200,
                counts={k.value: {o.value: 0 for o in Outcome} for k in Kind})
    ok = SoakReport(config={}, rss_after_warmup=1000, rss_final=1099, **base)
    grown = SoakReport(config={}, rss_after_warmup=1000, rss_final=1101, **base)
    unread = SoakReport(config={}, **base)
    assert all(c.passed for c in evaluate(ok, 0.10))
    assert [c.name for c in evaluate(grown, 0.10) if not c.passed] == ["RSS flat"]
    assert [c.name for c in evaluate(unread, 0.10) if not c.passed] == ["RSS flat"]
    nothing = SoakReport(config={}, rss_after_warmup=1, rss_final=1,
                         **{**base, "num_requests": 0})
    assert [c.name for c in evaluate(nothing, 0.10) if not c.passed] == ["no request lost"]


def test_durations_and_loopback_only():
    assert parse_duration("20m") == 1200 and parse_duration("15s") == 15
    assert parse_duration("1h") == 3600 and parse_duration("90") == 90
    for bad in ("", "m", "-5s", "0", "ten"):
        with pytest.raises(InvalidRequestError):
            parse_duration(bad)
    for url in ("http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:8000"):
        SoakConfig(url, duration_s=1)
    for url in ("http://10.0.0.1:8000", "http://example.com", "http://0.0.0.0:8000"):
        with pytest.raises(InvalidRequestError, match="only targets a server on this machine"):
            SoakConfig(url, duration_s=1)


def _trickling_app(events: int, pause: float) -> Starlette:
    """Streams ``events`` SSE events ``pause`` seconds apart and never sends [DONE]."""
    from starlette.responses import StreamingResponse

    async def trickle(request):
        async def body():
            for i in range(events):
                yield f"data: {{\"i\": {i}}}\n\n".encode()
                await asyncio.sleep(pause)
            await asyncio.sleep(3600)
        return StreamingResponse(body(), media_type="text/event-stream")

    return Starlette(routes=[Route("/{path:path}", trickle, methods=["POST"])])


def test_a_timed_out_request_names_its_case_and_how_far_it_got():
    import random

    from conveyor.bench.soak_clients import SoakTarget, run_client
    with _serving(_trickling_app(3, 0.05)) as url:
        target = SoakTarget(url, "m", None, 1 << 16, timeout_s=1.5)

        async def one():
            async with httpx.AsyncClient() as client:
                return await run_client(Kind.SLOW_READER, client, target, random.Random(0))
        result = asyncio.run(one())
    assert result.outcome is Outcome.FAILED and result.status == 200
    assert result.case.endswith("slow reader") and result.started > 0
    assert "no complete answer within 2 s" in result.detail
    assert "HTTP 200 after" in result.detail and "3 event(s)" in result.detail


def test_an_oversubscribed_machine_is_named_in_the_report():
    from conveyor.bench.soak import format_report, load_note
    quiet = SoakReport(config={}, num_cpus=2, load_samples=[(0.0, 1.5), (5.0, 2.0)])
    busy = SoakReport(config={}, num_cpus=2, load_samples=[(0.0, 9.0), (5.0, 12.0)])
    assert load_note(quiet) is None and load_note(SoakReport(config={})) is None
    note = load_note(busy)
    assert note and "mean 10.5, peak 12.0 on 2 CPUs" in note
    assert note in format_report(busy)
