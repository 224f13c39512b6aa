"""Engine-level behaviour on a tiny random-weight Llama: policies, sampling, stops, streaming."""

from __future__ import annotations

import pytest

from conftest import run_engine
from conveyor.core.outputs import EngineCoreOutput
from conveyor.errors import InvalidRequestError
from conveyor.sampling_params import SamplingParams
from conveyor.engine.llm_engine import LLMEngine
from conveyor.engine.llm import LLM


def make_engine(path, **kw):
    args = dict(model=path, dtype="float32", max_num_seqs=4, max_num_batched_tokens=32, num_blocks=64,
                block_size=8)
    args.update(kw)
    return LLMEngine.from_kwargs(**args)


PROMPTS = [[(13 * i + 7 * j) % 40000 + 20 for j in range(n)] for i, n in enumerate([5, 31, 12, 60, 3, 17, 44])]
MAX_TOKENS = [9, 4, 15, 6, 20, 1, 11]


def greedy_outputs(engine):
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
           for p, m in zip(PROMPTS, MAX_TOKENS)]
    finals = run_engine(engine)
    engine.check_invariants()
    assert engine.core.kv_manager.pool.num_free_blocks == engine.num_kv_blocks
    return [finals[i].outputs[0].token_ids for i in ids]


@pytest.mark.parametrize("kw", [
    dict(batching="static", batch_timeout_s=0.0), dict(batching="dynamic", batch_timeout_s=0.0),
    dict(kv_allocation="reservation", num_blocks=24), dict(num_blocks=14, max_num_batched_tokens=16),
    dict(attention_backend="reference"), dict(enable_chunked_prefill=False, max_num_batched_tokens=64)])
def test_every_policy_and_backend_gives_the_continuous_reference_output(tiny_llama_dir, kw):
    reference = greedy_outputs(make_engine(tiny_llama_dir))
    backend = kw.pop("attention_backend", "sdpa")
    engine = LLMEngine.from_kwargs(attention_backend=backend, **{
        **dict(model=tiny_llama_dir, dtype="float32", max_num_seqs=4, max_num_batched_tokens=32,
               num_blocks=64, block_size=8), **kw})
    assert greedy_outputs(engine) == reference
    assert [len(t) for t in reference] == MAX_TOKENS


def test_static_batching_really_executes_padding(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, batching="static", batch_timeout_s=0.0)
    seen = []
    original = engine.runner.execute
    engine.runner.execute = lambda s: (seen.append(s.num_padding_tokens), original(s))[1]
    greedy_outputs(engine)
    assert sum(seen) > 0


def test_seeded_sampling_same_alone_and_in_a_batch_of_16(tiny_llama_dir):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=24, ignore_eos=True)
    alone = make_engine(tiny_llama_dir)
    rid = alone.add_request(PROMPTS[1], params)
    expected = run_engine(alone)[rid].outputs[0].token_ids
    crowded = make_engine(tiny_llama_dir, max_num_seqs=16, num_blocks=128, max_num_batched_tokens=48)
    others = [crowded.add_request(PROMPTS[i % 7], SamplingParams(
        temperature=1.0, seed=None if i % 2 else i, max_tokens=20, ignore_eos=True)) for i in range(8)]
    target = crowded.add_request(PROMPTS[1], params)
    others += [crowded.add_request(PROMPTS[i % 7], SamplingParams(temperature=0.7, max_tokens=30,
                                                                   ignore_eos=True)) for i in range(7)]
    finals = run_engine(crowded)
    assert finals[target].outputs[0].token_ids == expected
    crowded.check_invariants()


def test_stop_string_spanning_two_tokens_is_found_and_trimmed(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    tok = engine.tokenizer
    base = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    rid = engine.add_request(PROMPTS[0], base)
    full = run_engine(engine)[rid].outputs[0]
    pieces = [tok.decode(full.token_ids[:i]) for i in range(len(full.token_ids) + 1)]
    # last character of token k's text + first character of token k+1's: spans the boundary,
    # and must not occur earlier in the text
    span = lambda i: pieces[i + 1][len(pieces[i]) - 1:len(pieces[i]) + 1]  # noqa: E731
    k = next(i for i in range(3, len(pieces) - 1)
             if len(pieces[i]) - len(pieces[i - 1]) >= 1 and len(pieces[i + 1]) - len(pieces[i]) >= 1
             and len(span(i)) == 2 and span(i) not in pieces[i])
    stop = span(k)
    rid = engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                          stop=[stop]))
    out = run_engine(engine)[rid].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == pieces[k + 1][:pieces[k + 1].index(stop)]
    assert len(out.token_ids) == k + 1
    engine.check_invariants()
    assert engine.core.kv_manager.pool.num_free_blocks == engine.num_kv_blocks


def test_emoji_split_across_tokens_streams_intact(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    tok = engine.tokenizer
    text = "Party 🎉👋🏽 done"
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(1, len(ids)))   # really split
    rid = engine.add_request([5, 6, 7], SamplingParams(max_tokens=len(ids), ignore_eos=True))
    child = engine.output_processor.children[rid].request_id
    deltas = []
    for i, t in enumerate(ids):
        finish = "length" if i == len(ids) - 1 else None
        for out in engine.output_processor.process([EngineCoreOutput(child, [t], finish_reason=finish)]):
            deltas.append(out.outputs[0].delta_text)
    engine.abort_request(rid)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_logprobs_and_n(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    rid = engine.add_request(PROMPTS[2], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=5,
                                                          logprobs=3, ignore_eos=True))
    out = run_engine(engine)[rid]
    assert len(out.outputs) == 3 and [c.index for c in out.outputs] == [0, 1, 2]
    for c in out.outputs:
        assert len(c.logprobs) == 5 and all(len(lp.top) == 3 for lp in c.logprobs)
        assert c.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in c.logprobs))
        for lp in c.logprobs:
            assert lp.top[0][1] >= lp.logprob - 1e-5
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    engine.check_invariants()


def test_outputs_already_handed_out_never_change(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    rid = engine.add_request(PROMPTS[0], SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=6,
                                                        logprobs=1, ignore_eos=True))
    seen = []                   # (output, what it held when handed out)
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == rid
            seen.append((out, [(c.text, list(c.token_ids), c.delta_text, list(c.delta_token_ids),
                                len(c.logprobs), c.finish_reason) for c in out.outputs]))
    assert len(seen) >= 6 and seen[-1][0].finished
    for out, held in seen:
        assert [(c.text, c.token_ids, c.delta_text, c.delta_token_ids, len(c.logprobs),
                 c.finish_reason) for c in out.outputs] == held
    lengths = [len(held[0][1]) for _, held in seen]
    assert lengths == sorted(lengths) and lengths[-1] == 6     # cumulative, one step at a time
    assert_blocks_free(engine)


def assert_blocks_free(engine):
    engine.check_invariants()
    assert engine.core.kv_manager.pool.num_free_blocks == engine.num_kv_blocks


@pytest.mark.parametrize("prompt,params,field", [
    ("", SamplingParams(), "prompt"),
    ([], SamplingParams(), "prompt"),
    ([1] * 2000, SamplingParams(), "prompt"),
    ([10, 11], SamplingParams(max_tokens=5000), "max_tokens"),
    ([10, 99999999], SamplingParams(), "prompt"),
])
def test_invalid_requests_are_rejected_with_the_field(tiny_llama_dir, prompt, params, field):
    engine = make_engine(tiny_llama_dir, num_blocks=128)
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request(prompt, params)
    assert e.value.param == field
    assert not engine.has_unfinished_requests()
    engine.check_invariants()


@pytest.mark.parametrize("kw", [dict(max_tokens=-1), dict(top_p=0.0), dict(top_p=1.5),
                                dict(temperature=-0.1), dict(stop=[1, 2]), dict(stop=5)])
def test_invalid_sampling_params_say_what_to_change(kw):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kw)
    assert e.value.param in kw and str(e.value)


def test_llm_generate_keeps_prompt_order_and_timings(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="float32", num_blocks=64, max_num_seqs=2)
    outs = llm.generate(["a b c", "hello there, how are you", "x"],
                        SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert [o.prompt for o in outs] == ["a b c", "hello there, how are you", "x"]
    for o in outs:
        m = o.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
        assert len(o.outputs[0].token_ids) == 3
    llm.engine.check_invariants()
