"""Structured outputs and logit_bias on the real default model (SmolLM2-135M, float32): every
accepted output obeys its constraint, greedy and sampled, under chunked prefill, recompute
preemption, prefix caching, n > 1, stop strings and min_tokens; unconstrained neighbours are
untouched (swap preemption: test_structured_core, as only the matcher's state differs). The
model is small: the constraint, not the model, makes the output valid."""

from __future__ import annotations

import asyncio
import json
import re
import threading

import jsonschema
import pytest
from conftest import StepRecorder, run_engine
from engine_helpers import assert_all_blocks_free, small_engine

from conveyor.errors import InvalidRequestError
from conveyor.sampling_params import SamplingParams
from conveyor.structured import StructuredOutputsParams as Spec

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "maxItems": 2,
                                  "items": {"enum": ["admin", "user", "guest"]}}}}
REGEX = r"[A-Z][a-z]{2,6}-[0-9]{2}"
CHOICES = ["red", "green", "blue", "light yellow"]


@pytest.fixture(scope="module")
def engine():
    return small_engine()


def chat(engine, text: str) -> list[int]:
    rendered = engine.tokenizer.apply_chat_template([{"role": "user", "content": text}])
    return engine.tokenizer.encode(rendered, add_special_tokens=False)


def run(engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    for rid, (prompt_ids, params) in requests.items():
        engine.add_request(prompt_ids, params, request_id=rid)
    finals = run_engine(engine)
    assert_all_blocks_free(engine)
    return finals


def constrained(spec: Spec, **kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 60, "temperature": 0.0, **kw}, structured_outputs=spec)


def assert_person(text: str) -> None:
    jsonschema.validate(json.loads(text), PERSON)


def test_json_regex_choice_all_valid_and_unconstrained_neighbours_untouched(engine):
    free = {"free": (chat(engine, "Tell me about the number 7."),
                     SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)),
            "free-seeded": (chat(engine, "Write a word."),
                            SamplingParams(max_tokens=12, temperature=1.0, seed=9,
                                           ignore_eos=True))}
    alone = run(engine, free)
    ask = chat(engine, "Describe a user of a web site.")
    hot = dict(temperature=1.2, top_p=0.95, seed=1)
    reqs = {"json-greedy": (ask, constrained(Spec(json=PERSON))),
            "json-n2": (ask, constrained(Spec(json=json.dumps(PERSON)), n=2, temperature=1.0,
                                         seed=5)),
            "regex-greedy": (ask, constrained(Spec(regex=REGEX), max_tokens=20)),
            "regex-seeded": (ask, constrained(Spec(regex=REGEX), max_tokens=20, **hot)),
            "choice-greedy": (ask, constrained(Spec(choice=CHOICES), max_tokens=8)),
            "choice-seeded": (ask, constrained(Spec(choice=CHOICES), max_tokens=8, **hot))}
    finals = run(engine, {**free, **reqs})
    for rid in free:                  # same tokens as without the constrained rows beside them
        assert list(finals[rid].outputs[0].token_ids) == list(alone[rid].outputs[0].token_ids)
    for rid in reqs:
        for c in finals[rid].outputs:
            assert c.finish_reason == "stop", (rid, c.text)
            if rid.startswith("json"):
                assert_person(c.text)
            elif rid.startswith("regex"):
                assert re.fullmatch(REGEX, c.text), c.text
            else:
                assert c.text in CHOICES
    assert len(finals["json-n2"].outputs) == 2
    again = run(engine, {"json-n2": reqs["json-n2"]})   # seeds reproduce, from the prefix cache
    assert [c.text for c in again["json-n2"].outputs] == [
        c.text for c in finals["json-n2"].outputs]
    assert again["json-n2"].num_cached_tokens > 0


def test_constraints_hold_under_chunked_prefill_and_recompute_preemption(engine):
    # 4 distinct ~70-token prompts + up to 60 tokens each overflow the 24-block pool (recompute
    # preemption); the 32-token budget chunks every prompt.
    story = ("the sign-up flow of a web shop, with every step a new user takes from the landing "
             "page to the first order, the emails they get and the fields they fill in. Now "
             "describe one user of that shop as JSON with a name, an age and tags.")
    prompts = {f"p{i}": chat(engine, f"Story number {i} is about {story}") for i in range(4)}
    assert min(len(p) for p in prompts.values()) > 64
    recorder = StepRecorder(engine)
    finals = run(engine, {rid: (p, constrained(Spec(json=PERSON), temperature=1.0, seed=i))
                          for i, (rid, p) in enumerate(prompts.items())})
    assert recorder.num_preemptions() > 0
    assert any(out.num_scheduled_tokens[new.request_id] < len(prompts[new.request_id])
               - new.num_computed_tokens for out in recorder.outputs for new in out.new_requests)
    for out in finals.values():
        assert out.outputs[0].finish_reason == "stop"
        assert_person(out.outputs[0].text)


def test_stop_strings_min_tokens_and_a_budget_ending_mid_structure(engine):
    ask = chat(engine, "Describe a user.")
    digits = Spec(regex=r"[0-9]+")
    finals = run(engine, {
        "stopped": (ask, constrained(Spec(json=PERSON), stop=['", "age"'])),
        "min": (ask, constrained(digits, max_tokens=10, min_tokens=6)),
        "short": (ask, constrained(Spec(json=PERSON), max_tokens=5)),
        "object": (ask, constrained(Spec(json_object=True), max_tokens=40)),
        "lark": (ask, constrained(Spec(grammar='start: "id=" /[0-9]{2}/ ";"'), max_tokens=10))})
    stopped = finals["stopped"].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == '", "age"'
    assert stopped.text.startswith('{"name": "') and "age" not in stopped.text
    minimum = finals["min"].outputs[0]
    assert len(minimum.token_ids) >= 6 and re.fullmatch(r"[0-9]+", minimum.text)
    short = finals["short"].outputs[0]
    assert short.finish_reason == "length" and len(short.token_ids) == 5
    assert short.text.startswith("{") and not _parses(short.text)
    obj = finals["object"].outputs[0]
    assert obj.finish_reason == "length" or isinstance(json.loads(obj.text), dict)
    assert re.fullmatch(r"id=[0-9]{2};", finals["lark"].outputs[0].text)


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def test_logit_bias_moves_only_the_biased_rows(engine):
    ask = chat(engine, "Say hello.")
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    base = run(engine, {"base": (ask, greedy)})["base"].outputs[0].token_ids
    forced = engine.tokenizer.encode(" banana", add_special_tokens=False)[0]
    finals = run(engine, {
        "base": (ask, greedy),
        "ban": (ask, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True,
                                    logit_bias={base[0]: -100})),
        "force": (ask, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True,
                                      logit_bias={forced: 100}))})
    assert list(finals["base"].outputs[0].token_ids) == list(base)
    assert finals["ban"].outputs[0].token_ids[0] != base[0]
    assert list(finals["force"].outputs[0].token_ids) == [forced] * 4
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request(ask, SamplingParams(logit_bias={10**6: 1.0}))
    assert e.value.param == "logit_bias"
    assert_all_blocks_free(engine)


def test_a_spec_that_does_not_compile_fails_its_request_alone(engine, monkeypatch):
    ask = chat(engine, "Hi.")
    bad = Spec(regex="[bad-")
    service = engine.structured.service
    gate, original = threading.Event(), service.backend.compile
    monkeypatch.setattr(service.backend, "compile",
                        lambda spec: gate.wait(30) and original(spec))
    engine.add_request(ask, constrained(bad), request_id="bad")    # compiling: it waits
    engine.add_request(ask, SamplingParams(max_tokens=3, ignore_eos=True), request_id="ok")
    gate.set()
    finals = run_engine(engine)
    assert finals["bad"].outputs[0].finish_reason == "error"
    assert "structured_outputs.regex does not compile" in finals["bad"].error
    assert finals["ok"].outputs[0].finish_reason == "length"
    with pytest.raises(InvalidRequestError) as e:             # now known to fail: refused at once
        engine.add_request(ask, constrained(bad))
    assert e.value.param == "structured_outputs.regex"
    for spec in (Spec(json={"type": "nonsense"}), Spec(grammar="start: ("),
                 Spec(structural_tag={"type": "structural_tag", "triggers": ["<f"],
                                      "structures": [{"begin": "<f>", "schema": {"type": "bogus"},
                                                      "end": "</f>"}]})):
        with pytest.raises(InvalidRequestError) as e:
            asyncio.run(engine.structured.service.await_grammar(spec))
        assert e.value.param == spec.param and "does not compile" in str(e.value)
    tag = Spec(structural_tag={"type": "structural_tag", "triggers": ["<f"], "structures": [
        {"begin": "<f>", "schema": {"type": "object"}, "end": "</f>"}]})
    assert engine.structured.service.submit(tag).result(30) is not None
    assert_all_blocks_free(engine)
