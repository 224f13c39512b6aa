"""Workload generators and arrival processes: seeding, distributions, file parsing and its errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conveyor.bench.arrivals import ArrivalProcess, parse_rates, with_arrivals
from conveyor.bench.datasets import load_jsonl, load_sharegpt, load_workload_file
from conveyor.bench.workloads import (LengthDist, TextSource, WorkloadError, shared_prefix_workload,
                                      synthetic_workload)


class WordTokenizer:
    """A tiny stand-in tokenizer: one id per whitespace-separated word (no model load)."""

    vocab_size = 100_000

    def __init__(self):
        self.words: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [self.words.setdefault(w, len(self.words) + 10) for w in text.split()]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        back = {v: k for k, v in self.words.items()}
        return " ".join(back[i] for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        return " ".join(f"<{m['role']}> {m['content']}" for m in messages) + " <assistant>"

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), False)


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- length distributions
def test_fixed_is_exact():
    assert LengthDist.parse("128").sample(50, _rng()) == [128] * 50


def test_uniform_stays_in_bounds_and_reaches_both():
    values = LengthDist.parse("uniform:3:7").sample(2000, _rng())
    assert min(values) == 3 and max(values) == 7
    assert set(values) == {3, 4, 5, 6, 7}


def test_normal_mean_and_clipping():
    values = np.array(LengthDist.parse("normal:200:20").sample(20000, _rng(1)))
    assert abs(values.mean() - 200) < 1.0
    assert abs(values.std() - 20) < 1.0
    clipped = LengthDist.parse("normal:100:50:80:120").sample(5000, _rng(2))
    assert min(clipped) == 80 and max(clipped) == 120


def test_mix_counts_are_exact_quotas():
    values = LengthDist.parse("32,128,512").sample(64, _rng())
    counts = {v: values.count(v) for v in (32, 128, 512)}
    assert sorted(counts.values()) == [21, 21, 22] and sum(counts.values()) == 64
    weighted = LengthDist.parse("10:1,20:3").sample(100, _rng())
    assert weighted.count(10) == 25 and weighted.count(20) == 75
    assert weighted[:25] != [10] * 25          # shuffled, not blocked


@pytest.mark.parametrize("spec", ["0", "abc", "uniform:9:3", "uniform:5", "normal:10", "normal:10:-1",
                                  "32,x", "32:0,64", "normal:100:5:50:40", "-4"])
def test_bad_length_specs_raise_with_syntax_help(spec):
    with pytest.raises(WorkloadError, match="uniform:32:512"):
        LengthDist.parse(spec)


def test_describe_round_trips():
    for spec in ("128", "uniform:32:512", "normal:128:32", "32:1,128:2"):
        d = LengthDist.parse(spec)
        assert LengthDist.parse(d.describe()) == d


# ---------------------------------------------------------------- synthetic workloads
def test_synthetic_seeded_and_exact_lengths():
    tok = WordTokenizer()
    a = synthetic_workload(20, LengthDist.parse("5,40"), LengthDist.parse("uniform:1:9"), tok, seed=3)
    b = synthetic_workload(20, LengthDist.parse("5,40"), LengthDist.parse("uniform:1:9"), tok, seed=3)
    c = synthetic_workload(20, LengthDist.parse("5,40"), LengthDist.parse("uniform:1:9"), tok, seed=4)
    assert [r.prompt_token_ids for r in a.requests] == [r.prompt_token_ids for r in b.requests]
    assert [r.max_tokens for r in a.requests] == [r.max_tokens for r in b.requests]
    assert [r.prompt_token_ids for r in a.requests] != [r.prompt_token_ids for r in c.requests]
    for r in a.requests:
        assert len(r.prompt_token_ids) == r.prompt_len in (5, 40)
        assert isinstance(r.prompt, str) and len(r.prompt.split()) == r.prompt_len  # real words
        assert 1 <= r.max_tokens <= 9
    assert sorted(r.prompt_len for r in a.requests).count(5) == 10


def test_synthetic_without_tokenizer_gives_token_ids():
    w = synthetic_workload(4, LengthDist.parse("7"), LengthDist.parse("3"), None, seed=0, vocab_size=50)
    for r in w.requests:
        assert r.prompt == r.prompt_token_ids and len(r.prompt) == 7
        assert all(10 <= t < 50 for t in r.prompt)


def test_prompts_do_not_share_a_common_start():
    w = synthetic_workload(8, LengthDist.parse("16"), LengthDist.parse("4"), WordTokenizer(), seed=0)
    assert len({tuple(r.prompt_token_ids[:4]) for r in w.requests}) > 1


def test_text_source_wraps_around_the_builtin_text():
    src = TextSource(WordTokenizer())
    ids = src.take(3 * len(src.pool), _rng())
    assert len(ids) == 3 * len(src.pool) and set(ids) == set(src.pool)


def test_shared_prefix_workload():
    w = shared_prefix_workload(6, 12, LengthDist.parse("4"), LengthDist.parse("8"), WordTokenizer(), seed=1)
    prefixes = {tuple(r.prompt_token_ids[:12]) for r in w.requests}
    assert len(prefixes) == 1
    assert all(r.prompt_len == 16 and r.max_tokens == 8 for r in w.requests)
    assert len({tuple(r.prompt_token_ids[12:]) for r in w.requests}) > 1
    assert w.max_request_tokens == 24
    with pytest.raises(WorkloadError):
        shared_prefix_workload(2, 0, LengthDist.parse("4"), LengthDist.parse("8"))


# ---------------------------------------------------------------- arrivals
def test_all_at_once():
    assert ArrivalProcess().offsets(5, _rng()) == [0.0] * 5


def test_poisson_mean_gap_and_cv():
    times = np.array(ArrivalProcess(rate=4.0).offsets(20001, _rng(7)))
    gaps = np.diff(times)
    assert times[0] == 0.0 and np.all(gaps >= 0)
    assert abs(gaps.mean() - 0.25) < 0.25 * 0.03
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05         # exponential: CV = 1


def test_burstiness_changes_variance_not_mean():
    for burstiness in (0.25, 4.0):
        gaps = np.diff(ArrivalProcess(rate=2.0, burstiness=burstiness).offsets(40001, _rng(8)))
        assert abs(gaps.mean() - 0.5) < 0.5 * 0.05
        cv2 = gaps.var() / gaps.mean() ** 2
        assert abs(cv2 - 1 / burstiness) < 0.1 * (1 / burstiness)


def test_arrivals_are_seeded_and_do_not_change_prompts():
    w = synthetic_workload(10, LengthDist.parse("8"), LengthDist.parse("4"), WordTokenizer(), seed=0)
    a = with_arrivals(w, ArrivalProcess(3.0), seed=1)
    b = with_arrivals(w, ArrivalProcess(3.0), seed=1)
    c = with_arrivals(w, ArrivalProcess(3.0), seed=2)
    assert [r.arrival_s for r in a.requests] == [r.arrival_s for r in b.requests]
    assert [r.arrival_s for r in a.requests] != [r.arrival_s for r in c.requests]
    assert [r.prompt_token_ids for r in a.requests] == [r.prompt_token_ids for r in w.requests]
    assert a.spec["arrivals"] == {"rate": 3.0, "burstiness": 1.0, "seed": 1}


def test_rate_parsing():
    assert parse_rates("inf") == [math.inf]
    assert parse_rates("1,2.5,inf") == [1.0, 2.5, math.inf]
    for bad in ("0", "-1", "fast", "1,,2"):
        with pytest.raises(WorkloadError, match="request rate"):
            parse_rates(bad)
    with pytest.raises(WorkloadError):
        ArrivalProcess(rate=1.0, burstiness=0.0)


# ---------------------------------------------------------------- files
def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_jsonl_replay(tmp_path):
    rows = [{"prompt": "a b c", "max_tokens": 4, "arrival_s": 0.5, "priority": 2, "tenant": "x"},
            {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 2, "id": "m"},
            {"prompt": [5, 6, 7, 8], "max_tokens": 1}]
    path = _write(tmp_path, "w.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    w = load_jsonl(path, WordTokenizer())
    a, m, ids = w.requests
    assert (a.prompt, a.prompt_len, a.max_tokens, a.arrival_s, a.priority, a.tenant) == ("a b c", 3, 4, 0.5, 2, "x")
    assert m.request_id == "m" and m.prompt == "<user> hi there <assistant>" and m.prompt_len == 4
    assert ids.prompt == [5, 6, 7, 8] and ids.prompt_len == 4
    assert w.spec["file_arrivals"] is True
    assert [r.max_tokens for r in load_jsonl(path, WordTokenizer(), max_tokens=9).requests] == [9, 9, 9]


def test_peer_workload_file_parses():
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "peers", "workload_small.jsonl")
    if not os.path.exists(path):
        pytest.skip("shared peer workload not present")
    w = load_workload_file(path)
    assert len(w.requests) == 64
    assert {r.prompt_len for r in w.requests} == {32, 128, 512}   # from its prompt_tokens field


@pytest.mark.parametrize("line, message", [
    ("not json", "line 1: not valid JSON"),
    ("[1, 2]", "line 1: expected a JSON object"),
    ('{"max_tokens": 3}', "exactly one of 'prompt' or 'messages'"),
    ('{"prompt": "x", "messages": [], "max_tokens": 3}', "exactly one of"),
    ('{"prompt": "", "max_tokens": 3}', "non-empty string or a list of token ids"),
    ('{"prompt": "x"}', "'max_tokens' must be a positive integer.*--output-len"),
    ('{"prompt": "x", "max_tokens": 0}', "'max_tokens' must be a positive integer"),
    ('{"prompt": "x", "max_tokens": "4"}', "'max_tokens' must be a positive integer"),
    ('{"prompt": "x", "max_tokens": 3, "arrival_s": -1}', "'arrival_s' must be a number >= 0"),
    ('{"prompt": "x", "max_tokens": 3, "priority": "high"}', "'priority' must be an integer"),
    ('{"prompt": "x", "max_tokens": 3, "tenant": 5}', "'tenant' must be a string"),
    ('{"messages": "hi", "max_tokens": 3}', "'messages' must be a non-empty list"),
    ('{"prompt": "x", "max_tokens": 3, "ignore_eos": "no"}', "'ignore_eos' must be true or false"),
    ('{"prompt": "x", "max_tokens": 3, "ignore_eos": 0}', "'ignore_eos' must be true or false"),
    ('{"prompt": "x", "max_tokens": 3, "ignore_eos": null}', "'ignore_eos' must be true or false"),
])
def test_jsonl_errors_name_line_and_field(tmp_path, line, message):
    path = _write(tmp_path, "bad.jsonl", '{"prompt": "ok", "max_tokens": 1}\n' + line + "\n")
    with pytest.raises(WorkloadError, match=message.replace("line 1", "line 2")):
        load_jsonl(path, WordTokenizer())


def test_jsonl_ignore_eos_reaches_the_engine_and_the_http_body(tmp_path):
    from conveyor.bench.http_client import completion_payload
    from conveyor.bench.offline import bench_params
    path = _write(tmp_path, "e.jsonl", '{"prompt": "a", "max_tokens": 2}\n'
                  '{"prompt": "b", "max_tokens": 2, "ignore_eos": false}\n')
    default, ends = load_jsonl(path, WordTokenizer()).requests
    assert (default.ignore_eos, ends.ignore_eos) == (True, False)   # default: exact max_tokens
    assert bench_params(2, ends.ignore_eos).ignore_eos is False
    assert completion_payload(ends, "m")["ignore_eos"] is False
    assert completion_payload(default, "m")["ignore_eos"] is True


def test_jsonl_messages_need_a_tokenizer_and_files_must_exist(tmp_path):
    path = _write(tmp_path, "m.jsonl", '{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}\n')
    with pytest.raises(WorkloadError, match="--tokenizer"):
        load_jsonl(path, None)
    with pytest.raises(WorkloadError, match="cannot read workload file"):
        load_jsonl(str(tmp_path / "missing.jsonl"))
    with pytest.raises(WorkloadError, match="no requests"):
        load_jsonl(_write(tmp_path, "empty.jsonl", "\n\n"))


def test_sharegpt(tmp_path):
    convs = [{"conversations": [{"from": "human", "value": "one two three four five"},
                                {"from": "gpt", "value": "six seven eight"}]},
             {"conversations": [{"from": "human", "value": "too short"}, {"from": "gpt", "value": "x"}]},
             {"conversations": [{"from": "human", "value": "only one turn here"}]},
             {"conversations": [{"from": "human", "value": "a b c d e f"}, {"from": "gpt", "value": "g h"}]}]
    path = _write(tmp_path, "sg.json", json.dumps(convs))
    w = load_workload_file(path, WordTokenizer())
    assert w.name == "sharegpt"
    assert [(r.prompt_len, r.max_tokens) for r in w.requests] == [(5, 3), (6, 2)]
    sampled = load_sharegpt(path, WordTokenizer(), num_requests=1, seed=0)
    assert len(sampled.requests) == 1
    assert [r.max_tokens for r in load_sharegpt(path, WordTokenizer(), max_tokens=7).requests] == [7, 7]


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "'conversations' list"),
    ('[{"conversations": [{"from": "human"}, {"value": "x"}]}]', "string 'value'"),
    ('[{"conversations": [{"value": "a"}, {"value": "b"}]}]', "no usable conversation"),
    ("[1, ", "not valid JSON"),
])
def test_sharegpt_errors(tmp_path, text, message):
    path = _write(tmp_path, "sg.json", text)
    with pytest.raises(WorkloadError, match=message):
        load_workload_file(path, WordTokenizer())
    with pytest.raises(WorkloadError, match="need a tokenizer"):
        load_sharegpt(path, None)
