"""Tests for conveyor.sampling: filters and penalties against per-row reference implementations,
greedy exactness, seeded reproducibility across batch compositions, distribution sanity, logprobs.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conveyor.sampling import Sampler, SamplerOutput, SamplingMetadata
from conveyor.sampling.penalties import token_counts
from conveyor.sampling.sampler import processed_logits, sampling_probs
from conveyor.sampling_params import SamplingParams as SP

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FAST = settings(max_examples=40, deadline=None)
MARGIN = 1e-4  # reference cases closer than this to a top-p / min-p boundary are skipped


def build(params, vocab, prompts=None, outputs=None, gens=None, eos=frozenset(), device="cpu"):
    n = len(params)
    return SamplingMetadata.build(
        params, prompts if prompts is not None else [[] for _ in range(n)],
        outputs if outputs is not None else [[] for _ in range(n)],
        gens if gens is not None else [None] * n, eos, vocab, device)


def rand_logits(n, vocab, seed, scale=3.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, vocab, generator=g) * scale).to(device)


# ---------------------------------------------------------------- reference implementations

def ref_probs(row, p: SP):
    """Per-row reference of temperature/top-k/top-p/min-p in float64, written from the definitions.

    Returns (probs as a list, ambiguous) where ambiguous means a top-p/min-p boundary is too close
    to call in float32.
    """
    logits = [float(x) / p.temperature for x in row]
    if p.top_k > 0:
        kth = sorted(logits, reverse=True)[min(p.top_k, len(logits)) - 1]
        logits = [x if x >= kth else -math.inf for x in logits]
    probs = _softmax(logits)
    ambiguous = False
    if p.top_p < 1.0:
        order = sorted(range(len(probs)), key=lambda t: -probs[t])
        keep, total = set(), 0.0
        for t in order:
            keep.add(t)
            ambiguous |= abs(total + probs[t] - p.top_p) < MARGIN
            total += probs[t]
            if total >= p.top_p:
                break
        probs = _renorm([q if t in keep else 0.0 for t, q in enumerate(probs)])
    if p.min_p > 0.0:
        top = max(probs)
        ambiguous |= any(q > 0 and abs(q / top - p.min_p) < MARGIN for q in probs)
        probs = _renorm([q if q >= p.min_p * top else 0.0 for q in probs])
    return probs, ambiguous


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) if x != -math.inf else 0.0 for x in xs]
    return _renorm(e)


def _renorm(xs):
    s = sum(xs)
    return [x / s for x in xs]


def ref_penalised(row, p: SP, prompt, output, eos):
    """Per-row reference of banned ids and the three penalties, one token at a time."""
    out = [float(x) for x in row]
    if len(output) < p.min_tokens:
        for t in set(eos) | set(p.stop_token_ids):
            if t < len(out):
                out[t] = -math.inf
    for t in set(prompt) | set(output):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t, c in Counter(output).items():
        out[t] -= p.frequency_penalty * c + p.presence_penalty
    return out


# ---------------------------------------------------------------- strategies

def filter_params(which):
    """SamplingParams with a random temperature and the named filter(s) randomly on or off."""
    return st.builds(
        SP,
        temperature=st.floats(0.5, 2.0),
        top_k=st.integers(-1, 40) if "top_k" in which else st.just(0),
        top_p=st.floats(0.05, 1.0) if "top_p" in which else st.just(1.0),
        min_p=st.floats(0.0, 0.9) if "min_p" in which else st.just(0.0),
    )


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("device", DEVICES)
@FAST
@given(n=st.integers(1, 8), vocab=st.integers(2, 64), seed=st.integers(0, 2**31))
def test_greedy_is_argmax_and_draws_nothing(device, n, vocab, seed):
    logits = rand_logits(n, vocab, seed, device=device)
    gen = torch.Generator(device=device).manual_seed(7)
    row_gens = [torch.Generator(device=device).manual_seed(i) if i % 2 else None for i in range(n)]
    before = [g.get_state() for g in [gen] + [g for g in row_gens if g is not None]]
    md = build([SP(temperature=0.0, seed=i) for i in range(n)], vocab, gens=row_gens, device=device)
    out = Sampler(gen)(logits, md)
    assert out.sampled_token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs is None and out.top_logprobs is None
    after = [g.get_state() for g in [gen] + [g for g in row_gens if g is not None]]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("which", [("top_k",), ("top_p",), ("min_p",), ("top_k", "top_p", "min_p")])
@FAST
@given(data=st.data(), vocab=st.integers(2, 50), seed=st.integers(0, 2**31))
def test_filters_match_reference(which, data, vocab, seed):
    n = data.draw(st.integers(1, 6))
    params = data.draw(st.lists(filter_params(which), min_size=n, max_size=n))
    logits = rand_logits(n, vocab, seed)
    refs = [ref_probs(logits[i].tolist(), p) for i, p in enumerate(params)]
    assume(not any(amb for _, amb in refs))
    md = build(params, vocab)
    probs = sampling_probs(processed_logits(logits, md), md)  # [n, vocab]
    for i, (ref, _) in enumerate(refs):
        got_support = {t for t, q in enumerate(probs[i].tolist()) if q > 0}
        assert got_support == {t for t, q in enumerate(ref) if q > 0}, (i, params[i])
        assert torch.allclose(probs[i].double(), torch.tensor(ref, dtype=torch.float64), atol=1e-5)


def test_filters_concrete_example():
    # probs 0.4, 0.3, 0.2, 0.1: top_p=0.6 keeps {0, 1}; top_k=3 keeps {0, 1, 2}; min_p=0.6 keeps {0, 1}
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log().repeat(4, 1)
    md = build([SP(top_p=0.6), SP(top_k=3), SP(min_p=0.6), SP(top_k=3, top_p=0.95)], 4)
    probs = sampling_probs(processed_logits(logits, md), md)
    supports = [{t for t in range(4) if probs[i, t] > 0} for i in range(4)]
    # last row: top-k renormalises to 4/9, 3/9, 2/9 -> top_p 0.95 needs all three
    assert supports == [{0, 1}, {0, 1, 2}, {0, 1}, {0, 1, 2}]
    assert torch.allclose(probs[0], torch.tensor([4 / 7, 3 / 7, 0, 0]), atol=1e-6)


@FAST
@given(data=st.data(), vocab=st.integers(3, 40), seed=st.integers(0, 2**31))
def test_penalties_and_banned_match_reference(data, vocab, seed):
    n = data.draw(st.integers(1, 6))
    tokens = st.lists(st.integers(0, vocab - 1), max_size=12)
    params = data.draw(st.lists(st.builds(
        SP, temperature=st.sampled_from([0.0, 1.0]),
        repetition_penalty=st.sampled_from([1.0, 0.5, 1.3, 2.0]),
        frequency_penalty=st.sampled_from([0.0, -2.0, 0.7]),
        presence_penalty=st.sampled_from([0.0, 1.5, -0.4]),
        min_tokens=st.integers(0, 6), max_tokens=st.just(None),
        stop_token_ids=st.lists(st.integers(0, vocab + 3), max_size=3)), min_size=n, max_size=n))
    prompts = data.draw(st.lists(tokens, min_size=n, max_size=n))
    outputs = data.draw(st.lists(tokens, min_size=n, max_size=n))
    eos = frozenset({0, vocab + 5})  # an EOS id beyond the logits is ignored
    logits = rand_logits(n, vocab, seed)
    md = build(params, vocab, prompts, outputs, eos=eos)
    got = processed_logits(logits, md)
    for i, p in enumerate(params):
        ref = torch.tensor(ref_penalised(logits[i].tolist(), p, prompts[i], outputs[i], eos))
        assert torch.equal(torch.isinf(got[i]), torch.isinf(ref)), i
        finite = ~torch.isinf(ref)
        assert torch.allclose(got[i][finite], ref[finite], atol=1e-5), i
    greedy = [i for i, p in enumerate(params) if p.is_greedy]
    out = Sampler(torch.Generator().manual_seed(0))(logits, md)
    assert [out.sampled_token_ids[i] for i in greedy] == [int(got[i].argmax()) for i in greedy]


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    p = SP(min_tokens=3, stop_token_ids=[4, 99], ignore_eos=True)
    md = build([p, p, p], 10, outputs=[[], [1, 1], [1, 1, 1]], eos=frozenset({2}))
    assert md.banned_token_ids == [[2, 4], [2, 4], []]
    logits = torch.zeros(2, 10)
    logits[:, 2] = 10.0  # EOS is by far the best token
    out = Sampler()(logits, build([SP(temperature=0, min_tokens=3)] * 2, 10,
                                  outputs=[[5], [5, 5, 5]], eos=frozenset({2})))
    assert out.sampled_token_ids[0] != 2 and out.sampled_token_ids[1] == 2
    assert build([SP()], 10).repetition_penalty is None  # unused features stay None


def test_token_counts_and_range_check():
    counts = token_counts([[1, 1, 3], [2], []], rows=[0, 2], vocab_size=5, device="cpu")
    assert counts.tolist() == [[0, 2, 0, 1, 0], [0] * 5, [0] * 5]
    with pytest.raises(ValueError):
        build([SP(frequency_penalty=1.0)], 5, outputs=[[7]])


def _reproducibility_run(device, batch_size, steps, seed_order):
    """Sample ``steps`` tokens for two seeded target rows, optionally inside a noisy shuffled batch."""
    vocab = 97
    targets = [SP(temperature=0.8, top_p=0.9, seed=1234),
               SP(temperature=1.0, repetition_penalty=1.2, frequency_penalty=0.5, seed=99)]
    target_gens = [torch.Generator(device=device).manual_seed(p.seed) for p in targets]
    others = [SP(temperature=0.0), SP(top_k=5), SP(min_p=0.2, seed=5), SP(presence_penalty=1.0),
              SP(temperature=1.3, top_k=20, top_p=0.5)]
    sampler = Sampler(torch.Generator(device=device).manual_seed(seed_order))
    rng = random.Random(seed_order)
    outs: list[list[int]] = [[], []]
    for step in range(steps):
        rows = [("t", 0), ("t", 1)] + [("o", rng.randrange(len(others))) for _ in range(batch_size - 2)]
        rng.shuffle(rows)
        logits = torch.empty(len(rows), vocab, device=device)
        params, gens, prompts, outputs = [], [], [], []
        for r, (kind, j) in enumerate(rows):
            if kind == "t":
                logits[r] = rand_logits(1, vocab, 1000 * step + j, device=device)[0]
                params.append(targets[j]), gens.append(target_gens[j])
                prompts.append([1, 2, 3]), outputs.append(list(outs[j]))
            else:
                logits[r] = rand_logits(1, vocab, rng.randrange(2**31), device=device)[0]
                other_seed = torch.Generator(device=device).manual_seed(rng.randrange(2**31))
                params.append(others[j]), gens.append(other_seed if others[j].seed else None)
                prompts.append([rng.randrange(vocab)]), outputs.append([rng.randrange(vocab)])
        md = SamplingMetadata.build(params, prompts, outputs, gens, frozenset({0}), vocab, device)
        out = sampler(logits, md)
        for r, (kind, j) in enumerate(rows):
            if kind == "t":
                outs[j].append(out.sampled_token_ids[r])
    return outs


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_rows_reproducible_regardless_of_batch(device):
    alone = _reproducibility_run(device, batch_size=2, steps=50, seed_order=0)
    batched = _reproducibility_run(device, batch_size=16, steps=50, seed_order=1)
    batched_again = _reproducibility_run(device, batch_size=16, steps=50, seed_order=2)
    assert alone == batched == batched_again
    assert len(set(alone[0])) > 5 and len(set(alone[1])) > 5  # actually random, not constant


@pytest.mark.parametrize("device", DEVICES)
def test_distribution_matches_probabilities(device):
    target = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
    n = 20000
    logits = target.log().repeat(n, 1).to(device)  # [n, 5]
    sampler = Sampler(torch.Generator(device=device).manual_seed(0))
    out = sampler(logits, build([SP()] * n, 5, device=device))
    freq = torch.bincount(torch.tensor(out.sampled_token_ids), minlength=5).double() / n
    assert torch.allclose(freq, target.double(), atol=0.02), freq
    # temperature 2 and top_k 3: p ∝ sqrt(target) over the three most likely tokens
    out = sampler(logits, build([SP(temperature=2.0, top_k=3)] * n, 5, device=device))
    freq = torch.bincount(torch.tensor(out.sampled_token_ids), minlength=5).double() / n
    expected = torch.tensor([0, 0, 0.3, 0, 0.25], dtype=torch.float64).sqrt()
    expected[1] = 0.2 ** 0.5
    assert torch.allclose(freq, expected / expected.sum(), atol=0.02), freq


def test_distribution_with_per_row_generator():
    target = torch.tensor([[0.1, 0.2, 0.3, 0.15, 0.25]])
    gen = torch.Generator().manual_seed(3)
    sampler = Sampler()
    md = build([SP(seed=3)], 5, gens=[gen])
    draws = [sampler(target.log(), md).sampled_token_ids[0] for _ in range(4000)]
    freq = torch.bincount(torch.tensor(draws), minlength=5).double() / len(draws)
    assert torch.allclose(freq, target[0].double(), atol=0.03), freq


@FAST
@given(seed=st.integers(0, 2**31), vocab=st.integers(21, 60))
def test_logprobs_are_raw_log_softmax_and_sorted(seed, vocab):
    asks = [None, 0, 1, 5, 20, 3]
    params = [SP(temperature=t, logprobs=k, repetition_penalty=1.5, presence_penalty=1.0,
                 min_tokens=2, top_k=4)
              for t, k in zip([0.0, 1.0, 0.7, 0.0, 1.2, 2.0], asks)]
    logits = rand_logits(len(params), vocab, seed)
    original = logits.clone()
    md = build(params, vocab, prompts=[[1, 2]] * 6, outputs=[[3]] * 6, eos=frozenset({0}))
    out = Sampler(torch.Generator().manual_seed(seed))(logits, md)
    assert torch.equal(logits, original)  # caller's logits untouched
    raw = torch.log_softmax(original.double(), dim=-1)
    assert len(out.logprobs) == len(params) and len(out.top_logprobs) == len(params)
    for i, k in enumerate(asks):
        tok = out.sampled_token_ids[i]
        assert tok != 0  # EOS banned by min_tokens
        assert math.isclose(out.logprobs[i], raw[i, tok].item(), abs_tol=1e-5)
        top = out.top_logprobs[i]
        assert len(top) == (k or 0)
        vals = [v for _, v in top]
        assert vals == sorted(vals, reverse=True)
        ref_ids = raw[i].argsort(descending=True)[: len(top)].tolist()
        assert [t for t, _ in top] == ref_ids
        assert all(math.isclose(v, raw[i, t].item(), abs_tol=1e-5) for t, v in top)


@FAST
@given(seed=st.integers(0, 2**31), n=st.integers(2, 12))
def test_mixed_batch_greedy_rows_exact(seed, n):
    rng = random.Random(seed)
    vocab = 30
    params = [SP(temperature=0.0) if rng.random() < 0.5 else
              SP(temperature=rng.uniform(0.3, 2.0), top_k=rng.choice([0, 3]), top_p=rng.choice([1.0, 0.8]))
              for _ in range(n)]
    logits = rand_logits(n, vocab, seed)
    md = build(params, vocab)
    out = Sampler(torch.Generator().manual_seed(seed))(logits, md)
    assert isinstance(out, SamplerOutput) and len(out.sampled_token_ids) == n
    probs = sampling_probs(processed_logits(logits, md), md)
    for i, p in enumerate(params):
        tok = out.sampled_token_ids[i]
        if p.is_greedy:
            assert tok == int(logits[i].argmax())
        else:
            assert probs[i, tok] > 0


def test_empty_batch_and_shape_mismatch():
    assert Sampler()(torch.empty(0, 7), build([], 7)).sampled_token_ids == []
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, 7), build([SP()], 7))


def test_greedy_rows_do_not_shift_shared_randomness():
    """Unseeded random rows draw the same noise whether or not greedy rows sit beside them."""
    vocab, steps = 40, 20
    runs = []
    for with_greedy in (False, True):
        sampler = Sampler(torch.Generator().manual_seed(11))
        greedy_gen = torch.Generator().manual_seed(5)
        state = greedy_gen.get_state()
        toks = []
        for step in range(steps):
            base = rand_logits(2, vocab, step)
            params, gens, logits = [SP(), SP(top_k=10)], [None, None], base
            if with_greedy:
                params = [SP(temperature=0.0, seed=5), SP(), SP(temperature=0.0), SP(top_k=10)]
                gens = [greedy_gen, None, None, None]
                logits = torch.cat([rand_logits(1, vocab, 99), base[:1], base[:1], base[1:]])
            out = sampler(logits, build(params, vocab, gens=gens)).sampled_token_ids
            toks.append([out[1], out[3]] if with_greedy else out)
        assert torch.equal(greedy_gen.get_state(), state)
        runs.append(toks)
    assert runs[0] == runs[1]


def test_runner_fast_greedy_path_only_takes_rows_the_sampler_would_argmax():
    """ModelRunner skips the Sampler when every row is plain greedy; anything the Sampler would
    change (penalties, banned EOS before min_tokens, logprobs, temperature) must go through it,
    and for plain rows the raw argmax is exactly the Sampler's choice."""
    from conveyor.runner.input_batch import CachedRequestState
    from conveyor.runner.model_runner import _plain_greedy
    from conveyor.sampling_params import SamplingParams

    def state(n_out=3, **kw):
        return CachedRequestState("r", list(range(5 + n_out)), 5,
                                  SamplingParams(temperature=0.0, **kw), [0], 0)

    assert _plain_greedy(state())
    assert _plain_greedy(state(min_tokens=3))
    assert not _plain_greedy(state(min_tokens=4))              # EOS still banned this step
    assert not _plain_greedy(state(logprobs=2))
    assert not _plain_greedy(state(repetition_penalty=1.2))
    assert not _plain_greedy(state(frequency_penalty=0.5))
    assert not _plain_greedy(state(presence_penalty=0.5))
    assert not _plain_greedy(CachedRequestState("r", [1, 2], 1, SamplingParams(temperature=0.7),
                                                [0], 0))
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen)
    params = [SamplingParams(temperature=0.0)] * 6
    md = SamplingMetadata.build(params, [[1]] * 6, [[2, 3]] * 6, [None] * 6, frozenset({0}), 50,
                                "cpu")
    assert Sampler()(logits, md).sampled_token_ids == logits.argmax(dim=-1).tolist()
