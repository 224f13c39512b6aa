"""Tool definitions, calls and results in the prompt: the default Hermes-style prompt for a
template that knows no tools (SmolLM2's), ``tools=`` for one that does, and OpenAI's checks on
tool messages."""

from __future__ import annotations

import copy
import json

import pytest

from conveyor.errors import InvalidRequestError
from conveyor.server.tool_calls import ChatTools
from conveyor.tools.formats import HERMES
from conveyor.tools.spec import tool_request

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TURN = [{"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None,
         "tool_calls": [CALL, {**CALL, "id": "call_2",
                               "function": {**CALL["function"], "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "rain"}]}]

# A template that renders tools and wants each call's arguments as an object (as HF's do).
TOOLS_TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
    "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments.city }}"
    "{% endfor %}{% if m.tool_call_id %}({{ m.tool_call_id }}){% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    from conveyor.tokenizer import load_tokenizer
    from conveyor.weights.loader import default_model_path
    return load_tokenizer(default_model_path())


def render(tokenizer, messages, tools=(WEATHER,), choice=None) -> str:
    chat = ChatTools(tool_request(list(tools), choice, None), HERMES)
    return tokenizer.decode(chat.render_prompt(tokenizer, messages), skip_special_tokens=False)


def test_template_without_tools_gets_the_default_prompt_calls_and_results(tokenizer):
    assert "tools" not in tokenizer.chat_template_variables()
    before = copy.deepcopy(TURN)
    text = render(tokenizer, TURN)
    assert TURN == before                                    # the caller's messages are untouched
    assert text.startswith("<|im_start|>system\n# Tools\n")
    assert json.dumps(WEATHER) in text and "<tool_call></tool_call> XML tags" in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", '
            '"arguments": {"city": "Rome"}}\n</tool_call><|im_end|>') in text
    assert ("<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain"
            "\n</tool_response><|im_end|>\n<|im_start|>assistant\n") in text


def test_system_message_keeps_its_text_and_none_offers_no_tools(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, TURN[0]]
    text = render(tokenizer, messages)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    plain = render(tokenizer, messages, choice="none")
    assert "<tools>" not in plain and plain == render(tokenizer, messages, tools=())


def test_template_with_tools_gets_tools_and_argument_objects(tokenizer):
    tok = tokenizer.with_chat_template(TOOLS_TEMPLATE)
    assert "tools" in tok.chat_template_variables()
    text = render(tok, TURN)
    assert text == ("TOOLS:get_weather;[user]Weather in Paris and Rome?"      # trim_blocks
                    "[assistant]CALL get_weather ParisCALL get_weather Rome"
                    "[tool]sunny(call_1)[tool]rain(call_2)[assistant]")


@pytest.mark.parametrize("bad, says", [
    ([TURN[0], {"role": "tool", "tool_call_id": "call_9", "content": "x"}], "answers no call"),
    ([*TURN[:2], {"role": "tool", "content": "x"}], "needs a string 'tool_call_id'"),
    ([TURN[0], {"role": "assistant", "content": None,
                "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {}}}]}],
     "tool_calls[0] must be"),
    ([TURN[0], {"role": "user", "content": "x", "tool_calls": [CALL]}], "on an assistant message"),
])
def test_bad_tool_messages_are_400s_naming_the_message(tokenizer, bad, says):
    with pytest.raises(InvalidRequestError) as err:
        render(tokenizer, bad)
    assert says in str(err.value) and err.value.param == "messages"


def test_requests_without_tools_render_as_before(tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    chat = ChatTools(None, HERMES)
    expected = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    assert chat.render_prompt(tokenizer, messages) == expected


@pytest.mark.parametrize("tools, choice, says", [
    ([], "required", "needs tools"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "not in tools"),
    ([WEATHER, WEATHER], None, "unique"),
    ([{"type": "function", "function": {"name": "bad name"}}], None, "letters, digits"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], None,
     "type 'object'"),
])
def test_bad_tool_fields_are_400s(tools, choice, says):
    with pytest.raises(InvalidRequestError) as err:
        tool_request(tools, choice, None)
    assert says in str(err.value)
