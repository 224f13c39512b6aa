"""Verifying drafts on the target model's logits: greedy and rejection sampling, one rule.

A request with drafts ``d_1..d_k`` has ``k + 1`` logits rows: row ``j`` predicts the token after
its output plus ``d_1..d_j``, and is processed exactly as a normal sampling row at that point
(its penalties, min_tokens bans and grammar mask see the drafts before it). Row ``j``'s target
token ``t_j`` is what the Sampler would pick there: the argmax for greedy rows, for random rows
``argmax(p / E)`` with ``E ~ Exp(1)^vocab`` (the exponential race, an exact sample of ``p``).
Drafts are accepted while ``d_{j+1} == t_j``; the output is ``t_0..t_a`` (``a`` accepted drafts,
then the recovered token ``t_a``, or the bonus token when all ``k`` were accepted).

For drafts of probability 1 (n-gram, suffix, greedy draft models) this *is* rejection sampling:
``d`` is accepted with probability ``p(d)``, and on rejection ``t`` is distributed as
``p`` restricted to tokens other than ``d``, renormalised, i.e. the residual ``(p - q)+`` for a
point-mass ``q``. So sampled outputs follow the target distribution exactly; greedy outputs are
token-identical to decoding without drafts. A seeded request draws its ``E`` for output position
``j`` from its own generator only when position ``j`` is reached (never for a position after a
rejection), so it consumes exactly the draws it would without speculation and its text is
identical with and without drafts.
"""

from __future__ import annotations

import torch

from conveyor.sampling.metadata import SamplingMetadata
from conveyor.sampling.sampler import (gather_logprobs, processed_logits, sampling_probs,
                                       untouched_by_processing)

Row = tuple[str, int, "float | None", "list | None"]   # (request id, token, logprob, top)


def target_tokens(logits: torch.Tensor, md: SamplingMetadata, spans: list[tuple[int, list[int]]],
                  default_generator: torch.Generator | None) -> torch.Tensor:
    """Target token of every row of ``logits`` ``[R, vocab]`` (``spans``: per request its first
    row and drafts). Rows of a seeded request after its first mismatch are left at -1."""
    if md.all_greedy and untouched_by_processing(md):
        return logits.argmax(dim=-1)  # [R]
    work = processed_logits(logits, md)  # [R, vocab] float32
    targets = work.argmax(dim=-1)  # [R]: greedy rows are done
    if md.all_greedy:
        return targets
    probs = sampling_probs(work, md)  # [R, vocab]
    tiny = torch.finfo(torch.float32).tiny
    shared = [i for i in range(md.num_rows) if not md.is_greedy[i] and md.generators[i] is None]
    if shared:
        idx = torch.tensor(shared, device=probs.device)
        q = torch.empty(len(shared), md.vocab_size, device=probs.device).exponential_(
            generator=default_generator).clamp_min_(tiny)  # [S, vocab]
        targets[idx] = (probs[idx] / q).argmax(dim=-1)
    for first, drafts in spans:
        g = md.generators[first]
        if g is None or md.is_greedy[first]:
            continue
        for j in range(len(drafts) + 1):     # draw only for positions actually reached
            q = torch.empty(md.vocab_size, device=probs.device).exponential_(generator=g)
            targets[first + j] = (probs[first + j] / q.clamp_min_(tiny)).argmax()
            if j < len(drafts) and int(targets[first + j]) != drafts[j]:
                targets[first + j + 1:first + len(drafts) + 1] = -1
                break
    return targets


def verify(logits: torch.Tensor, md: SamplingMetadata, request_ids: list[str],
           drafts: list[list[int]], default_generator: torch.Generator | None) -> list[Row]:
    """Rows to output (accepted drafts, then one sampled token, per request in order).

    ``logits`` ``[R, vocab]`` holds ``1 + len(drafts[i])`` consecutive rows for request ``i``;
    ``md`` is built per row. Does not modify ``logits``."""
    spans, first = [], 0
    for d in drafts:
        spans.append((first, d))
        first += len(d) + 1
    targets = target_tokens(logits, md, spans, default_generator)  # [R]
    raw = None if md.max_num_logprobs is None else torch.log_softmax(logits.float(), dim=-1)
    logprobs, top = gather_logprobs(raw, targets.clamp_min(0), md)
    tokens = targets.tolist()
    rows: list[Row] = []
    for rid, (first, d) in zip(request_ids, spans):
        accepted = 0
        while accepted < len(d) and tokens[first + accepted] == d[accepted]:
            accepted += 1
        for r in range(first, first + accepted + 1):
            rows.append((rid, tokens[r], None if logprobs is None else logprobs[r],
                         None if top is None else top[r]))
    return rows
