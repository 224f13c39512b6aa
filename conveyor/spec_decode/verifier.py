"""Verifying drafts on the target model's logits: greedy, point-mass and ``p/q`` rejection sampling.

A request with drafts ``d_1..d_k`` has ``k + 1`` logits rows: row ``j`` predicts the token after
its output plus ``d_1..d_j``, and is processed exactly as a normal sampling row at that point
(its penalties, min_tokens bans and grammar mask see the drafts before it); ``p_j`` is the
distribution the Sampler would sample there. Two rules, both exact:

- Drafts without probabilities (n-gram, suffix, greedy requests' draft-model drafts: ``q`` is a
  point mass). Row ``j``'s target token ``t_j`` is what the Sampler would pick: the argmax for
  greedy rows, for random rows ``argmax(p / E)`` with ``E ~ Exp(1)^vocab`` (the exponential
  race, an exact sample of ``p``). Drafts are accepted while ``d_{j+1} == t_j``; the output is
  ``t_0..t_a``. For a point-mass ``q`` this *is* rejection sampling (``d`` accepted with
  probability ``p(d)``; on rejection ``t`` follows ``p`` without ``d``, renormalised, the
  residual ``(p - q)+``). Greedy outputs are token-identical to decoding without drafts; a seeded
  request draws its ``E`` for output position ``j`` from its own generator only when position
  ``j`` is reached, so it consumes exactly the draws it would without speculation and its text is
  identical with and without drafts.
- Drafts sampled from a draft distribution ``q`` (a sampling request's draft-model drafts, with
  their ``q`` rows). ``d_{j+1}`` is accepted with probability ``min(1, p_j(d) / q_j(d))``; on the
  first rejection the recovered token is sampled from ``normalize((p_j - q_j)+)`` (from ``p_j``
  if that is all zero) and the rest are dropped; when all ``k`` are accepted the bonus token is
  sampled from ``p_k``. The output follows the target distribution exactly for any ``q``. A
  seeded request draws ``k`` uniforms and one ``Exp(1)^vocab`` vector from its own generator per
  verification (deterministic, so its text is reproducible; it differs from the text without
  drafts, which drew differently); unseeded requests draw from the default generator.
"""

from __future__ import annotations

import torch

from conveyor.sampling.metadata import SamplingMetadata
from conveyor.sampling.sampler import (gather_logprobs, processed_logits, sampling_probs,
                                       untouched_by_processing)

Row = tuple[str, int, "float | None", "list | None"]   # (request id, token, logprob, top)
_TINY = torch.finfo(torch.float32).tiny


def target_tokens(logits: torch.Tensor, md: SamplingMetadata, spans: list[tuple[int, list[int]]],
                  default_generator: torch.Generator | None, skip: list[int] = ()
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(target token of every row of ``logits`` ``[R, vocab]``, the sampling probs ``[R, vocab]``
    or None when every row is greedy). ``spans``: per point-mass request its first row and
    drafts; rows of a seeded one after its first mismatch are left at -1. Rows in ``skip``
    (verified by ``p/q``) draw no noise; their targets are meaningless."""
    if md.all_greedy and untouched_by_processing(md):
        return logits.argmax(dim=-1), None  # [R]
    work = processed_logits(logits, md)  # [R, vocab] float32
    targets = work.argmax(dim=-1)  # [R]: greedy rows are done
    if md.all_greedy:
        return targets, None
    probs = sampling_probs(work, md)  # [R, vocab]
    skipped = set(skip)
    shared = [i for i in range(md.num_rows)
              if not md.is_greedy[i] and md.generators[i] is None and i not in skipped]
    if shared:
        idx = torch.tensor(shared, device=probs.device)
        q = torch.empty(len(shared), md.vocab_size, device=probs.device).exponential_(
            generator=default_generator).clamp_min_(_TINY)  # [S, vocab]
        targets[idx] = (probs[idx] / q).argmax(dim=-1)
    for first, drafts in spans:
        g = md.generators[first]
        if g is None or md.is_greedy[first]:
            continue
        for j in range(len(drafts) + 1):     # draw only for positions actually reached
            q = torch.empty(md.vocab_size, device=probs.device).exponential_(generator=g)
            targets[first + j] = (probs[first + j] / q.clamp_min_(_TINY)).argmax()
            if j < len(drafts) and int(targets[first + j]) != drafts[j]:
                targets[first + j + 1:first + len(drafts) + 1] = -1
                break
    return targets, probs


def acceptance_probability(p_draft: torch.Tensor, q_draft: torch.Tensor) -> torch.Tensor:
    """``min(1, p(d) / q(d))`` per draft (``[k]`` each); 0 where ``p(d)`` is 0."""
    return torch.where(p_draft > 0, (p_draft / q_draft.clamp_min(_TINY)).clamp_max(1.0), 0.0)


def rejection_sample(p: torch.Tensor, q: torch.Tensor, drafts: list[int],
                     generator: torch.Generator | None) -> list[int]:
    """One request's output under the ``p/q`` rule: accepted drafts, then the recovered or
    bonus token. ``p`` ``[k + 1, vocab]`` target probs, ``q`` ``[k, vocab]`` draft probs."""
    k, device = len(drafts), p.device
    ids = torch.tensor(drafts, device=device)  # [k]
    rows = torch.arange(k, device=device)  # [k]
    u = torch.rand(k, device=device, generator=generator)  # [k]
    accept = u < acceptance_probability(p[rows, ids], q[rows, ids])  # [k]
    rejected = (~accept).nonzero()
    a = int(rejected[0]) if rejected.numel() else k
    dist = p[a]  # [vocab]: the bonus token's distribution when all were accepted
    if a < k:
        residual = (p[a] - q[a]).clamp_min(0.0)  # [vocab]
        if bool(residual.sum() > 0):
            dist = residual
    noise = torch.empty(p.shape[-1], device=device).exponential_(generator=generator)
    return drafts[:a] + [int((dist / noise.clamp_min_(_TINY)).argmax())]


def verify(logits: torch.Tensor, md: SamplingMetadata, request_ids: list[str],
           drafts: list[list[int]], default_generator: torch.Generator | None,
           draft_probs: list[torch.Tensor | None] | None = None) -> list[Row]:
    """Rows to output (accepted drafts, then one sampled token, per request in order).

    ``logits`` ``[R, vocab]`` holds ``1 + len(drafts[i])`` consecutive rows for request ``i``;
    ``md`` is built per row. ``draft_probs[i]``: the ``q`` rows ``[len(drafts[i]), vocab]`` of
    request ``i``'s drafts, or None for a point mass (greedy rows always use the point-mass
    rule). Does not modify ``logits``."""
    spans, first = [], 0
    for d in drafts:
        spans.append((first, d))
        first += len(d) + 1
    q_rows = draft_probs or [None] * len(drafts)
    by_q = {i for i, ((first, d), q) in enumerate(zip(spans, q_rows))
            if q is not None and d and not md.is_greedy[first]}
    skip = [r for i in by_q for r in range(spans[i][0], spans[i][0] + len(spans[i][1]) + 1)]
    targets, probs = target_tokens(logits, md, [s for i, s in enumerate(spans) if i not in by_q],
                                   default_generator, skip)  # [R]
    tokens = targets.tolist()
    outputs: list[list[int]] = []
    for i, (first, d) in enumerate(spans):
        if i in by_q:
            g = md.generators[first]
            out = rejection_sample(probs[first:first + len(d) + 1], q_rows[i], d,
                                   default_generator if g is None else g)
            tokens[first:first + len(out)] = out
        else:
            out = _accepted_then_target(tokens, first, d)
        outputs.append(out)
    return _rows(logits, md, tokens, request_ids, spans, outputs)


def verify_argmax(targets: list[int], request_ids: list[str], drafts: list[list[int]],
                  firsts: list[int]) -> list[Row]:
    """``verify`` for rows that all sample the raw argmax (plain greedy: ``is_plain_greedy``),
    without sampling metadata: what ``verify`` computes for them (no logprobs). ``targets``: the
    argmax of every logits row; request i's rows start at ``firsts[i]``."""
    rows: list[Row] = []
    for rid, d, first in zip(request_ids, drafts, firsts):
        rows += [(rid, t, None, None) for t in _accepted_then_target(targets, first, d)]
    return rows


def _accepted_then_target(tokens: list[int], first: int, drafts: list[int]) -> list[int]:
    """The point-mass rule on one request's target tokens (rows ``first..``): its drafts while
    they equal the target, then the target at the first mismatch (or the bonus)."""
    accepted = 0
    while accepted < len(drafts) and tokens[first + accepted] == drafts[accepted]:
        accepted += 1
    return tokens[first:first + accepted + 1]


def _rows(logits, md, tokens, request_ids, spans, outputs) -> list[Row]:
    """Output rows with their logprobs (raw logits, as the Sampler reports them)."""
    logprobs = top = None
    if md.max_num_logprobs is not None:
        raw = torch.log_softmax(logits.float(), dim=-1)  # [R, vocab]
        chosen = torch.tensor(tokens, device=logits.device).clamp_min(0)  # [R]
        logprobs, top = gather_logprobs(raw, chosen, md)
    rows: list[Row] = []
    for rid, (first, _), out in zip(request_ids, spans, outputs):
        for r, token in enumerate(out, start=first):
            rows.append((rid, token, None if logprobs is None else logprobs[r],
                         None if top is None else top[r]))
    return rows
