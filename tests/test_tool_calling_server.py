"""Tool calling and structured outputs through a real ``conveyor serve``, driven by the clients
people use: the official ``openai`` package and LangChain's ``ChatOpenAI``. The model is small;
the constraint, not the model, must make every required or named reply a valid call."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest

from server_process import ServerProcess

MAX_TOKENS = 48


class Weather(pydantic.BaseModel):
    """Get the weather forecast for a city."""

    city: Literal["Paris", "London", "Tokyo"]
    days: int = pydantic.Field(ge=1, le=7)


WEATHER_SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "days"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA,
                                           "description": "Get the weather forecast for a city"}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}},
             "required": ["tz"]}}}]
ASK = [{"role": "user", "content": "What's the weather in Paris for the next 3 days?"}]


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess("--max-num-seqs", "8", "--num-kv-blocks", "256", "--max-model-len", "1024")
    try:
        yield proc.wait_healthy()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def check_call(call, names=("get_weather", "get_time")) -> dict:
    assert call.id.startswith("call_") and call.type == "function" and call.function.name in names
    args = json.loads(call.function.arguments)
    schema = next(t["function"]["parameters"] for t in TOOLS
                  if t["function"]["name"] == call.function.name)
    jsonschema.validate(args, schema)
    return args


def streamed(chunks) -> tuple[str, list[dict], str]:
    """(content, calls, finish_reason) accumulated from a chat stream, checking OpenAI's order:
    a call's first delta carries its id, type and name; later ones only argument pieces."""
    content, calls, finish = "", [], None
    for chunk in chunks:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or ():
            if d.index == len(calls):
                assert d.id.startswith("call_") and d.type == "function" and d.function.name
                calls.append({"name": d.function.name, "arguments": d.function.arguments or "",
                              "pieces": 1})
            else:
                assert d.index == len(calls) - 1 and d.id is None and d.function.name is None
                calls[-1]["arguments"] += d.function.arguments
                calls[-1]["pieces"] += 1
        finish = choice.finish_reason or finish
    return content, calls, finish


def test_required_and_named_replies_are_valid_calls_even_when_sampling(client, model):
    r = client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1.0,
        seed=1, parallel_tool_calls=False, max_tokens=MAX_TOKENS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    check_call(choice.message.tool_calls[0])
    named = client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, max_tokens=MAX_TOKENS, temperature=1.0, seed=3,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = named.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"]
    check_call(calls[0], names=("get_time",))


def test_streamed_calls_agree_with_the_whole_reply(client, model):
    kw = dict(model=model, messages=ASK, tools=TOOLS, temperature=0.0, max_tokens=MAX_TOKENS,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**kw).choices[0]
    content, calls, finish = streamed(client.chat.completions.create(**kw, stream=True))
    assert finish == whole.finish_reason == "tool_calls" and content == ""
    assert [(c["name"], c["arguments"]) for c in calls] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert calls[0]["pieces"] > 2                      # the arguments arrived in pieces


def test_auto_with_strict_tools_then_a_turn_with_the_tool_result(client, model):
    tools = [{"type": "function", "function": {**t["function"], "strict": True}} for t in TOOLS]
    kw = dict(model=model, messages=ASK, tools=tools, temperature=0.0, max_tokens=MAX_TOKENS)
    whole = client.chat.completions.create(**kw).choices[0]
    content, calls, finish = streamed(client.chat.completions.create(**kw, stream=True))
    assert (content, finish) == (whole.message.content or "", whole.finish_reason)
    assert [(c["name"], c["arguments"]) for c in calls] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or ()]
    assert "<tool_call>" not in content           # a started call is constrained, so it parses
    if whole.finish_reason == "tool_calls":
        for c in whole.message.tool_calls:
            check_call(c)
    call = {"id": "call_abc", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}
    turn = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_abc", "content": '{"forecast": "sunny"}'}]
    answer = client.chat.completions.create(model=model, messages=turn, tools=TOOLS,
                                            temperature=0.0, max_tokens=16).choices[0]
    assert answer.finish_reason in ("stop", "length", "tool_calls")
    assert answer.message.content or answer.message.tool_calls


def test_openai_parse_with_a_pydantic_model_and_a_pydantic_tool(client, model):
    parsed = client.chat.completions.parse(model=model, messages=ASK, response_format=Weather,
                                           temperature=0.0, max_tokens=MAX_TOKENS)
    assert isinstance(parsed.choices[0].message.parsed, Weather)
    tool = client.chat.completions.parse(
        model=model, messages=ASK, tools=[openai.pydantic_function_tool(Weather)],
        tool_choice="required", parallel_tool_calls=False, temperature=0.0, max_tokens=MAX_TOKENS)
    call = tool.choices[0].message.tool_calls[0]
    assert call.function.name == "Weather" and isinstance(call.function.parsed_arguments, Weather)


def test_langchain_structured_output_and_bound_tools(server, model):
    from langchain_core.messages import AIMessageChunk
    from langchain_openai import ChatOpenAI
    llm = ChatOpenAI(model=model, base_url=server.url + "/v1", api_key="unused", temperature=0,
                     max_tokens=MAX_TOKENS, max_retries=0)
    question = ASK[0]["content"]
    for method in ("json_schema", "function_calling"):
        assert isinstance(llm.with_structured_output(Weather, method=method).invoke(question),
                          Weather)
    bound = llm.bind_tools([Weather], tool_choice="Weather")
    message = bound.invoke(question)
    assert [c["name"] for c in message.tool_calls] == ["Weather"]
    Weather.model_validate(message.tool_calls[0]["args"])
    chunks = list(bound.stream(question))
    merged = sum(chunks[1:], chunks[0])
    assert isinstance(merged, AIMessageChunk)
    assert merged.tool_calls[0]["args"] == message.tool_calls[0]["args"]


NO_OP_FIELDS = {"metadata": {"run": "1"}, "store": True, "service_tier": "auto", "user": "u1",
                "safety_identifier": "s1", "prompt_cache_key": "k", "modalities": ["text"],
                "prompt_cache_retention": "24h", "parallel_tool_calls": False,
                "prediction": {"type": "content", "content": "Paris"}}
REFUSED = {"functions": [{"name": "f"}], "function_call": "auto", "reasoning_effort": "low",
           "verbosity": "low", "audio": {"voice": "alloy", "format": "wav"},
           "modalities": ["text", "audio"], "web_search_options": {}, "moderation": {"model": "m"}}


def test_fields_clients_send_are_accepted_and_unsupported_ones_named(server, model):
    body = {"model": model, "messages": ASK, "max_tokens": 1}
    ok = httpx.post(server.url + "/v1/chat/completions", json={**body, **NO_OP_FIELDS}, timeout=120)
    assert ok.status_code == 200, ok.text
    for name, value in REFUSED.items():
        r = httpx.post(server.url + "/v1/chat/completions", json={**body, name: value}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == name, (name, r.text)
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                   json={**body, "tool_choice": "required"})
    assert r.status_code == 400 and "needs tools" in r.json()["error"]["message"]
