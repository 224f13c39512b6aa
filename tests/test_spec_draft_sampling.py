"""Sampled draft-model drafts verified by ``p/q`` rejection sampling (tiny random-weight models,
float32, 32-token vocabulary): sampled outputs follow the target distribution (chi-square against
the exact distribution of the first three tokens, computed with transformers; a rule that accepts
every draft fails the same check), a draft identical to the target is almost always accepted,
seeded requests are reproducible, and the block pools (target and draft) are whole after each run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import run_engine
from test_spec_decode import generate

from conveyor.engine.llm_engine import LLMEngine
from conveyor.runner.spec_step import draft_q_rows, scheduled_draft_probs
from conveyor.structured.request_state import GrammarBitmask
from conveyor.sampling import SamplingMetadata
from conveyor.sampling.sampler import processed_logits, sampling_probs
from conveyor.sampling_params import SamplingParams
from conveyor.spec_decode import verifier

VOCAB = 32
PROMPT = [5, 9, 14, 3, 22, 7, 11, 30]
DRAFT = {"method": "draft_model", "num_speculative_tokens": 3, "adaptive": False}


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """(Pearson statistic, its 99.9% quantile) with cells expecting < 5 pooled into one."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] < 5:                      # too little to stand alone: join the smallest cell
        j = int(np.argmin(exp[:-1]))
        obs[j], exp[j] = obs[j] + obs[-1], exp[j] + exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    dof = len(obs) - 1
    quantile = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3  # Wilson-Hilferty
    return float(((obs - exp) ** 2 / exp).sum()), quantile


def exact_three_tokens(path: str, params: SamplingParams) -> np.ndarray:
    """P(t1, t2, t3 | PROMPT) ``[V, V, V]`` under the target as the Sampler samples it."""
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()

    def probs(outputs: list[list[int]]) -> torch.Tensor:    # [n, V] next-token probs
        with torch.no_grad():
            logits = model(torch.tensor([PROMPT + o for o in outputs])).logits[:, -1]
        md = SamplingMetadata.build([params] * len(outputs), [PROMPT] * len(outputs), outputs,
                                    [None] * len(outputs), frozenset({2}), VOCAB, "cpu")
        return sampling_probs(processed_logits(logits, md), md)

    p1 = probs([[]])[0]  # [V]
    p2 = probs([[a] for a in range(VOCAB)])  # [V, V]
    p3 = probs([[a, b] for a in range(VOCAB) for b in range(VOCAB)]).view(VOCAB, VOCAB, VOCAB)
    return (p1[:, None, None] * p2[:, :, None] * p3).double().numpy()


def sample_three_tokens(target: str, draft: str, params: SamplingParams, n: int):
    """``n`` three-token continuations of PROMPT with draft-model speculation, in one engine:
    token 1 is sampled plainly, token 2 verifies a draft, token 3 is its bonus or plain."""
    engine = LLMEngine.from_kwargs(model=target, dtype="float32", max_num_seqs=1024,
                                   max_num_batched_tokens=16384, block_size=8, num_blocks=2048,
                                   speculative_config={**DRAFT, "model": draft})
    ids = [engine.add_request(PROMPT, params) for _ in range(n)]
    finals = run_engine(engine)
    check_pools(engine)
    counts = np.zeros(VOCAB ** 3)
    for rid in ids:
        a, b, c = finals[rid].outputs[0].token_ids
        counts[(a * VOCAB + b) * VOCAB + c] += 1
    return counts, engine.core.scheduler.spec_stats


def check_pools(engine) -> None:
    engine.check_invariants()
    assert engine.core.kv_manager.pool.num_free_blocks == engine.num_kv_blocks
    runner = engine.runner
    assert runner.draft_probs == {}
    proposer = runner.proposer
    assert proposer.states == {} and proposer.generators == {}
    assert len(proposer.free_blocks) == proposer.scratch_block


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True),
    SamplingParams(temperature=0.9, top_k=8, top_p=0.9, max_tokens=3, ignore_eos=True),
], ids=["t1", "topk_topp"])
def test_sampled_drafts_follow_the_target_distribution(vocab32_dir, vocab32_draft_dir, params,
                                                       monkeypatch):
    exact = exact_three_tokens(vocab32_dir, params).ravel()
    counts, stats = sample_three_tokens(vocab32_dir, vocab32_draft_dir, params, 2000)
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    stat, quantile = chi_square(counts, exact)
    assert stat < quantile, (stat, quantile)
    if params.top_k:
        return
    # the check can fail: accepting every draft samples token 2 from q, not p
    monkeypatch.setattr(verifier, "acceptance_probability", lambda p, q: torch.ones_like(p))
    counts, stats = sample_three_tokens(vocab32_dir, vocab32_draft_dir, params, 2000)
    assert stats.num_accepted_tokens == stats.num_draft_tokens
    stat, quantile = chi_square(counts, exact)
    assert stat > quantile, (stat, quantile)


def test_rejection_sampling_rule_alone():
    """The verifier's ``p/q`` rule on fixed rows: token 1 follows ``p_0`` whatever ``q``, the
    bonus after an accepted draft follows ``p_1``; sampling from ``q`` instead is caught."""
    torch.manual_seed(0)
    vocab, n = 8, 6000
    p = torch.tensor([[2.0, 0.5, 0.1, 1.5, -1.0, 0.0, 0.3, 1.0],
                      [0.0, 1.0, -0.5, 0.2, 2.0, 0.1, -1.0, 0.7]])  # [2, vocab] logits
    q = torch.tensor([0.05, 0.05, 0.4, 0.3, 0.0, 0.1, 0.05, 0.05])  # [vocab] draft probs
    drafts = torch.multinomial(q, n, replacement=True).tolist()
    md = SamplingMetadata.build([SamplingParams(temperature=1.0)] * (2 * n), [[0]] * (2 * n),
                                [[]] * (2 * n), [None] * (2 * n), frozenset(), vocab, "cpu")
    rows = verifier.verify(p.repeat(n, 1), md, [f"r{i}" for i in range(n)],
                           [[d] for d in drafts], torch.Generator().manual_seed(1),
                           [q[None]] * n)
    by_req: dict[str, list[int]] = {}
    for rid, token, _, _ in rows:
        by_req.setdefault(rid, []).append(token)
    outs = list(by_req.values())
    first = np.bincount([t[0] for t in outs], minlength=vocab)
    bonus = np.bincount([t[1] for t in outs if len(t) == 2], minlength=vocab)
    p0, p1 = p.softmax(-1).double().numpy()
    assert chi_square(first, p0)[0] < chi_square(first, p0)[1]
    assert chi_square(bonus, p1)[0] < chi_square(bonus, p1)[1]
    assert all(len(t) == 2 and t[0] == d for t, d in zip(outs, drafts) if len(t) == 2)
    stat, quantile = chi_square(np.bincount(drafts, minlength=vocab), p0)
    assert stat > quantile                      # the drafts themselves do not follow p


def _grammar_cut_first_tokens(rule_with_q: bool, n: int = 6000) -> tuple[float, float]:
    """Token 1 of ``n`` constrained requests whose one draft was sampled from an unmasked ``q``
    and dropped when the grammar refuses it (what ``accept_drafts`` does); the chi-square of
    token 1 against the masked target ``p``, verified with ``q`` or with the point mass."""
    torch.manual_seed(0)
    vocab = 8
    allowed = torch.tensor([1, 1, 0, 1, 0, 1, 0, 1], dtype=torch.bool)
    logits = torch.tensor([[2.0, 0.5, 0.1, 1.5, -1.0, 0.0, 0.3, 1.0]])
    logits = logits.masked_fill(~allowed, -1e4)         # the grammar's mask on the target
    q = torch.tensor([0.05, 0.05, 0.4, 0.05, 0.1, 0.1, 0.05, 0.2])   # half on refused tokens
    sampled = torch.multinomial(q, n, replacement=True).tolist()
    drafts = [[x] if allowed[x] else [] for x in sampled]            # cut by the grammar
    rows_per = [len(d) + 1 for d in drafts]
    md = SamplingMetadata.build([SamplingParams(temperature=1.0)] * sum(rows_per),
                                [[0]] * sum(rows_per), [[]] * sum(rows_per),
                                [None] * sum(rows_per), frozenset(), vocab, "cpu")
    q_rows = [q[None] if d and rule_with_q else None for d in drafts]
    rows = verifier.verify(logits.repeat(sum(rows_per), 1), md, [f"r{i}" for i in range(n)],
                           drafts, torch.Generator().manual_seed(1), q_rows)
    first: dict[str, int] = {}
    for rid, token, _, _ in rows:
        first.setdefault(rid, token)
    counts = np.bincount(list(first.values()), minlength=vocab)
    return chi_square(counts, logits.softmax(-1)[0].double().numpy())


def test_constrained_drafts_are_verified_as_a_point_mass():
    """Drafts the grammar cut did not come from ``q``: ``min(1, p/q)`` on them skews the output
    (caught below), the point mass does not; ``draft_q_rows`` gives constrained requests none."""
    stat, quantile = _grammar_cut_first_tokens(rule_with_q=False)
    assert stat < quantile, (stat, quantile)
    stat, quantile = _grammar_cut_first_tokens(rule_with_q=True)
    assert stat > quantile, (stat, quantile)
    q = torch.rand(2, VOCAB)
    probs = {"free": ([4, 5], q), "json": ([4, 5], q)}
    grammar = GrammarBitmask(["json", "json", "json"], np.zeros((3, 1), dtype=np.int32))
    rows = draft_q_rows(probs, ["free", "json"], [[4, 5], [4, 5]], grammar)
    assert torch.equal(rows[0], q) and rows[1] is None
    assert all(torch.equal(r, q) for r in draft_q_rows(probs, ["free", "json"],
                                                        [[4, 5], [4, 5]], None))


def test_scheduled_prefix_takes_the_first_rows():
    q = torch.rand(3, VOCAB)
    assert torch.equal(scheduled_draft_probs(([4, 5, 6], q), [4, 5]), q[:2])
    assert scheduled_draft_probs(([4, 5, 6], q), [4, 6]) is None   # not a prefix: point mass
    assert scheduled_draft_probs(None, [4]) is None


def test_draft_identical_to_target_is_almost_always_accepted(vocab32_dir):
    params = lambda i: SamplingParams(max_tokens=30, temperature=1.0, ignore_eos=True)  # noqa: E731
    _, sched, _ = generate(vocab32_dir, {**DRAFT, "model": vocab32_dir}, params)
    stats = sched.spec_stats
    assert stats.num_draft_tokens > 0
    assert stats.num_accepted_tokens / stats.num_draft_tokens > 0.9


def test_seeded_sampling_with_draft_model_is_reproducible(vocab32_dir, vocab32_draft_dir):
    """Seeded sampled requests (q rows) and greedy ones (point mass) verified in one batch:
    the sampled text is the same on every run, the greedy text is the text without drafts."""
    def params(i: int) -> SamplingParams:
        if i % 2:
            return SamplingParams(max_tokens=30, temperature=0.8, seed=7 + i, ignore_eos=True,
                                  repetition_penalty=1.1)
        return SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    spec = {**DRAFT, "model": vocab32_draft_dir}
    first, sched, _ = generate(vocab32_dir, spec, params)
    again, _, _ = generate(vocab32_dir, spec, params)
    reference, _, _ = generate(vocab32_dir, None, params)
    assert first == again
    assert first[0::2] == reference[0::2]
    assert first[1] != first[3]
    assert 0 < sched.spec_stats.num_accepted_tokens < sched.spec_stats.num_draft_tokens
    # unseeded: the same too (drafts and verification draw from the engine's seeded default
    # generator, never torch's global one)
    unseeded = lambda i: SamplingParams(max_tokens=12, temperature=0.8,  # noqa: E731
                                        ignore_eos=True)
    assert generate(vocab32_dir, spec, unseeded)[0] == generate(vocab32_dir, spec, unseeded)[0]
