"""Tool-call parsing: the same result however the reply is split, calls out of content, markup
never in content, malformed calls kept as text, and the per-request call limit."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.tools.formats import FORMATS, HERMES, LLAMA3_JSON
from conveyor.tools.parser import ArgumentsDelta, CallStart, ContentDelta
from conveyor.tools.spec import tool_request

TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
         for n in ("get_weather", "add")]


def request(parallel=True, choice=None):
    return tool_request(TOOLS, choice, parallel)


def parse(fmt, pieces, req=None):
    """(content, [(name, arguments)], events) of a reply fed in ``pieces``."""
    parser = fmt.parser(req or request())
    events = [e for p in pieces for e in parser.feed(p)] + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls = []
    for e in events:
        if isinstance(e, CallStart):
            assert e.index == len(calls) and e.id.startswith("call_")
            calls.append([e.name, ""])
        elif isinstance(e, ArgumentsDelta):
            calls[e.index][1] += e.text
    return content, [tuple(c) for c in calls], events


def hermes_call(name, args, spaced=True):
    body = json.dumps({"name": name, "arguments": args}, separators=None if spaced else (",", ":"))
    return f"<tool_call>\n{body}\n</tool_call>"


def test_hermes_content_then_calls():
    text = ("Let me check.\n" + hermes_call("get_weather", {"city": "Paris"}) + "\n"
            + hermes_call("add", {"a": 1, "b": [2, "}"]}, spaced=False))
    content, calls, _ = parse(HERMES, [text])
    assert content == "Let me check."
    assert calls == [("get_weather", '{"city": "Paris"}'), ("add", '{"a":1,"b":[2,"}"]}')]


def test_arguments_stream_in_pieces_and_name_comes_first():
    text = hermes_call("get_weather", {"city": "Paris", "days": 3})
    _, calls, events = parse(HERMES, list(text))
    assert isinstance(events[0], CallStart) and events[0].name == "get_weather"
    pieces = [e.text for e in events if isinstance(e, ArgumentsDelta)]
    assert len(pieces) > 5 and "".join(pieces) == '{"city": "Paris", "days": 3}'


def test_keys_in_other_order_and_string_arguments_are_read_whole():
    other_order = '<tool_call>\n{"arguments": {"x": 1}, "name": "add"}\n</tool_call>'
    as_string = '<tool_call>{"name": "add", "arguments": "{\\"x\\": 2}"}</tool_call>'
    assert parse(HERMES, list(other_order))[1] == [("add", '{"x": 1}')]
    assert parse(HERMES, [as_string])[1] == [("add", '{"x": 2}')]


def test_malformed_or_unknown_calls_stay_content_verbatim():
    for text in ['<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call> done',
                 "Use <tool_call> tags like this: <tool_call>", '<tool_call>{"name": "ad',
                 "<tool_call>{not json}</tool_call>", "trailing space  \n"]:
        assert parse(HERMES, [text])[:2] == (text, [])


def test_a_reply_cut_off_inside_arguments_keeps_the_announced_call():
    # finish_reason "length": the call was streamed already, so the whole reply keeps it too
    content, calls, _ = parse(HERMES, ['Hi <tool_call>{"name": "add", "arguments": {"a": [1, '])
    assert content == "Hi" and calls == [("add", '{"a": [1, ')]


def test_parallel_false_keeps_only_the_first_call():
    text = hermes_call("add", {"a": 1}) + "\n" + hermes_call("add", {"a": 2}) + "\nbye"
    content, calls, _ = parse(HERMES, [text], request(parallel=False))
    assert calls == [("add", '{"a": 1}')] and content == "bye"


def test_named_choice_accepts_only_that_function():
    text = hermes_call("get_weather", {}) + hermes_call("add", {})
    req = request(choice={"type": "function", "function": {"name": "add"}})
    content, calls, _ = parse(HERMES, [text], req)
    assert calls == [("add", "{}")] and "get_weather" in content


def test_llama3_json_calls_open_the_reply_only():
    text = '{"name": "add", "parameters": {"a": 1}}; {"name": "get_weather", "parameters": {}}'
    assert parse(LLAMA3_JSON, list(text))[1] == [("add", '{"a": 1}'), ("get_weather", "{}")]
    assert parse(LLAMA3_JSON, ["<|python_tag|>" + text])[1][0] == ("add", '{"a": 1}')
    plain = 'The JSON is {"name": "add", "parameters": {}}'
    assert parse(LLAMA3_JSON, [plain])[:2] == (plain, [])
    not_a_call = '{"answer": 42}'
    assert parse(LLAMA3_JSON, list(not_a_call))[:2] == (not_a_call, [])


def test_rendered_calls_parse_back():
    for fmt in FORMATS.values():
        calls = [("add", '{"a": 1, "s": "x}"}'), ("get_weather", "{}")]
        content, parsed, _ = parse(fmt, [fmt.render_calls(calls)])
        assert content == "" and parsed == calls


_FRAGMENTS = st.sampled_from([
    "Hello", " ", "\n", "  \n ", "<", "<tool", "<tool_call>", "</tool_call>", "{", "}", '"',
    hermes_call("add", {"a": 1}), hermes_call("get_weather", {"city": "{Paris}"}),
    hermes_call("nope", {}), '<tool_call>\n{"name": "add", "arg',
    '{"name": "add", "parameters": {}}',
    "; ", '<tool_call>{"arguments": {}, "name": "add"}</tool_call>', "<|python_tag|>", "é"])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(_FRAGMENTS, st.booleans()), max_size=12),
       st.lists(st.integers(0, 10_000), max_size=6), st.sampled_from(sorted(FORMATS)),
       st.booleans())
def test_result_does_not_depend_on_how_the_text_is_split(fragments, cuts, fmt_name, parallel):
    text = "".join(f for f, _ in fragments)
    # pieces end at some fragment boundaries and at arbitrary points
    ends = [sum(len(f) for f, _ in fragments[:i + 1])
            for i, (_, cut) in enumerate(fragments) if cut]
    bounds = sorted({*ends, *(c % (len(text) + 1) for c in cuts)})
    pieces = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)])]
    fmt, req = FORMATS[fmt_name], request(parallel)
    whole = parse(fmt, [text], req)
    split = parse(fmt, pieces, req)
    assert split[:2] == whole[:2]
    content, calls, _ = whole
    if not calls:
        assert content == text
    if not parallel:
        assert len(calls) <= 1


def test_stream_chunks_and_whole_reply_agree_per_choice():
    from conveyor.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
    from conveyor.server.responses import ResponseMeta, delta_chunk, full_response
    from conveyor.server.tool_calls import ChatTools, stream_chunks
    tools = ChatTools(request(), HERMES)
    meta = ResponseMeta("chatcmpl-1", 0, "m", chat=True)
    texts = {0: "Hi " + hermes_call("add", {"a": 1}), 1: "Just text, no call.",
             2: "Both: " + hermes_call("add", {"a": 2})}
    stream, got = tools.stream(), {0: [], 1: [], 2: []}
    for index, text in texts.items():
        size = 7 if index < 2 else len(text)      # choice 2: content and a call in one step
        pieces = [text[i:i + size] for i in range(0, len(text), size)]
        for k, piece in enumerate(pieces):
            last = k == len(pieces) - 1
            c = CompletionOutput(index, "", [], "stop" if last else None, delta_text=piece,
                                 logprobs=[], delta_logprobs=[Logprob(5, -0.5)])
            parts = stream_chunks(stream, delta_chunk(meta, c, {5: "x"}, False), c)
            # each step's logprobs are sent once, on its first chunk (held-back text included)
            assert parts and parts[0]["choices"][0]["logprobs"] is not None
            assert all(p["choices"][0]["logprobs"] is None for p in parts[1:])
            got[index] += parts
    outs = [CompletionOutput(i, t, [], "stop") for i, t in texts.items()]
    whole = tools.rewrite_response(full_response(meta, RequestOutput(
        "r", None, [1], outs, True, RequestMetrics(0.0)), {}))["choices"]
    for index, chunks in got.items():
        choices = [ch["choices"][0] for ch in chunks]
        assert [c["finish_reason"] for c in choices][-1] == whole[index]["finish_reason"]
        assert all(c["finish_reason"] is None for c in choices[:-1])
        content = "".join(c["delta"].get("content", "") for c in choices)
        assert content == (whole[index]["message"]["content"] or "")
        args = "".join(d["function"]["arguments"] for c in choices
                       for d in c["delta"].get("tool_calls", ()))
        calls = whole[index]["message"].get("tool_calls", [])
        assert args == "".join(c["function"]["arguments"] for c in calls)
    assert whole[0]["finish_reason"] == "tool_calls" and whole[0]["message"]["content"] == "Hi"
    assert len(got[2]) == 2 and "content" in got[2][0]["choices"][0]["delta"]
    assert whole[1]["finish_reason"] == "stop" and "tool_calls" not in whole[1]["message"]
