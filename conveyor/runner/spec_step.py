"""The runner's part of a speculative step: stage drafts, verify them, propose the next ones.

Scheduled drafts are appended to the request's runner tokens before the batch is built (so they
are ordinary input tokens whose KV is written), verified on their ``1 + k`` logits rows, then
replaced by the tokens actually output: afterwards a request's runner tokens are exactly its
committed tokens again and ``num_computed_tokens`` is all of them but the last. Failure isolation
is per request, as for normal sampling (``row_sampling``): a non-finite row or a verification
that raises fails that request alone.

Sampled draft-model drafts come with their draft probabilities ``q``, kept in
``runner.draft_probs`` (request id -> (proposed drafts, ``[k, vocab]`` rows)) until the request's
next step consumes or replaces them, or it finishes or is preempted. The core may schedule a
prefix of the proposed drafts: the first rows go with it. Scheduled drafts that are not a prefix
of what was proposed are verified as a point mass (exact too, only less often accepted), and so
are a constrained request's drafts (``draft_q_rows``).
"""

from __future__ import annotations

import torch

from conveyor.core.outputs import ModelRunnerOutput, SchedulerOutput
from conveyor.runner.input_batch import CachedRequestState
from conveyor.runner.row_sampling import NON_FINITE_LOGITS, argmax_rows, finite_rows, merge_rows
from conveyor.sampling import SamplingMetadata
from conveyor.sampling.metadata import is_plain_greedy
from conveyor.sampling.constraints import GrammarMask
from conveyor.structured.request_state import GrammarBitmask
from conveyor.spec_decode.draft_model import DraftModelProposer, DraftSampling
from conveyor.spec_decode.ngram import Proposer
from conveyor.spec_decode.verifier import verify, verify_argmax


def stage_drafts(sched: SchedulerOutput, states: dict[str, CachedRequestState]) -> None:
    for rid, drafts in sched.scheduled_spec_tokens.items():
        states[rid].token_ids.extend(drafts)


def verify_step(runner, logits: torch.Tensor, request_ids: list[str], sched: SchedulerOutput,
                failed: dict[str, str]) -> ModelRunnerOutput:
    """Rows for every sampling request of a step with drafts (``logits``: all their rows)."""
    drafts = [sched.scheduled_spec_tokens.get(rid, []) for rid in request_ids]
    greedy = _all_plain_greedy(runner, request_ids, drafts)
    if greedy:   # the targets are the argmax, taken in the finiteness pass
        targets, ok = argmax_rows(logits, runner.fused_rows)
    else:
        targets, ok = None, finite_rows(logits, runner.fused_rows)
    first = 0
    keep = []
    for i, (rid, d) in enumerate(zip(request_ids, drafts)):
        if not all(ok[first:first + len(d) + 1]):
            failed.setdefault(rid, NON_FINITE_LOGITS)
        if rid not in failed:
            keep.append((i, list(range(first, first + len(d) + 1))))
        first += len(d) + 1
    if greedy:
        rows = verify_argmax(targets, [request_ids[i] for i, _ in keep],
                             [drafts[i] for i, _ in keep], [rs[0] for _, rs in keep])
    else:
        q_rows = draft_q_rows(runner.draft_probs, request_ids, drafts, sched.grammar)
        rows = _verify_or_split(runner, logits, [request_ids[i] for i, _ in keep],
                                [drafts[i] for i, _ in keep], [q_rows[i] for i, _ in keep],
                                [r for _, rs in keep for r in rs], sched, failed)
    _commit(runner.states, request_ids, drafts, rows)
    return merge_rows(rows, failed)


def draft_q_rows(draft_probs: dict, request_ids: list[str], drafts: list[list[int]],
                 grammar: GrammarBitmask | None) -> list[torch.Tensor | None]:
    """Per request, the ``q`` rows its drafts are verified with, or None (point mass).

    A constrained request always gets the point mass: its drafts were sampled from the draft
    model's unmasked ``q`` and then cut at the first one its grammar refuses
    (``core.speculation.accept_drafts``), so the drafts that reach verification did not come
    from ``q``, and ``min(1, p / q)`` on them would skew the output distribution (by
    ``(1 - Q_allowed) * (p - residual)`` at each position). The point-mass rule is exact for any
    draft, however it was chosen."""
    constrained = set(grammar.request_ids) if grammar is not None else set()
    return [None if rid in constrained else scheduled_draft_probs(draft_probs.get(rid), d)
            for rid, d in zip(request_ids, drafts)]


def scheduled_draft_probs(proposed: tuple[list[int], torch.Tensor] | None,
                          drafts: list[int]) -> torch.Tensor | None:
    """The ``q`` rows of the scheduled ``drafts`` ``[len(drafts), vocab]``, when they are a
    prefix of the proposed drafts those rows belong to; else None (point mass)."""
    if proposed is None or not drafts or proposed[0][:len(drafts)] != drafts:
        return None
    return proposed[1][:len(drafts)]


def _verify_or_split(runner, logits, request_ids, drafts, q_rows, row_idx, sched, failed):
    if not request_ids:
        return []
    try:
        contiguous = row_idx == list(range(row_idx[0], row_idx[0] + len(row_idx)))
        sub = logits[row_idx[0]:row_idx[0] + len(row_idx)] if contiguous else \
            logits[torch.tensor(row_idx, device=logits.device)]  # [R', vocab]
        md = _row_metadata(runner, request_ids, drafts, sched, logits.device)
        return verify(sub, md, request_ids, drafts, runner.sampler.default_generator, q_rows)
    except Exception as exc:  # noqa: BLE001 - find the request(s) it belongs to; they alone fail
        if len(request_ids) == 1:
            failed[request_ids[0]] = f"sampling failed: {type(exc).__name__}: {exc}"
            return []
        rows, first = [], 0
        for rid, d, q in zip(request_ids, drafts, q_rows):
            n = len(d) + 1
            rows += _verify_or_split(runner, logits, [rid], [d], [q], row_idx[first:first + n],
                                     sched, failed)
            first += n
        return rows


def _all_plain_greedy(runner, request_ids, drafts) -> bool:
    """Every verified row would be sampled as the raw argmax (``is_plain_greedy`` at the row's
    output length, which only grows along a request's rows), so the verifier's metadata and
    processing can be skipped (``verifier.verify_argmax``)."""
    for rid, d in zip(request_ids, drafts):
        st = runner.states[rid]
        num_output = len(st.token_ids) - len(d) - st.num_prompt_tokens   # before the drafts
        if not is_plain_greedy(st.sampling_params, num_output):
            return False
    return True


def _row_metadata(runner, request_ids, drafts, sched, device) -> SamplingMetadata:
    """Sampling metadata with one row per verified position (output so far + drafts before)."""
    params, prompts, outputs, gens, keys = [], [], [], [], []
    for rid, d in zip(request_ids, drafts):
        st = runner.states[rid]
        committed = st.token_ids[st.num_prompt_tokens:len(st.token_ids) - len(d)]
        for j in range(len(d) + 1):
            params.append(st.sampling_params)
            prompts.append(st.prompt_token_ids)
            outputs.append(committed + d[:j])
            gens.append(runner.generators.get(rid))
            keys.append(rid)
    return SamplingMetadata.build(params, prompts, outputs, gens, runner.eos_token_ids,
                                  runner.vocab_size, device,
                                  grammar_mask(sched.grammar, keys, device))


def _commit(states, request_ids, drafts, rows) -> None:
    """Runner tokens := committed tokens + what was output (drafts unstaged)."""
    out: dict[str, list[int]] = {}
    for rid, token, _, _ in rows:
        out.setdefault(rid, []).append(token)
    for rid, d in zip(request_ids, drafts):
        st = states[rid]
        if d:
            del st.token_ids[len(st.token_ids) - len(d):]
        st.token_ids += out.get(rid, [])
        st.num_computed_tokens = len(st.token_ids) - 1


def propose_drafts(runner, sched: SchedulerOutput, out: ModelRunnerOutput) -> None:
    """Fill ``out.draft_token_ids`` for the requests the core asked for that sampled (and
    ``runner.draft_probs`` for sampled draft-model drafts; every request scheduled in this step
    has used its previous ones)."""
    if runner.draft_probs:
        for rid in sched.num_scheduled_tokens:
            runner.draft_probs.pop(rid, None)
    proposer: Proposer = runner.proposer
    states = runner.states
    sampled = set(out.request_ids)
    wanted = {rid: (states[rid].token_ids, k) for rid, k in sched.num_drafts_to_propose.items()
              if rid in sampled and k > 0}
    if not wanted:
        return
    if not isinstance(proposer, DraftModelProposer):
        out.draft_token_ids = proposer.propose(
            wanted, {rid: states[rid].history_scope for rid in wanted})
        return
    sampling = {rid: DraftSampling(states[rid].sampling_params, states[rid].num_prompt_tokens)
                for rid in wanted if not states[rid].sampling_params.is_greedy}
    out.draft_token_ids, probs = proposer.propose_sampled(
        wanted, sampling, runner.eos_token_ids, runner.sampler.default_generator)
    for rid, q in probs.items():
        runner.draft_probs[rid] = (out.draft_token_ids[rid], q)


def grammar_mask(grammar: GrammarBitmask | None, row_keys: list[str],
                 device: torch.device) -> GrammarMask | None:
    """The core's bitmask rows placed at their sampling rows: ``row_keys[i]`` is row i's request
    (a request verifying drafts has several consecutive rows, matched in order to its bitmask
    rows); bitmask rows of requests not sampled here (a failed row) are left out."""
    if grammar is None:
        return None
    free: dict[str, list[int]] = {}
    for i, rid in enumerate(reversed(row_keys)):
        free.setdefault(rid, []).append(len(row_keys) - 1 - i)
    rows, present = [], []
    for j, rid in enumerate(grammar.request_ids):
        if free.get(rid):
            rows.append(free[rid].pop())
            present.append(j)
    if not present:
        return None
    bitmask = grammar.bitmask if len(present) == len(grammar.request_ids) else \
        grammar.bitmask[present]
    return GrammarMask.from_rows(rows, bitmask, device)
