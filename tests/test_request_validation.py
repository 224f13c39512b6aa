"""Every request field is checked once, at the engine's entry: a bad value is a 400 naming the
field (never a 5xx, never a dead engine), and the server serves a normal request right after."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

from conveyor.errors import InvalidRequestError
from conveyor.sampling_params import SamplingParams
from conveyor.engine.llm_engine import LLMEngine
from conveyor.server.app import ServerConfig, build_app

VOCAB = 49152          # the tiny model's (and SmolLM2's) vocabulary

BAD_PARAMS = [
    (dict(seed=2**64), "seed"),
    (dict(seed=-(2**63) - 1), "seed"),
    (dict(seed=2**64 - 1, n=2), "seed"),            # seed + i must fit too
    (dict(seed=1.5), "seed"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=1e300), "temperature"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=float("inf")), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=True), "top_k"),
    (dict(top_k=2**80), "top_k"),
    (dict(min_p=float("nan")), "min_p"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(repetition_penalty=1e-40), "repetition_penalty"),
    (dict(repetition_penalty=1e300), "repetition_penalty"),
    (dict(presence_penalty=float("nan")), "presence_penalty"),
    (dict(frequency_penalty=float("-inf")), "frequency_penalty"),
    (dict(frequency_penalty=2**80), "frequency_penalty"),
    (dict(n=0), "n"),
    (dict(n=2.0), "n"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(logprobs=21), "logprobs"),
    (dict(logprobs=-1), "logprobs"),
    (dict(stop=["s"] * 17), "stop"),
    (dict(stop="x" * 257), "stop"),
    (dict(stop=["ok", "\ud800"]), "stop"),
    (dict(stop=[""]), "stop"),
    (dict(stop=[3]), "stop"),
    (dict(stop_token_ids=list(range(65))), "stop_token_ids"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop_token_ids=[True]), "stop_token_ids"),
    (dict(stop_token_ids=7), "stop_token_ids"),
    (dict(ignore_eos="yes"), "ignore_eos"),
    (dict(include_stop_str_in_output=1), "include_stop_str_in_output"),
    (dict(skip_special_tokens=None), "skip_special_tokens"),
]


@pytest.mark.parametrize("kwargs,field", BAD_PARAMS,
                         ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_PARAMS)])
def test_sampling_params_refuses_a_bad_value_naming_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == field and field in str(info.value)


def test_sampling_params_accepts_the_edges_of_every_range():
    for kw in (dict(seed=2**64 - 1), dict(seed=-(2**63)), dict(seed=2**64 - 8, n=8),
               dict(temperature=0.0), dict(temperature=100.0), dict(top_p=1.0), dict(top_k=-1),
               dict(min_p=1.0), dict(repetition_penalty=0.01), dict(repetition_penalty=100.0),
               dict(presence_penalty=-2.0), dict(frequency_penalty=2), dict(logprobs=20),
               dict(stop=["s"] * 16), dict(stop="x" * 256), dict(stop_token_ids=list(range(64))),
               dict(max_tokens=None, min_tokens=3)):
        SamplingParams(**kw)


# ---------------------------------------------------------------------------- engine entry
@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return LLMEngine.from_kwargs(model=tiny_llama_dir, dtype="float32", max_num_seqs=4,
                                 max_num_batched_tokens=64, num_blocks=64, block_size=16,
                                 max_model_len=512)


BAD_ENGINE_ARGS = [
    (dict(prompt=[VOCAB]), "prompt"),
    (dict(prompt=[5, -1]), "prompt"),
    (dict(prompt=[2**70]), "prompt"),
    (dict(prompt=[True, 5]), "prompt"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt=""), "prompt"),
    (dict(prompt="caf\udce9"), "prompt"),
    (dict(prompt=b"bytes"), "prompt"),
    (dict(params=SamplingParams(stop_token_ids=[VOCAB])), "stop_token_ids"),
    (dict(params=SamplingParams(max_tokens=None, min_tokens=600)), "min_tokens"),
    (dict(params={"temperature": 0}), "params"),
    (dict(priority=2**40), "priority"),
    (dict(priority="high"), "priority"),
    (dict(tenant=5), "tenant"),
    (dict(tenant="t" * 300), "tenant"),
    (dict(cache_salt="\ud800"), "cache_salt"),
    (dict(cache_salt=["salt"]), "cache_salt"),
    (dict(request_id=7), "request_id"),
    (dict(arrival_time=float("nan")), "arrival_time"),
]


@pytest.mark.parametrize("kwargs,field", BAD_ENGINE_ARGS,
                         ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_ENGINE_ARGS)])
def test_engine_entry_refuses_a_bad_request_naming_the_field(engine, kwargs, field):
    args = dict(prompt=[5, 6, 7], params=SamplingParams(max_tokens=2))
    args.update(kwargs)
    prompt, params = args.pop("prompt"), args.pop("params")
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request(prompt, params, **args)
    assert info.value.param == field, str(info.value)
    assert not engine.has_unfinished_requests() and not engine.output_processor.parents
    engine.check_invariants()


# ---------------------------------------------------------------------------- over HTTP
class _LiveApp:
    """The app with its lifespan running on a background event loop, shared by the HTTP tests
    (one engine thread for all of them: a failure of one case would show in every later one)."""

    def __init__(self, app):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._stop = None
        self.client = self.run(self._start(app))

    async def _start(self, app):
        started, self._stop = asyncio.Event(), asyncio.Event()

        async def lifespan():
            async with app.router.lifespan_context(app):
                started.set()
                await self._stop.wait()
        self._lifespan = asyncio.ensure_future(lifespan())
        await started.wait()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")
        while (await client.get("/health")).status_code != 200:
            await asyncio.sleep(0.02)
        return client

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def stop():
            await self.client.aclose()
            self._stop.set()
            await self._lifespan
        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def live(engine):
    app = _LiveApp(build_app(ServerConfig(), lambda: engine))
    yield app
    app.close()


HI = [{"role": "user", "content": "hi"}]
HTTP_CASES = [
    # route, body (dict, or raw JSON text), field the error names
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 4, "seed": 2**64}, "seed"),
    ("/v1/completions", {"prompt": "Hello", "seed": -(2**63) - 1}, "seed"),
    ("/v1/completions", {"prompt": "Hello", "seed": 2**64 - 1, "n": 2}, "seed"),
    ("/v1/completions", '{"prompt": "Hello", "temperature": 1e999}', "temperature"),
    ("/v1/completions", '{"prompt": "Hello", "temperature": -1e999}', "temperature"),
    ("/v1/completions", '{"prompt": "Hello", "top_p": 1e999}', "top_p"),
    ("/v1/completions", '{"prompt": "Hello", "min_p": 1e999}', "min_p"),
    ("/v1/completions", '{"prompt": "Hello", "presence_penalty": 1e999}', "presence_penalty"),
    ("/v1/completions", '{"prompt": "Hello", "frequency_penalty": -1e999}', "frequency_penalty"),
    ("/v1/completions", '{"prompt": "Hello", "repetition_penalty": 1e999}', "repetition_penalty"),
    ("/v1/completions", {"prompt": "Hello", "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "Hello", "top_k": -5}, "top_k"),
    ("/v1/completions", {"prompt": "Hello", "top_k": 2**70}, "top_k"),
    ("/v1/completions", {"prompt": "Hello", "stop_token_ids": list(range(100))}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "Hello", "stop_token_ids": [VOCAB]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "Hello", "stop_token_ids": [-1]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "Hello", "stop": "\ud800"}, "stop"),
    ("/v1/completions", {"prompt": "Hello", "stop": ["a"] * 17}, "stop"),
    ("/v1/completions", {"prompt": "Hello", "stop": ["y" * 257]}, "stop"),
    ("/v1/completions", {"prompt": "\ud800"}, "prompt"),
    ("/v1/completions", {"prompt": "ok \udc80 ok"}, "prompt"),
    ("/v1/completions", {"prompt": ["\ud800"]}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [VOCAB]}, "prompt"),
    ("/v1/completions", {"prompt": [-1, 5]}, "prompt"),
    ("/v1/completions", {"prompt": [2**70]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2]]}, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {"prompt": None}, "prompt"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": "Hello", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "Hello", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "Hello", "min_tokens": 10**9}, "min_tokens"),
    ("/v1/completions", {"prompt": "Hello", "max_tokens": None, "min_tokens": 10**6},
     "min_tokens"),
    ("/v1/completions", {"prompt": "Hello", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "Hello", "n": 9}, "n"),
    ("/v1/completions", {"prompt": "Hello", "priority": 10**30}, "priority"),
    ("/v1/completions", {"prompt": "Hello", "ignore_eos": "yes"}, "ignore_eos"),
    ("/v1/completions", {"prompt": "Hello", "\ud800": 1}, "unicode"),
    ("/v1/completions", {"prompt": "Hello", "cache_salt": "s\ud800"}, "cache_salt"),
    ("/v1/completions", '{"prompt": "Hello", "max_tokens": 1e999}', "max_tokens"),
    ("/v1/completions", '{"prompt": "Hello", "seed": 1e999}', "seed"),
    ("/v1/completions", '{"prompt": "Hello", "stop_token_ids": [1e999]}', "stop_token_ids"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "\udfff", "content": "hi"}]}, "messages"),
    ("/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "text", "text": "a\ud83d"}]}]},
     "messages"),
    ("/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "url": "x"}]}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": {"a": 1}}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": 5, "content": "hi"}]}, "messages"),
    ("/v1/chat/completions", {"messages": ["hi"]}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": HI, "top_logprobs": 5}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": HI, "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": HI, "max_completion_tokens": 0},
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": HI, "seed": 2**64}, "seed"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], '
                             '"temperature": 1e999}', "temperature"),
    ("/v1/chat/completions", {"messages": HI, "stop": ["\udc00"]}, "stop"),
    ("/tokenize", {"prompt": "\ud800"}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x\udbff"}]}, "messages"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"prompt": "a", "messages": HI}, "prompt"),
    ("/tokenize", {}, "prompt"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": [VOCAB]}, "tokens"),
    ("/detokenize", {"tokens": [2**70]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
    ("/detokenize", {"tokens": [1.5]}, "tokens"),
]


@pytest.mark.parametrize("route,body,field", HTTP_CASES,
                         ids=[f"{r.rsplit('/', 1)[-1]}-{i}-{f}" for i, (r, _, f) in
                              enumerate(HTTP_CASES)])
def test_bad_value_is_a_4xx_naming_the_field_and_the_server_goes_on(live, engine, route, body,
                                                                     field):
    content = body.encode() if isinstance(body, str) else json.dumps(body).encode()

    async def scenario(client):
        bad = await client.post(route, content=content,
                                headers={"Content-Type": "application/json"})
        health = await client.get("/health")
        ok = await client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
        return bad, health, ok

    bad, health, ok = live.run(scenario(live.client))
    assert 400 <= bad.status_code < 500, bad.text
    error = bad.json()["error"]
    assert error["param"] == field or field in error["message"], error
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    engine.check_invariants()
    assert engine.core.kv_manager.pool.num_free_blocks == engine.num_kv_blocks


def test_valid_edge_values_are_served(live, engine):
    bodies = [{"prompt": "Hello", "max_tokens": 2, "seed": 2**64 - 1},
              {"prompt": "Hello", "max_tokens": 2, "seed": 2**64 - 2, "n": 2},
              {"prompt": "Hello", "max_tokens": 2, "seed": -(2**63), "temperature": 100.0},
              {"prompt": [5, 6, VOCAB - 1], "max_tokens": 2, "stop_token_ids": [VOCAB - 1]},
              {"prompt": "caf\u00e9 \U0001f600", "max_tokens": 2, "stop": ["\U0001f600"]}]

    async def scenario(client):
        return [await client.post("/v1/completions", json=b) for b in bodies]

    for resp in live.run(scenario(live.client)):
        assert resp.status_code == 200, resp.text
    engine.check_invariants()
