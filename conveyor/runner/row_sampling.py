"""Sampling one step's rows so that a row's failure is its own request's alone.

Owns the isolation policy around the batched sampler; the caller (``ModelRunner``) owns how a
batch of rows is sampled (``sample_batch``). Invariants:

- A row with a non-finite logit (NaN or +-inf: broken weights, an overflow, NaN in its KV) is
  never sampled; its request is reported in ``failed`` and gets no token. Detection is one
  reduction per row over the logits already computed (``argmax_rows``: where the model runs the
  C++ ops, one C++ pass that also gives plain-greedy rows their argmax; elsewhere a NaN or inf
  anywhere makes the row's sum non-finite).
- The other rows are sampled together exactly as they would be without the dropped rows: a
  row's token depends only on its own logits, parameters and generator (the Sampler's
  invariant), so a failed neighbour never changes a healthy request's tokens.
- If sampling the batch raises, each row is retried alone and only the rows that raise alone
  fail. (A seeded row retried after a failed batch may have had noise drawn by the failed
  attempt; batch failures are bugs, never a request's values, which the engine checks first.)
"""

from __future__ import annotations

from typing import Callable

import torch

from conveyor.core.outputs import ModelRunnerOutput
from conveyor.kernels import SUPPORTED_DTYPES

# (logits [n, vocab], request ids) -> (token per row, logprob per row or None, top per row or None)
SampleBatch = Callable[[torch.Tensor, list[str]],
                       tuple[list[int], list[float] | None, list[list[tuple[int, float]]] | None]]

NON_FINITE_LOGITS = "the model produced non-finite logits (NaN or infinity) for this request"


def argmax_rows(logits: torch.Tensor, fused: bool) -> tuple[list[int], list[bool]]:
    """Per row of ``logits`` ``[n, vocab]``: ``torch.argmax`` (the first maximum) and whether
    every value is finite. ``fused`` (the model runs the C++ ops on the CPU): one C++ pass per
    row (``fused_ops.argmax_rows``; torch's argmax reduces a row one element at a time, ~70 us
    for a 49k vocabulary on a Zen 5), else torch."""
    if fused and logits.dtype in SUPPORTED_DTYPES and logits.stride(-1) == 1:
        tokens = torch.empty(logits.shape[0], dtype=torch.long)  # [n]
        finite = torch.empty(logits.shape[0], dtype=torch.bool)  # [n]
        torch.ops.conveyor_cpu.argmax_rows(tokens, finite, logits)
        return tokens.tolist(), finite.tolist()
    return logits.argmax(dim=-1).tolist(), finite_rows(logits)


def finite_rows(logits: torch.Tensor, fused: bool = False) -> list[bool]:
    """Per row of ``logits`` ``[n, vocab]``: every value is finite (``fused``: as in
    ``argmax_rows``)."""
    if fused:
        return argmax_rows(logits, fused)[1]
    return logits.sum(dim=-1).isfinite().tolist()  # [n]; a single pass, no [n, vocab] temporary


def sample_isolated(logits: torch.Tensor, request_ids: list[str], sample_batch: SampleBatch,
                    failed: dict[str, str], greedy: bool = False,
                    fused: bool = False) -> ModelRunnerOutput:
    """Tokens for the healthy rows of ``logits`` ``[n, vocab]`` (row i is ``request_ids[i]``).

    Requests already in ``failed`` are skipped; rows that fail here are added to it (request id
    -> why). The output lists only the rows that sampled, in batch order, and carries ``failed``.
    ``greedy``: every row samples the raw argmax (``is_plain_greedy``), which is then taken in
    the same pass as the finiteness check, and ``sample_batch`` is not called. ``fused``: as in
    ``argmax_rows``.
    """
    if greedy:
        tokens, finite = argmax_rows(logits, fused)
    else:
        finite = finite_rows(logits, fused)
    for rid, ok in zip(request_ids, finite):
        if not ok:
            failed.setdefault(rid, NON_FINITE_LOGITS)
    if greedy:
        return merge_rows([(rid, tokens[i], None, None) for i, rid in enumerate(request_ids)
                           if rid not in failed], failed)
    keep = [i for i, rid in enumerate(request_ids) if rid not in failed]
    if len(keep) < len(request_ids):
        logits = logits[torch.tensor(keep, dtype=torch.long, device=logits.device)]  # [n', vocab]
        request_ids = [request_ids[i] for i in keep]
    if not request_ids:
        return ModelRunnerOutput([], [], failed=failed)
    rows = _sample_or_split(logits, request_ids, sample_batch, failed)
    return merge_rows(rows, failed)


def _sample_or_split(logits: torch.Tensor, request_ids: list[str], sample_batch: SampleBatch,
                     failed: dict[str, str]) -> list[tuple[str, int, float | None, list | None]]:
    try:
        tokens, logprobs, top = sample_batch(logits, request_ids)
    except Exception as exc:  # noqa: BLE001 - find the row(s) it belongs to; they alone fail
        if len(request_ids) == 1:
            failed[request_ids[0]] = f"sampling failed: {type(exc).__name__}: {exc}"
            return []
        rows = []
        for i, rid in enumerate(request_ids):
            rows += _sample_or_split(logits[i:i + 1], [rid], sample_batch, failed)
        return rows
    return [(rid, tokens[i], None if logprobs is None else logprobs[i],
             None if top is None else top[i]) for i, rid in enumerate(request_ids)]


def merge_rows(rows, failed: dict[str, str]) -> ModelRunnerOutput:
    """One output from per-row results; rows that asked for no logprobs get placeholders when
    others did (nobody reads them: only requests that asked look at their logprobs)."""
    any_logprobs = any(r[2] is not None for r in rows)
    return ModelRunnerOutput(
        [r[0] for r in rows], [r[1] for r in rows],
        [0.0 if r[2] is None else r[2] for r in rows] if any_logprobs else None,
        [[] if r[3] is None else r[3] for r in rows] if any_logprobs else None,
        failed=failed)
