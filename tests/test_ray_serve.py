"""conveyor on Ray Serve: a real local Ray instance, 2 engine replicas (1 CPU each), the default
model; the OpenAI client against the front door, per-replica /metrics and /health, a replica
SIGKILLed mid-stream, and ``conveyor serve --replicas 2`` as a process."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'conveyor[ray]')")
serve = pytest.importorskip("ray.serve")

from server_process import ServerProcess, free_port  # noqa: E402

pytestmark = pytest.mark.slow
ENGINE = {"num_blocks": 192, "dtype": "float32", "max_num_seqs": 8}


@pytest.fixture(scope="module")
def front_door():
    from conveyor.ray.app import build_app
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(ENGINE, {}, num_replicas=2, report_interval_s=0.5),
                  name="conveyor", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, 2)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def _health(url: str) -> tuple[int, dict]:
    r = httpx.get(url + "/health", timeout=10)
    return r.status_code, r.json()


def _wait_healthy(url: str, count: int, exclude: str | None = None, deadline_s: float = 240):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        status, body = _health(url)
        healthy = [r for r, v in body["replicas"].items() if v["status"] == "ok" and r != exclude]
        if len(healthy) >= count:
            return body
        time.sleep(0.5)
    raise AssertionError(f"not {count} healthy replicas: {body}")


def _client(url: str):
    from openai import OpenAI
    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_client_completions_and_chat(front_door):
    client = _client(front_door)
    model = client.models.list().data[0].id
    done = client.completions.create(model=model, prompt="The capital of France is",
                                     max_tokens=6, temperature=0)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 6
    again = client.completions.create(model=model, prompt="The capital of France is",
                                      max_tokens=6, temperature=0)
    assert again.choices[0].text == done.choices[0].text       # greedy: same on any replica
    chat = client.chat.completions.create(model=model, max_tokens=5, temperature=0,
                                          messages=[{"role": "user", "content": "Say hi"}])
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 5
    pieces = [c.choices[0].text for c in client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=6, temperature=0,
        stream=True) if c.choices]
    assert "".join(pieces) == done.choices[0].text
    deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=model, max_tokens=5, temperature=0, stream=True,
        messages=[{"role": "user", "content": "Say hi"}]) if c.choices]
    assert "".join(deltas) == chat.choices[0].message.content


def test_bad_request_is_the_single_servers_error(front_door):
    r = httpx.post(front_door + "/v1/completions", json={"prompt": "x", "max_tokens": -1},
                   timeout=30)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "max_tokens"
    r = httpx.post(front_door + "/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_both_replicas_serve_and_report_metrics(front_door):
    seen = set()
    for _ in range(16):
        r = httpx.post(front_door + "/v1/completions", timeout=60,
                       json={"prompt": "Hello", "max_tokens": 1})
        assert r.status_code == 200
        seen.add(r.headers["x-conveyor-replica"])
    assert len(seen) == 2
    time.sleep(1.5)                                   # two report intervals
    text = httpx.get(front_door + "/metrics", timeout=30).text
    assert "conveyor:ray_replicas_healthy 2.0" in text
    for replica in seen:
        assert f'replica="{replica}"' in text
    from prometheus_client.parser import text_string_to_metric_families
    families = {f.name: f for f in text_string_to_metric_families(text)}
    served = {s.labels["replica"]: s.value for s in families["conveyor:generation_tokens"].samples
              if s.name.endswith("_total")}
    assert set(served) == seen and all(v >= 1 for v in served.values())


def test_sigkill_mid_stream_then_recovery(front_door):
    with httpx.stream("POST", front_door + "/v1/completions", timeout=120,
                      json={"prompt": "Tell me a long story.", "max_tokens": 1500,
                            "ignore_eos": True, "stream": True}) as stream:
        assert stream.status_code == 200
        victim = stream.headers["x-conveyor-replica"]
        pid = _health(front_door)[1]["replicas"][victim]["pid"]
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        os.kill(pid, signal.SIGKILL)
        events = [line[6:] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "replica_failed" and error["type"]
    for _ in range(4):                               # new requests go to live replicas
        r = httpx.post(front_door + "/v1/completions", timeout=60,
                       json={"prompt": "Hello", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert r.headers["x-conveyor-replica"] != victim
    body = _wait_healthy(front_door, 2, exclude=victim)      # Serve brings one back
    assert body["status"] == "ok"


def test_cli_serve_replicas_answers_and_exits_on_sigterm():
    server = ServerProcess("--replicas", "2", "--num-kv-blocks", "128", omp_threads=1)
    try:
        server.wait_healthy(timeout=300)
        r = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"prompt": "Hello", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        server.terminate()
        assert server.proc.wait(120) == 0, server.output()
    finally:
        server.stop()


@pytest.mark.parametrize("flags, message", [
    (["--replicas", "-1"], "replicas"),
    (["--replicas", "2", "--autoscaling-config", "[1]"], "JSON object"),
    (["--replicas", "2", "--autoscaling-config", '{"max_replica": 3}'], "unknown key"),
    (["--replicas", "2", "--replica-num-cpus", "0"], "replica_num_cpus"),
])
def test_bad_ray_flags_are_one_line_errors(flags, message):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "conveyor.cli", "serve", *flags],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
