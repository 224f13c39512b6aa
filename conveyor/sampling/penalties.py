"""Logit edits that depend on a request's token history: banned ids and the three penalties.

Owns turning per-row token lists into dense per-vocab tensors (``token_counts``,
``token_presence``) and applying them to a batch of logits. Invariants:
- every function here works row-wise and batched (no Python loop over rows on the device);
- a row whose penalty is neutral (repetition 1, frequency 0, presence 0) or that has no banned
  ids keeps its logits bit-for-bit, so batch composition never changes a row's result;
- all edits are in place on a float32 logits tensor the caller owns (never the model's output).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from conveyor.sampling.metadata import SamplingMetadata


def _flat_indices(token_lists: list[list[int]], rows: list[int],
                  vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and token index tensors (CPU, int64) for the tokens of ``rows``; checks the id range."""
    lengths = torch.tensor([len(token_lists[i]) for i in rows], dtype=torch.int64)  # [len(rows)]
    flat = torch.tensor(list(itertools.chain.from_iterable(token_lists[i] for i in rows)),
                        dtype=torch.int64)  # [total]
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= vocab_size):
        raise ValueError(f"token id out of range [0, {vocab_size}) in sampling history")
    row_idx = torch.repeat_interleave(torch.tensor(rows, dtype=torch.int64), lengths)  # [total]
    return row_idx, flat


def token_counts(token_lists: list[list[int]], rows: list[int], vocab_size: int,
                 device: torch.device | str) -> torch.Tensor:
    """How often each token occurs in ``token_lists[i]`` for each i in ``rows``.

    Returns an int32 tensor ``[len(token_lists), vocab_size]`` on ``device``; rows not listed in
    ``rows`` are all zero. Raises ValueError if an id is outside ``[0, vocab_size)``.
    """
    counts = torch.zeros(len(token_lists), vocab_size, dtype=torch.int32, device=device)  # [n, vocab]
    row_idx, flat = _flat_indices(token_lists, rows, vocab_size)
    if flat.numel():
        ones = torch.ones(flat.numel(), dtype=torch.int32, device=device)  # [total]
        counts.index_put_((row_idx.to(device), flat.to(device)), ones, accumulate=True)
    return counts


def token_presence(token_lists: list[list[int]], rows: list[int], vocab_size: int,
                   device: torch.device | str) -> torch.Tensor:
    """Bool ``[len(token_lists), vocab_size]``: True where the token occurs in that row's list.

    Only rows in ``rows`` are filled (others all False). Raises ValueError on out-of-range ids.
    """
    mask = torch.zeros(len(token_lists), vocab_size, dtype=torch.bool, device=device)  # [n, vocab]
    row_idx, flat = _flat_indices(token_lists, rows, vocab_size)
    if flat.numel():
        mask[row_idx.to(device), flat.to(device)] = True
    return mask


def apply_banned_tokens(logits: torch.Tensor, banned_token_ids: list[list[int]]) -> None:
    """Set ``logits[i, t] = -inf`` for every t in ``banned_token_ids[i]`` (in place).

    ``logits`` is ``[n, vocab]``; ids must already be within the vocabulary.
    """
    rows = [i for i, ids in enumerate(banned_token_ids) for _ in ids]
    if not rows:
        return
    cols = list(itertools.chain.from_iterable(banned_token_ids))
    device = logits.device
    row_idx = torch.tensor(rows, dtype=torch.int64).to(device)  # [num_banned]
    col_idx = torch.tensor(cols, dtype=torch.int64).to(device)  # [num_banned]
    logits[row_idx, col_idx] = float("-inf")


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> None:
    """Apply repetition, then frequency, then presence penalties to ``logits`` ``[n, vocab]`` in place.

    Repetition (vLLM/HF rule) touches tokens seen in the prompt or the output: a positive logit
    is divided by the penalty, a non-positive one multiplied. Frequency subtracts
    ``frequency_penalty * count`` and presence subtracts ``presence_penalty * (count > 0)``, both
    counting output tokens only. Penalties that are ``None`` in ``md`` are skipped.
    """
    if md.repetition_penalty is not None:
        assert md.seen_token_mask is not None
        penalty = torch.where(md.seen_token_mask, md.repetition_penalty.unsqueeze(1), 1.0)  # [n, vocab]
        scaled = torch.where(logits > 0, logits / penalty, logits * penalty)  # [n, vocab]
        logits.copy_(scaled)
    if md.frequency_penalty is not None:
        assert md.output_token_counts is not None
        counts = md.output_token_counts.to(logits.dtype)  # [n, vocab]
        logits.sub_(md.frequency_penalty.unsqueeze(1) * counts)
    if md.presence_penalty is not None:
        assert md.output_token_counts is not None
        present = (md.output_token_counts > 0).to(logits.dtype)  # [n, vocab]
        logits.sub_(md.presence_penalty.unsqueeze(1) * present)
