"""Speculative decoding's parts alone: n-gram and suffix proposers, the adaptive policy and its
step-cost fit, draft limits, the config, and the verifier's distribution (chi-square)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conveyor.config import SpeculativeConfig
from conveyor.core.request import Request
from conveyor.core.spec_policy import SpecPolicy
from conveyor.core.step_cost import StepCostModel, StepFeatures
from conveyor.core.speculation import SpecDecodeStats, accept_drafts, history_scope
from conveyor.errors import ConfigError
from conveyor.sampling import SamplingMetadata
from conveyor.sampling_params import SamplingParams
from conveyor.spec_decode.ngram import ngram_continuation
from conveyor.spec_decode.suffix import SuffixProposer
from conveyor.spec_decode.verifier import verify, verify_argmax


def test_ngram_continues_the_latest_longest_match():
    tokens = np.array([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3])
    assert ngram_continuation(tokens, 1, 3, 2) == [7, 8]      # "2 3" last seen before "7 8"
    assert ngram_continuation(np.array([4, 5, 6]), 1, 3, 2) == []
    assert ngram_continuation(np.array([1, 2, 1, 2]), 2, 2, 5) == [1, 2]   # never past the end


def test_ngram_draft_length_follows_the_match_length():
    """A draft is at most twice the matched context: one common token is a weak guess, a long
    matched passage is being copied."""
    passage = np.arange(100, 140)                       # 40 distinct tokens
    weak = np.concatenate([passage, [7, 100]])          # only "100" matches (n = 1)
    assert ngram_continuation(weak, 1, 8, 16) == [101, 102]
    strong = np.concatenate([passage, [7], passage[:8]])   # the first 8 tokens again (n = 8)
    assert ngram_continuation(strong, 1, 8, 16) == list(range(108, 124))
    assert ngram_continuation(strong, 1, 8, 5) == list(range(108, 113))   # never more than k


def test_suffix_draft_length_follows_the_match_length():
    passage = list(range(100, 140))
    proposer = SuffixProposer(1, 8, 0)
    weak = proposer.propose({"w": (passage + [7, 100], 16)}, {"w": ""})["w"]
    assert weak == [101, 102]                            # matched on one token: two drafts
    strong = proposer.propose({"s": (passage + [7] + passage[:8], 16)}, {"s": ""})["s"]
    assert strong == list(range(108, 124))               # matched on eight: sixteen


def test_suffix_proposer_follows_own_history_then_finished_requests():
    p = SuffixProposer(1, 3, max_requests=1)
    assert p.propose({"a": ([1, 2, 3, 4, 1, 2], 3)}, {"a": "t"}) == {"a": [3, 4, 1]}
    p.drop("a", finished=True)
    assert p.propose({"b": ([9, 3, 4], 2)}, {"b": "t"}) == {"b": [1, 2]}   # from a's tokens
    p.drop("b", finished=True)                                              # evicts a
    assert p.propose({"c": ([7, 1, 2], 2)}, {"c": "t"}) == {}


def test_suffix_history_never_crosses_tenants_and_stays_bounded():
    p = SuffixProposer(1, 3, max_requests=2)
    p.propose({"a": ([1, 2, 3, 4, 5, 6], 3)}, {"a": "alice"})
    p.drop("a", finished=True)
    assert p.propose({"b": ([9, 3, 4], 2)}, {"b": "bob"}) == {}            # alice's text: no
    assert p.propose({"c": ([9, 3, 4], 2)}, {"c": "alice"}) == {"c": [5, 6]}
    p.drop("b", finished=True)
    p.drop("c", finished=True)                  # 3 finished outputs, bound 2: alice's first goes
    assert len(p.finished) == 2 and set(p.shared) == {"alice", "bob"}
    assert p.propose({"d": ([8, 3, 4], 2)}, {"d": "alice"}) == {}
    p.propose({"e": ([7], 1)}, {"e": "carol"})
    p.drop("e", finished=True)                  # bob's only output evicted: his index goes too
    assert set(p.shared) == {"alice", "carol"}
    assert p.propose({"f": ([5, 9], 1)}, {"f": "alice"}) == {"f": [3]}     # c's 9 3 4 remains


def test_history_scope_follows_the_prefix_cache_scope():
    a = Request("a", [1], SamplingParams(), max_tokens=5, tenant="alice")
    b = Request("b", [1], SamplingParams(), max_tokens=5, tenant="bob")
    salted = Request("s", [1], SamplingParams(), max_tokens=5, tenant="alice", cache_salt="x")
    assert history_scope(a, True) != history_scope(b, True)
    assert history_scope(a, False) == history_scope(b, False)           # global prefix cache
    assert history_scope(salted, False) not in (history_scope(a, False), history_scope(a, True))


def _one(rid: str, ctx: int = 0) -> tuple[StepFeatures, dict[str, int]]:
    return StepFeatures.of([(1, ctx)]), {rid: ctx}


def _many(n: int, ctx: int = 0) -> tuple[dict[str, int], StepFeatures, dict[str, int]]:
    ids = [f"r{i}" for i in range(n)]
    return {r: 4 for r in ids}, StepFeatures.of([(1, ctx)] * n), {r: ctx for r in ids}


def test_policy_skips_large_batches_and_low_acceptance():
    cost = StepCostModel()                          # the engine's one fit, as EngineCore feeds it
    for n in list(range(1, 40)) + list(range(64, 128, 8)):
        cost.observe(StepFeatures(n, 1, 0.0), 0.030 + 0.001 * n)   # 30 ms fixed, 1 ms a token
    # one row every step: the row term and the intercept are one (the fit splits them)
    k = cost.coefficients
    assert k["intercept"] + k["per_row"] == pytest.approx(0.030, rel=1e-3)
    assert cost.token_seconds(3, 0) == pytest.approx(0.001, rel=1e-3)
    policy = SpecPolicy(4, cost)
    assert policy.plan({"solo": 4}, *_one("solo")) == {"solo": 4}
    assert policy.plan(*_many(200)) == {}
    for _ in range(20):
        policy.record("bad", 4, 0)
        policy.record("good", 4, 4)
    assert policy.plan({"bad": 4, "good": 4}, StepFeatures.of([(1, 0)] * 2),
                       {"bad": 0, "good": 0}) == {"good": 4}
    assert SpecPolicy(4, None).plan({"x": 2, "y": 0}, *_many(1)[1:]) == {"x": 2}


def test_policy_prices_drafts_with_every_token_term():
    """One user at a time: the steps' whole slope may land on the attention term (the fit is
    non-negative and the rows never vary), leaving ``per_token`` at 0. The drafts' cost is still
    what the fit says a token costs at the request's depth, so drafting stays priced (it used to
    read as "unknown" there and fall back to one draft a step, which kept the steps too alike to
    ever fit a slope: one-user speculation collapsed on a loaded machine)."""
    cost = StepCostModel()
    for ctx in range(300, 700, 10):
        for n in (1, 2, 5, 9, 17):
            pairs = n * (ctx + (n + 1) / 2)
            cost.observe(StepFeatures(n, 1, pairs), 0.012 + 1e-6 * pairs)  # slope all in attention
        prompt = ctx * (ctx + 1) / 2                # each chat's prefill (what makes it ready)
        cost.observe(StepFeatures(ctx, 1, prompt), 0.012 + 1e-6 * prompt)
    assert cost.is_ready
    k = cost.coefficients
    assert k["per_token"] == pytest.approx(0.0, abs=1e-6)
    assert cost.token_seconds(1, 500) == pytest.approx(1e-6 * 502, rel=1e-2)
    policy = SpecPolicy(16, cost)
    for _ in range(20):
        policy.record("copy", 8, 8)
        policy.record("paraphrase", 8, 0)
        policy.record("half", 8, 4)                 # alpha ~0.8
    assert policy.plan({"copy": 16}, *_one("copy", 500)) == {"copy": 16}    # 0.5 ms vs a 12 ms step
    # alpha ~0.09: one position still pays (0.09 x 12.5 ms > 0.5 ms), a second does not
    assert policy.plan({"paraphrase": 16}, *_one("paraphrase", 500)) == {"paraphrase": 1}
    # deeper requests pay more per position: at 20,000 tokens a position costs 20 ms
    assert policy.plan({"half": 16}, *_one("half", 500))["half"] >= 8
    assert policy.plan({"half": 16}, *_one("half", 20_000))["half"] <= 2


def test_policy_explores_when_the_fit_prices_tokens_at_nothing():
    """A fit with no token slope at all says drafts are free: full drafts, whose larger steps
    are what corrects the fit (one draft each would keep every step the same size)."""
    cost = StepCostModel()
    for n in list(range(1, 40)) + list(range(64, 128, 8)):
        cost.observe(StepFeatures(n, 1, 0.0), 0.030)
    assert cost.token_seconds(1, 100) == pytest.approx(0.0, abs=1e-9)
    policy = SpecPolicy(8, cost)
    assert policy.plan({"a": 8, "b": 3}, StepFeatures.of([(1, 50)] * 2),
                       {"a": 50, "b": 50}) == {"a": 8, "b": 3}


def test_acceptance_counts_only_positions_reached():
    """A long draft rejected after a long accepted run is a high acceptance rate: the positions
    after the rejection were never tried (counting them as failures would stop long drafts)."""
    policy = SpecPolicy(24, None)
    for _ in range(30):
        policy.record("copy", 24, 11)       # 11 accepted, then a rejection: 11 of 12 trials
        policy.record("full", 8, 8)         # all accepted: 8 of 8, no rejection
        policy.record("none", 24, 0)        # first position rejected: 0 of 1
    assert policy.alpha("copy") == pytest.approx(11 / 12, abs=0.01)
    assert policy.alpha("full") > 0.98
    assert policy.alpha("none") < 0.2       # (its prior is the others' high rate)


def test_new_request_starts_from_the_engines_recent_rate():
    policy = SpecPolicy(8, None)
    assert policy.alpha("first") == pytest.approx(0.5)       # nothing seen yet
    for i in range(50):
        policy.record(f"done-{i}", 8, 8)                      # everyone before copied well
    assert policy.alpha("new") > 0.9
    for _ in range(30):
        policy.record("new", 8, 0)                            # its own evidence wins
    assert policy.alpha("new") < 0.2


def test_policy_drafts_one_until_costs_are_measured():
    """A fresh engine knows no step costs: a 64-request batch must not verify 16 drafts each
    before the fit says whether that pays; one draft each is cheap and varies the step sizes."""
    policy = SpecPolicy(16, StepCostModel())              # nothing observed: not ready
    limits, base, contexts = _many(64)
    assert policy.plan(limits, base, contexts) == {f"r{i}": 1 for i in range(64)}
    assert policy.plan({"x": 0}, *_one("x")) == {}


def test_measured_cost_needs_data():
    cost = StepCostModel()
    for _ in range(10):
        cost.observe(StepFeatures(5, 1, 0.0), 0.01)
    assert not cost.is_ready                       # one token count: no slope to fit


def test_drafts_never_pass_max_tokens():
    req = Request("r", [1, 2, 3], SamplingParams(), max_tokens=5, output_token_ids=[4, 5])
    assert accept_drafts(req, [6, 7, 8, 9], max_model_len=100) == [6, 7]
    assert accept_drafts(req, [6, 7, 8, 9], max_model_len=7) == [6]


def test_stats_counts_per_position():
    s = SpecDecodeStats()
    s.record(3, 2)
    s.record(2, 0)
    assert (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens) == (2, 5, 2)
    assert s.accepted_per_position == [1, 1, 0]
    assert s.mean_accepted_length == 2.0


def test_config_from_json():
    c = SpeculativeConfig.from_json('{"method":"ngram","num_speculative_tokens":5,'
                                    '"prompt_lookup_max":3,"prompt_lookup_min":2}')
    assert (c.num_speculative_tokens, c.prompt_lookup_max) == (5, 3)
    for bad in ('{"method":"medusa"}', '{"nope":1}', "not json", '{"method":"draft_model"}',
                '{"num_speculative_tokens":0}'):
        with pytest.raises(ConfigError):
            SpeculativeConfig.from_json(bad)


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_verified_tokens_follow_the_target_distribution():
    """Position 0 (draft 3 accepted or a recovered token) and position 1 given acceptance
    (bonus after draft 3) must follow the target rows; a verifier that always accepted, or
    recovered from p unrestricted, fails this (chi-square, 7 dof, 99.9%: 24.3)."""
    torch.manual_seed(0)
    vocab, n = 8, 6000
    row0 = torch.tensor([2.0, 0.5, 0.1, 1.5, -1.0, 0.0, 0.3, 1.0])
    row1 = torch.tensor([0.0, 1.0, -0.5, 0.2, 2.0, 0.1, -1.0, 0.7])
    logits = torch.stack([row0, row1] * n)                     # [2n, vocab]: one draft each
    params = [SamplingParams(temperature=1.0)] * (2 * n)
    md = SamplingMetadata.build(params, [[0]] * (2 * n), [[]] * (2 * n), [None] * (2 * n),
                                frozenset(), vocab, "cpu")
    gen = torch.Generator().manual_seed(1)
    rows = verify(logits, md, [f"r{i}" for i in range(n)], [[3]] * n, gen)
    by_req: dict[str, list[int]] = {}
    for rid, token, _, _ in rows:
        by_req.setdefault(rid, []).append(token)
    first = np.bincount([t[0] for t in by_req.values()], minlength=vocab)
    second = np.bincount([t[1] for t in by_req.values() if len(t) == 2], minlength=vocab)
    assert _chi_square(first, row0.softmax(-1).numpy()) < 24.3
    assert _chi_square(second, row1.softmax(-1).numpy()) < 24.3
    assert all(len(t) == 2 for t in by_req.values() if t[0] == 3)   # accepted -> bonus token
    assert all(len(t) == 1 for t in by_req.values() if t[0] != 3)


def test_greedy_verification_accepts_the_argmax_prefix():
    logits = torch.zeros(4, 5)
    logits[0, 1] = logits[1, 2] = logits[2, 4] = logits[3, 0] = 1.0
    md = SamplingMetadata.build([SamplingParams(temperature=0.0)] * 4, [[0]] * 4, [[]] * 4,
                                [None] * 4, frozenset(), 5, "cpu")
    rows = verify(logits, md, ["a"], [[1, 2, 3]], None)
    assert [t for _, t, _, _ in rows] == [1, 2, 4]           # 3 rejected, 4 recovered


def test_argmax_fast_path_equals_the_verifier():
    """``verify_argmax`` (plain-greedy steps skip the metadata) against ``verify`` itself:
    partly, fully and not accepted drafts, and a request without drafts, in one batch."""
    torch.manual_seed(3)
    vocab = 50
    logits = torch.randn(10, vocab)
    best = logits.argmax(dim=-1).tolist()
    drafts = [[best[0], best[1], 7 if best[2] != 7 else 8],   # rows 0-3: two accepted
              [best[4], best[5]],                              # rows 4-6: all, then the bonus
              [],                                              # row 7: no drafts
              [best[8] + 1 if best[8] + 1 < vocab else 0]]     # rows 8-9: first rejected
    ids = ["a", "b", "c", "d"]
    md = SamplingMetadata.build([SamplingParams(temperature=0.0)] * 10, [[0]] * 10, [[]] * 10,
                                [None] * 10, frozenset(), vocab, "cpu")
    firsts = [0, 4, 7, 8]
    assert verify_argmax(best, ids, drafts, firsts) == verify(logits, md, ids, drafts, None)
    assert [t for rid, t, _, _ in verify_argmax(best, ids, drafts, firsts) if rid == "b"] == best[4:7]
    # a request dropped from between (its rows failed): the others keep their own rows
    assert verify_argmax(best, ["a", "d"], [drafts[0], drafts[3]], [0, 8]) == \
        [r for r in verify(logits, md, ids, drafts, None) if r[0] in ("a", "d")]
