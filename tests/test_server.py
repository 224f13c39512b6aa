"""The HTTP server as a real process: OpenAI shapes and usage, streaming == non-streaming,
48 concurrent streams with clients leaving, every bad input's status, a full queue, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal

import httpx
import openai
import pytest

from server_process import ServerProcess, child_pids, processes_mentioning

KEYS = ("sk-test-one", "sk-test-two")
AUTH = {"Authorization": f"Bearer {KEYS[1]}"}
MAX_MODEL_LEN = 512
MAX_BODY = 65536


@pytest.fixture(scope="module")
def servers():
    """Both servers start together (loading overlaps); each test waits for the one it needs.
    "small" runs one request at a time with one waiting: the full-queue and SIGTERM tests."""
    procs = {
        "main": ServerProcess("--max-num-seqs", "16", "--num-kv-blocks", "256",
                              "--max-model-len", str(MAX_MODEL_LEN), "--max-body-bytes",
                              str(MAX_BODY), "--api-key", KEYS[0], "--api-key", KEYS[1]),
        # --shutdown-timeout 20: long enough for a 16-token request on a loaded 2-core machine,
        # too short for a 4,000-token one on a fast CPU
        "small": ServerProcess("--max-num-seqs", "1", "--max-waiting-requests", "1",
                               "--num-kv-blocks", "280", "--max-model-len", "4200",
                               "--shutdown-timeout", "20"),
    }
    yield procs
    for proc in procs.values():
        proc.terminate()
    for proc in procs.values():
        proc.stop()


@pytest.fixture(scope="module")
def main_server(servers):
    return servers["main"].wait_healthy()


@pytest.fixture(scope="module")
def client(main_server):
    return openai.OpenAI(base_url=main_server.url + "/v1", api_key=KEYS[0], max_retries=0)


@pytest.fixture(scope="module")
def tokenizer():
    from conveyor.tokenizer import load_tokenizer
    from conveyor.weights.loader import default_model_path
    return load_tokenizer(default_model_path())


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    assert m, f"{name}{labels} missing from /metrics"
    return float(m.group(1))


def successes(text: str, reason: str) -> float:
    label = f'{{finished_reason="{reason}"}}'
    return metric(text, "conveyor:request_success_total", label) if label in text else 0.0


def test_streaming_equals_non_streaming_and_usage(client, tokenizer):
    model = client.models.list().data[0].id
    kw = dict(model=model, prompt="The best thing about the ocean is", max_tokens=24,
              temperature=0.8, seed=42)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == full.choices[0].text and len(streamed) > 0
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert full.usage.prompt_tokens == len(tokenizer.encode(kw["prompt"]))
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    messages = [{"role": "user", "content": "Name three colours."}]
    chat_kw = dict(model=model, messages=messages, max_tokens=20, temperature=0.8, seed=42)
    chat = client.chat.completions.create(**chat_kw)
    chat_stream = "".join(c.choices[0].delta.content or ""
                          for c in client.chat.completions.create(**chat_kw, stream=True))
    assert chat_stream == chat.choices[0].message.content and chat.choices[0].message.role == "assistant"
    template = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert chat.usage.prompt_tokens == len(tokenizer.encode(template)) > 20


def test_usage_n_logprobs_and_vllm_extras(client):
    model = client.models.list().data[0].id
    out = client.completions.create(model=model, prompt="Count: 1, 2,", max_tokens=7, n=3, seed=1, logprobs=2,
                                    extra_body={"ignore_eos": True, "top_k": 20, "min_p": 0.01})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    for c in out.choices:
        assert c.finish_reason == "length" and len(c.logprobs.tokens) == 7
        assert all(len(top) == 2 for top in c.logprobs.top_logprobs)
    assert out.usage.completion_tokens == 21
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}],
        max_completion_tokens=5, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 3 for t in content)
    stopped = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0,
                                        stop=[" 6"])
    assert stopped.choices[0].finish_reason == "stop" and " 6" not in stopped.choices[0].text


def test_concurrent_streams_with_clients_leaving(main_server):
    rng = random.Random(7)
    cancel_after = {i: rng.randint(0, 4) for i in rng.sample(range(48), 12)}

    async def one(client: httpx.AsyncClient, i: int) -> int | None:
        cancelled = i in cancel_after
        body = {"prompt": f"Story {i}: once", "stream": True, "ignore_eos": True,
                "max_tokens": 200 if cancelled else 8 + i % 25, "temperature": 0.7, "seed": i,
                "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            events = 0
            async for line in resp.aiter_lines():
                if cancelled and events >= cancel_after[i]:
                    return None     # leaving the block closes the connection mid-stream
                if line.startswith("data: ") and line != "data: [DONE]":
                    events += 1
                    event = json.loads(line[6:])
                    if event.get("usage"):
                        return event["usage"]["completion_tokens"]
        raise AssertionError(f"request {i} ended without usage")

    async def run():
        async with httpx.AsyncClient(base_url=main_server.url, headers=AUTH, timeout=120) as c:
            before = (await c.get("/metrics")).text
            results = await asyncio.gather(*(one(c, i) for i in range(48)))
            for _ in range(200):
                after = (await c.get("/metrics")).text
                if metric(after, "conveyor:num_requests_running") == 0 and \
                        metric(after, "conveyor:num_requests_waiting") == 0:
                    break
                await asyncio.sleep(0.05)
            return before, results, after

    before, results, after = asyncio.run(run())
    for i, tokens in enumerate(results):
        assert tokens == (None if i in cancel_after else 8 + i % 25), i
    assert metric(after, "conveyor:num_requests_running") == 0
    assert metric(after, "conveyor:num_requests_waiting") == 0
    total = metric(after, "conveyor:kv_cache_total_blocks")
    assert metric(after, "conveyor:kv_cache_free_blocks") == total == 256
    for reason, expected in (("length", 36), ("abort", 12)):
        assert successes(after, reason) - successes(before, reason) == expected
    delta = lambda name: metric(after, name) - metric(before, name)  # noqa: E731
    assert delta("conveyor:e2e_request_latency_seconds_count") == 48
    # the step-cost model was fitted on this server's steps (no target set: no target gauge)
    assert delta("conveyor:step_cost_fitted_steps") > 0
    assert metric(after, "conveyor:step_time_measured_seconds") > 0
    assert metric(after, "conveyor:step_cost_coefficient_seconds", '{term="per_token"}') >= 0
    assert "conveyor:step_time_target_seconds" not in after
    assert 36 <= delta("conveyor:time_to_first_token_seconds_count") <= 48
    assert delta("conveyor:inter_token_latency_seconds_count") >= sum(
        7 + i % 25 for i in range(48) if i not in cancel_after)
    assert metric(after, "conveyor:generation_tokens_total") - \
        metric(before, "conveyor:generation_tokens_total") >= sum(8 + i % 25 for i in range(48)
                                                                   if i not in cancel_after)


BAD_INPUTS = [
    ("malformed json", b'{"prompt": "hi",', {}, 400, "not valid JSON"),
    ("non-object body", b'["hi"]', {}, 400, "must be a JSON object"),
    ("empty prompt", {"prompt": ""}, {}, 400, "prompt must not be empty"),
    ("prompt beyond context", {"prompt": "hello " * 600}, {}, 400, "context length is 512"),
    ("negative max_tokens", {"prompt": "hi", "max_tokens": -3}, {}, 400, "max_tokens must be >= 1"),
    ("huge max_tokens", {"prompt": "hi", "max_tokens": 10**9}, {}, 400, "exceeds the context length"),
    ("bad temperature", {"prompt": "hi", "temperature": -0.5}, {}, 400, "temperature must be >= 0"),
    ("bad top_p", {"prompt": "hi", "top_p": 1.5}, {}, 400, "top_p must be <= 1"),
    ("too many stops", {"prompt": "hi", "stop": [str(i) for i in range(17)]}, {}, 400,
     "at most 16 stop strings"),
    ("long stop", {"prompt": "hi", "stop": ["x" * 257]}, {}, 400, "at most 256 characters"),
    ("unknown field", {"prompt": "hi", "best_of": 2}, {}, 400, "unsupported field 'best_of'"),
    ("string for int", {"prompt": "hi", "max_tokens": "5"}, {}, 400, "'max_tokens'"),
    ("too many logprobs", {"prompt": "hi", "logprobs": 21}, {}, 400, "logprobs must be at most 20"),
    ("n above max", {"prompt": "hi", "n": 9}, {}, 400, "n must be at most 8"),
    ("NaN", b'{"prompt": "hi", "temperature": NaN}', {}, 400, "NaN"),
    ("bad priority header", {"prompt": "hi"}, {"X-Priority": "high"}, 400, "X-Priority"),
    ("unknown model", {"prompt": "hi", "model": "gpt-4o"}, {}, 404, "does not exist"),
    ("wrong api key", {"prompt": "hi"}, {"Authorization": "Bearer sk-nope"}, 401, "API key"),
    ("missing api key", {"prompt": "hi"}, {"Authorization": ""}, 401, "API key"),
    ("oversized body", {"prompt": "x" * (MAX_BODY + 10)}, {}, 413, "larger than 65536 bytes"),
]


@pytest.mark.parametrize("body,headers,status,message", [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_its_status_and_the_server_still_answers(main_server, body, headers,
                                                                 status, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.post(main_server.url + "/v1/completions", content=content,
                      headers={**AUTH, "Content-Type": "application/json", **headers}, timeout=30)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert message in error["message"] and set(error) == {"message", "type", "param", "code"}
    ok = httpx.post(main_server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                    headers=AUTH, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2


def test_streamed_oversized_body_and_health_without_key(main_server):
    def body():
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"y" * 8192          # no Content-Length: chunked, counted as it arrives
        yield b'"}'
    resp = httpx.post(main_server.url + "/v1/completions", content=body(), headers=AUTH, timeout=30)
    assert resp.status_code == 413 and "larger than" in resp.json()["error"]["message"]
    assert httpx.get(main_server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(main_server.url + "/metrics").status_code == 401
    assert httpx.get(main_server.url + "/v1/models").status_code == 401


def test_full_queue_gets_429_with_retry_after(servers):
    server = servers["small"].wait_healthy()

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            body = {"prompt": "flood", "max_tokens": 24, "ignore_eos": True}
            responses = await asyncio.gather(*(c.post("/v1/completions", json=body)
                                               for _ in range(8)))
            after = await c.post("/v1/completions", json={**body, "max_tokens": 2})
            return responses, after

    responses, after = asyncio.run(run())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.headers["Retry-After"] == "1"
    assert rejected.json()["error"]["type"] == "rate_limit_error"
    for r in responses:
        if r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] == 24
    assert after.status_code == 200


def test_sigterm_lets_running_requests_finish_aborts_the_rest_and_exits_zero(servers):
    server = servers["small"].wait_healthy()

    async def stream(c: httpx.AsyncClient, max_tokens: int, accepted: asyncio.Event,
                     started: asyncio.Event, box: list):
        body = {"prompt": "Tell me a story.", "max_tokens": max_tokens, "ignore_eos": True,
                "stream": True}
        async with c.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            accepted.set()
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    started.set()
                    box.append(json.loads(line[6:])["choices"][0]["finish_reason"])
                elif line == "data: [DONE]":
                    box.append("[DONE]")

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            accepted, started = [asyncio.Event(), asyncio.Event()], [asyncio.Event(), asyncio.Event()]
            boxes = [[], []]
            # One slot: the first request runs (and can finish within the shutdown timeout), the
            # second waits, then runs, and is still generating when the timeout aborts it.
            running = asyncio.create_task(stream(c, 16, accepted[0], started[0], boxes[0]))
            await asyncio.wait_for(started[0].wait(), 60)
            waiting = asyncio.create_task(stream(c, 4000, accepted[1], started[1], boxes[1]))
            await asyncio.wait_for(accepted[1].wait(), 60)
            children = child_pids(server.proc.pid)
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            refused = await c.post("/v1/completions", json={"prompt": "late", "max_tokens": 2})
            health = await c.get("/health")
            await asyncio.gather(running, waiting)
            return boxes, refused, health, children

    boxes, refused, health, children = asyncio.run(run())
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
    assert health.status_code == 503 and health.json()["status"] == "draining"
    assert server.proc.wait(60) == 0
    assert boxes[0][-2:] == ["length", "[DONE]"]
    assert boxes[1][-2:] == ["abort", "[DONE]"]
    assert not children and not processes_mentioning(f"--port {server.port} ")
