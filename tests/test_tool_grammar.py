"""The constraints behind tool_choice "required" / named, checked with llguidance itself: exactly
the calls the format renders are accepted, wrong names, wrong arguments and (without
parallel_tool_calls) a second call are not; pydantic ``$ref`` schemas work; bad schemas are 400s."""

from __future__ import annotations

import pydantic
import pytest

from conveyor import SamplingParams
from conveyor.errors import InvalidRequestError
from conveyor.structured.params import StructuredOutputsParams
from conveyor.tools.formats import FORMATS
from conveyor.tools.spec import tool_request


class Address(pydantic.BaseModel):
    city: str
    zip: int


class Person(pydantic.BaseModel):
    name: str
    home: Address
    tags: list[str]


WEATHER = {"type": "object", "properties": {"city": {"type": "string"},
                                            "days": {"type": "integer"}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "save_person",
                                           "parameters": Person.model_json_schema()}}]
GOOD_PERSON = '{"name": "Ada", "home": {"city": "London", "zip": 1}, "tags": ["x"]}'


@pytest.fixture(scope="module")
def accepts():
    """accepts(grammar or spec, text): the engine's backend takes ``text`` and then EOS."""
    from conveyor.structured.llguidance_backend import LLGuidanceBackend
    from conveyor.tokenizer import load_tokenizer
    from conveyor.weights.loader import default_model_path
    tok = load_tokenizer(default_model_path())
    backend = LLGuidanceBackend(tok.hf, len(tok.hf), tok.eos_token_ids)

    def check(grammar: str | StructuredOutputsParams, text: str) -> bool:
        spec = grammar if isinstance(grammar, StructuredOutputsParams) else \
            StructuredOutputsParams(grammar=grammar)
        matcher = backend.compile(spec).matcher()
        ids = tok.encode(text, add_special_tokens=False)
        return all(matcher.accept(t) for t in ids) and matcher.accept(tok.eos_token_id)
    return check


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_required_accepts_rendered_calls_only(accepts, fmt):
    f = FORMATS[fmt]
    grammar = f.grammar(tool_request(TOOLS, "required", None))
    one = f.render_calls([("get_weather", '{"city": "Paris", "days": 3}')])
    two = f.render_calls([("get_weather", '{"city": "Paris", "days": 3}'),
                          ("save_person", GOOD_PERSON)])
    assert accepts(grammar, one) and accepts(grammar, two)
    for bad in [f.render_calls([("get_weather", '{"city": "Paris"}')]),           # missing days
                f.render_calls([("get_weather", '{"city": "Paris", "days": "3"}')]),
                f.render_calls([("delete_all", "{}")]),
                f.render_calls([("save_person", GOOD_PERSON.replace('"zip": 1', '"zip": "1"'))]),
                "Sure! " + one]:
        assert not accepts(grammar, bad), bad


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_named_choice_and_no_parallel_calls(accepts, fmt):
    f = FORMATS[fmt]
    named = tool_request(TOOLS, {"type": "function", "function": {"name": "save_person"}}, None)
    grammar = f.grammar(named)
    assert accepts(grammar, f.render_calls([("save_person", GOOD_PERSON)]))
    assert not accepts(grammar, f.render_calls([("get_weather", '{"city": "P", "days": 1}')]))
    assert not accepts(grammar, f.render_calls([("save_person", GOOD_PERSON)] * 2))
    required_one = f.grammar(tool_request(TOOLS, "required", False))
    assert not accepts(required_one, f.render_calls([("save_person", GOOD_PERSON)] * 2))


def test_strict_auto_uses_a_structural_tag_free_outside_calls(accepts):
    tools = [{"type": "function", "function": {**TOOLS[0]["function"], "strict": True}}]
    request = tool_request(tools, None, None)
    tag = FORMATS["hermes"].structural_tag(request)
    assert tag["structures"][0]["begin"] == '<tool_call>\n{"name": "get_weather", "arguments": '
    grammar = StructuredOutputsParams(structural_tag=tag)
    call = FORMATS["hermes"].render_calls([("get_weather", '{"city": "Paris", "days": 3}')])
    assert accepts(grammar, "Sure. " + call) and accepts(grammar, "No call today.")
    assert not accepts(grammar, "Sure. " + call.replace('"days": 3', '"days": "3"'))
    assert FORMATS["llama3_json"].structural_tag(request) is None


def test_a_schema_the_grammar_engine_cannot_enforce_is_a_400_naming_the_tool():
    from conveyor.server.tool_calls import ChatTools
    bad = [TOOLS[0], {"type": "function", "function": {
        "name": "odd", "parameters": {"type": "object", "properties": {"x": {"type": "nope"}}}}}]
    tools = ChatTools(tool_request(bad, "required", None), FORMATS["hermes"])
    with pytest.raises(InvalidRequestError) as err:
        tools.sampling_params(SamplingParams())
    assert err.value.param == "tools[1].function.parameters"
