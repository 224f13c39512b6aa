"""The HTTP load generator against a tiny fake OpenAI-compatible SSE server started in the test."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from conveyor.bench.console import engine_line
from conveyor.bench.http_client import (
    ServerError,
    completion_payload,
    request_headers,
    run_http,
)
from conveyor.bench.metrics import summarize
from conveyor.bench.report import run_entry
from conveyor.bench.workloads import BenchRequest, Workload
from conveyor.errors import InvalidRequestError


def _fake_app(seen: dict) -> FastAPI:
    """Streams max_tokens chunks ("t0 ", "t1 ", ...), then an empty finish chunk, then usage
    (unless the model is "no-usage"). Model "fail" answers HTTP 400; "midway" sends an error event."""
    app = FastAPI()
    state = {"in_flight": 0}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        seen.setdefault("bodies", []).append(body)
        seen.setdefault("tenants", []).append(request.headers.get("x-tenant"))
        if body["model"] == "fail":
            return JSONResponse({"error": {"message": "no such model"}}, status_code=400)

        async def events():
            state["in_flight"] += 1
            seen["max_in_flight"] = max(seen.get("max_in_flight", 0), state["in_flight"])
            try:
                for i in range(body["max_tokens"]):
                    await asyncio.sleep(0.002)
                    if body["model"] == "midway" and i == 1:
                        yield "data: " + json.dumps({"error": {"message": "engine died"}}) + "\n\n"
                        return
                    yield "data: " + json.dumps({"choices": [{"index": 0, "text": f"t{i} "}]}) + "\n\n"
                yield "data: " + json.dumps({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}) + "\n\n"
                if body["model"] != "no-usage" and body.get("stream_options", {}).get("include_usage"):
                    usage = {"prompt_tokens": 7, "completion_tokens": body["max_tokens"],
                             "total_tokens": 0, "prompt_tokens_details": {"cached_tokens": 4}}
                    yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                state["in_flight"] -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def fake_server():
    seen: dict = {}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_fake_app(seen), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "fake server did not start"
    yield f"http://127.0.0.1:{port}", seen
    server.should_exit = True
    thread.join(timeout=10)


def _workload(max_tokens: list[int]) -> Workload:
    reqs = [BenchRequest(str(i), "hello world", 2, m, arrival_s=0.0, prompt_token_ids=[1, 2])
            for i, m in enumerate(max_tokens)]
    return Workload("t", reqs)


def test_token_counts_from_usage_are_exact(fake_server):
    url, seen = fake_server
    run = run_http(url, _workload([3, 5, 1, 8]), progress=False)
    assert run.config["model"] == "fake-model"          # read from /v1/models
    assert 0 < run.config["client_cpu_s"] < 60          # the load generator's own CPU time
    assert "load generator CPU" in engine_line(run_entry(run))
    assert [r.error for r in run.records] == [""] * 4
    assert [r.output_len for r in run.records] == [3, 5, 1, 8]
    assert [len(r.chunk_times) for r in run.records] == [3, 5, 1, 8]
    assert all(r.prompt_len == 7 for r in run.records)     # the server's usage wins
    for r in run.records:
        assert r.arrival <= r.first_token == r.chunk_times[0] <= r.chunk_times[-1] <= r.finish
    body = seen["bodies"][-1]
    assert body["stream"] is True and body["ignore_eos"] is True
    assert body["stream_options"] == {"include_usage": True} and body["prompt"] == "hello world"
    s = summarize(run.records)
    assert (s.completed, s.total_output_tokens) == (4, 17)


def test_token_counts_without_usage_count_content_chunks(fake_server):
    url, _ = fake_server
    run = run_http(url, _workload([4, 2]), model="no-usage", progress=False)
    assert [r.output_len for r in run.records] == [4, 2]   # the empty finish chunk is not a token
    assert [r.prompt_len for r in run.records] == [2, 2]
    assert [r.cached_tokens for r in run.records] == [None, None]
    assert run_entry(run)["cached_tokens"] is None


def test_tenants_priorities_and_cached_tokens_travel(fake_server):
    url, seen = fake_server
    reqs = [BenchRequest(str(i), "hi", 2, 2, tenant=t, priority=p)
            for i, (t, p) in enumerate([("a", 0), ("b", 1), ("", 0)])]
    start = len(seen["bodies"])
    run = run_http(url, Workload("t", reqs), progress=False)
    bodies = seen["bodies"][start:]
    assert len(bodies) == 3
    assert sorted(b.get("priority", 0) for b in bodies) == [0, 0, 1]
    assert sum("priority" in b for b in bodies) == 1          # left out at priority 0
    assert sorted(seen["tenants"][start:], key=str) == sorted(["a", "b", None], key=str)
    assert [(r.tenant, r.priority, r.cached_tokens) for r in run.records] == [
        ("a", 0, 4), ("b", 1, 4), ("", 0, 4)]
    entry = run_entry(run)
    assert entry["cached_tokens"] == 12 and entry["prefix_cache"] is None
    assert set(entry["groups"]) == {"tenant", "priority"}
    assert set(entry["groups"]["tenant"]) == {"", "a", "b"}
    assert entry["groups"]["priority"]["1"]["completed"] == 1


def test_errors_are_recorded_not_raised(fake_server):
    url, _ = fake_server
    run = run_http(url, _workload([3]), model="fail", progress=False)
    assert run.records[0].error.startswith("HTTP 400") and not run.records[0].success
    run = run_http(url, _workload([5]), model="midway", progress=False)
    assert "engine died" in run.records[0].error and not run.records[0].success


def test_max_concurrency_and_token_ids(fake_server):
    url, seen = fake_server
    seen["max_in_flight"] = 0
    run = run_http(url, _workload([6] * 6), model="fake-model", max_concurrency=2,
                   send_token_ids=True, progress=False)
    assert all(r.success and r.output_len == 6 for r in run.records)
    assert 1 <= seen["max_in_flight"] <= 2
    assert seen["bodies"][-1]["prompt"] == [1, 2]


def test_unreachable_server_and_missing_model_list():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]        # closed again: nothing listens here
    with pytest.raises(ServerError, match="--model"):
        run_http(f"http://127.0.0.1:{port}", _workload([1]), progress=False)
    run = run_http(f"http://127.0.0.1:{port}", _workload([1]), model="m", progress=False)
    assert run.records[0].error.startswith("ConnectError")
    with pytest.raises(InvalidRequestError, match="http"):
        run_http("ftp://127.0.0.1", _workload([1]), model="m", progress=False)


def test_payload_shape():
    req = BenchRequest("0", "text", 1, 9, prompt_token_ids=[4])
    assert completion_payload(req, "m") == {
        "model": "m", "prompt": "text", "max_tokens": 9, "temperature": 0.0, "stream": True,
        "stream_options": {"include_usage": True}, "ignore_eos": True}
    assert completion_payload(req, "m", send_token_ids=True)["prompt"] == [4]
    assert request_headers(req) == {}
    urgent = BenchRequest("1", "text", 1, 9, priority=-2, tenant="acme")
    assert completion_payload(urgent, "m")["priority"] == -2
    assert request_headers(urgent) == {"X-Tenant": "acme"}


def test_cli_bench_serve_sweep_writes_a_report(fake_server, tmp_path):
    import json as _json

    from conveyor.cli import main
    url, seen = fake_server
    rc = main(["bench", "serve", "--base-url", url, "--tokenizer", "none", "--num-prompts", "4",
               "--prompt-len", "5", "--output-len", "3,6", "--request-rate", "50,inf",
               "--max-concurrency", "3", "--goodput", "ttft:60000", "--output-dir", str(tmp_path),
               "--no-progress", "--no-plots"])
    assert rc == 0
    report = _json.loads((tmp_path / "report.json").read_text())
    assert report["meta"]["mode"] == "serve" and report["meta"]["server"]["model"] == "fake-model"
    assert [r["request_rate"] for r in report["runs"]] == [50.0, "inf"]
    for run in report["runs"]:
        s = run["summary"]
        assert (s["completed"], s["total_output_tokens"]) == (4, 18)   # 2 x 3 + 2 x 6 tokens
        assert s["goodput"] == pytest.approx(s["request_throughput"]) and run["batch"] is None
    assert isinstance(seen["bodies"][-1]["prompt"], list) and len(seen["bodies"][-1]["prompt"]) == 5


def _raw_server_answer(answer: bytes, body: dict | None = None, base_url_path: str = ""):
    """Serve ``answer`` verbatim (then close) to one POST; returns (events, status, request)."""
    from conveyor.bench.sse_stream import Endpoint, StreamingPost
    seen = {}

    async def main():
        async def handle(reader, writer):
            seen["request"] = await reader.readuntil(b"\r\n\r\n")
            length = int(seen["request"].split(b"Content-Length: ")[1].split(b"\r\n")[0])
            seen["body"] = await reader.readexactly(length)
            for i in range(0, len(answer), 7):          # dribble: frames split anywhere
                writer.write(answer[i:i + 7])
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        endpoint = Endpoint.parse(f"http://127.0.0.1:{port}{base_url_path}")
        post = StreamingPost(endpoint, "/v1/completions", body or {"a": 1}, {"X-Tenant": "t"})
        async with server, post as resp:
            if resp.status != 200:
                return [await resp.read()], resp.status
            return [e async for e in resp.events()], resp.status

    events, status = asyncio.run(main())
    return events, status, seen


def _chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def test_sse_client_undoes_chunking_split_lines_and_crlf():
    body = _chunked(b"data: {\"x\": 1}\n\nda", b"ta: {\"x\": 2}\r\n\r\n: comment\n\n",
                    b"event: e\ndata:[DONE]\n\n")
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
    events, status, seen = _raw_server_answer(head + body, base_url_path="/prefix/")
    assert status == 200 and events == [b'{"x": 1}', b'{"x": 2}', b"[DONE]"]
    assert seen["request"].startswith(b"POST /prefix/v1/completions HTTP/1.1\r\n")
    assert b"X-Tenant: t\r\n" in seen["request"] and json.loads(seen["body"]) == {"a": 1}


def test_sse_client_reads_length_and_close_delimited_bodies():
    payload = b"data: one\n\ndata: two\n\n"
    with_length = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload
    assert _raw_server_answer(with_length)[0] == [b"one", b"two"]
    until_close = b"HTTP/1.0 200 OK\r\n\r\n" + payload + b"data: last"     # no final newline
    assert _raw_server_answer(until_close)[0] == [b"one", b"two", b"last"]
    error = b'HTTP/1.1 429 Too Many Requests\r\nContent-Length: 9\r\n\r\n{"e": 42}'
    assert _raw_server_answer(error)[:2] == ([b'{"e": 42}'], 429)


def test_sse_client_rejects_broken_framing():
    from conveyor.bench.sse_stream import HTTPStreamError
    with pytest.raises(HTTPStreamError, match="not an HTTP answer"):
        _raw_server_answer(b"SSH-2.0-OpenSSH\r\n\r\n")
    with pytest.raises(HTTPStreamError, match="chunk size"):
        _raw_server_answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    with pytest.raises(HTTPStreamError, match="closed before the end"):
        _raw_server_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\ndata: x\n\n")
