"""Structured outputs over HTTP (in-process app, real default model): response_format and vLLM's
structured_outputs on chat and completions, streamed and not; every bad spec is a 400 naming the
field, before any byte of a response; removed guided_* fields name their replacement."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import jsonschema
import pytest
from engine_helpers import assert_all_blocks_free, small_engine

from conveyor.server.app import ServerConfig, build_app

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "rank"],
          "properties": {"city": {"type": "string", "maxLength": 12},
                         "rank": {"type": "integer", "minimum": 1, "maximum": 9}}}
MESSAGES = [{"role": "user", "content": "Name a city and its rank as JSON."}]


@pytest.fixture(scope="module")
def engine():
    return small_engine()


def serve(engine, scenario):
    async def main():
        app = build_app(ServerConfig(), lambda: engine)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app",
                                         timeout=300) as client:
                while (await client.get("/health")).status_code != 200:
                    await asyncio.sleep(0.05)
                return await scenario(client)
    result = asyncio.run(main())
    assert_all_blocks_free(engine)
    return result


def streamed_text(response: httpx.Response, chat: bool) -> tuple[str, str | None]:
    text, finish = "", None
    for event in response.text.split("\n\n"):
        if not event or event == "data: [DONE]":
            continue
        choice = json.loads(event[len("data: "):])["choices"][0]
        text += (choice["delta"].get("content") or "") if chat else choice["text"]
        finish = choice["finish_reason"] or finish
    return text, finish


def test_response_format_and_structured_outputs_stream_and_agree(engine):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA,
                                                  "strict": True}}
    chat = {"messages": MESSAGES, "max_tokens": 40, "temperature": 0, "response_format": fmt}
    completion = {"prompt": "Colours: red, green. Pick one:", "max_tokens": 8, "temperature": 0,
                  "structured_outputs": {"choice": ["red", "green", "dark blue"]}}

    async def scenario(client):
        return await asyncio.gather(
            client.post("/v1/chat/completions", json=chat),
            client.post("/v1/chat/completions", json={**chat, "stream": True}),
            client.post("/v1/completions", json=completion),
            client.post("/v1/completions", json={**completion, "stream": True}),
            client.post("/v1/chat/completions", json={
                **chat, "response_format": {"type": "json_object"}}))

    plain, stream, comp, comp_stream, obj = serve(engine, scenario)
    assert plain.status_code == 200, plain.text
    message = plain.json()["choices"][0]
    jsonschema.validate(json.loads(message["message"]["content"]), SCHEMA)
    assert message["finish_reason"] == "stop"
    assert streamed_text(stream, chat=True) == (message["message"]["content"], "stop")
    choice = comp.json()["choices"][0]
    assert choice["text"] in ("red", "green", "dark blue") and choice["finish_reason"] == "stop"
    assert streamed_text(comp_stream, chat=False) == (choice["text"], "stop")
    content = obj.json()["choices"][0]
    assert content["finish_reason"] == "length" or isinstance(
        json.loads(content["message"]["content"]), dict)


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}}, "response_format.json_schema.schema"),
    # the same bad schema again, cached as failing: the error names this request's field
    ({"structured_outputs": {"json": {"type": "nonsense"}}}, "structured_outputs.json"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "start: ("}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"json_object": False}}, "structured_outputs.json_object"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
     "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "backend": "xgrammar"}}, "structured_outputs"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
]
REMOVED = ["guided_json", "guided_regex", "guided_choice", "guided_grammar",
           "guided_decoding_backend", "guided_whitespace_pattern"]


def test_bad_specs_and_removed_fields_are_400s_naming_the_field(engine):
    async def scenario(client):
        replies = []
        for extra, _ in BAD:
            for path, body in (("/v1/chat/completions", {"messages": MESSAGES}),
                               ("/v1/completions", {"prompt": "Hi"})):
                replies.append(await client.post(path, json={**body, **extra, "max_tokens": 4}))
        removed = [await client.post("/v1/completions", json={
            "prompt": "Hi", name: {"type": "object"} if name == "guided_json" else "x"})
            for name in REMOVED]
        return replies, removed

    replies, removed = serve(engine, scenario)
    for i, reply in enumerate(replies):
        extra, param = BAD[i // 2]
        assert reply.status_code == 400, (extra, reply.text)
        error = reply.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", (extra, error)
    for name, reply in zip(REMOVED, removed):
        error = reply.json()["error"]
        assert reply.status_code == 400 and error["param"] == name
        assert "was removed" in error["message"]
        assert ("structured_outputs" in error["message"]) == (name in REMOVED[:4])


def test_a_compile_slower_than_the_timeout_is_a_400_and_the_server_goes_on(engine, monkeypatch):
    service = engine.structured.service
    gate = threading.Event()
    original = service.backend.compile

    def slow_compile(spec):
        if spec.regex == "slow[0-9]+":
            gate.wait(30)
        return original(spec)
    monkeypatch.setattr(service.backend, "compile", slow_compile)
    monkeypatch.setattr(service, "timeout_s", 0.2)

    async def scenario(client):
        slow = await client.post("/v1/completions", json={
            "prompt": "Hi", "max_tokens": 4, "structured_outputs": {"regex": "slow[0-9]+"}})
        gate.set()
        after = await client.post("/v1/completions", json={
            "prompt": "Hi", "max_tokens": 4, "structured_outputs": {"regex": "[0-9]{2}"}})
        return slow, after

    slow, after = serve(engine, scenario)
    assert slow.status_code == 400 and "longer than 0.2 s" in slow.json()["error"]["message"]
    assert slow.json()["error"]["param"] == "structured_outputs.regex"
    assert after.status_code == 200 and after.json()["choices"][0]["text"].isdigit()
