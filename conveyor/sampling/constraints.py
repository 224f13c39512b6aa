"""Logit edits that come from a request's constraints: grammar bitmasks and ``logit_bias``.

Owns ``GrammarMask`` (the allowed-token bitmask of the constrained rows of one step) and
``LogitBias`` (flattened (row, token, bias) triples), and applying both to a float32 logits
copy. Invariants:
- only the rows listed are touched; every other row keeps its logits bit-for-bit, so an
  unconstrained request samples the same tokens whatever runs beside it;
- a disallowed token becomes -inf, so no later step (penalties, temperature, top-k/p, min-p,
  the exponential race) can pick it; the grammar always allows at least one token (EOS where
  it may end), so a masked row is never all -inf;
- everything is batched: no Python loop over rows or tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from conveyor.sampling_params import SamplingParams

_NEG_INF = float("-inf")


@dataclass(slots=True)
class GrammarMask:
    """rows: ``[k]`` int64 batch rows that are constrained; disallowed: ``[k, >= vocab]`` bool,
    True where the row's grammar forbids the token (columns past the vocabulary are ignored)."""

    rows: torch.Tensor
    disallowed: torch.Tensor

    @classmethod
    def from_rows(cls, rows: list[int], bitmask: np.ndarray,
                  device: torch.device | str) -> GrammarMask:
        """From the core's ``[k, ceil(vocab / 32)]`` int32 bitmask (bit ``t % 32`` of word
        ``t // 32`` set when token ``t`` is allowed); unpacked on the host in one numpy pass."""
        disallowed = torch.from_numpy(unpack_bitmask(bitmask) == 0)  # [k, words * 32]
        return cls(torch.tensor(rows, dtype=torch.int64, device=device), disallowed.to(device))


@dataclass(slots=True)
class LogitBias:
    """rows / token_ids / biases: ``[m]`` each, one entry per (row, biased token)."""

    rows: torch.Tensor
    token_ids: torch.Tensor
    biases: torch.Tensor

    @classmethod
    def build(cls, params: list[SamplingParams], vocab_size: int,
              device: torch.device | str) -> LogitBias | None:
        """The bias triples of a step's rows; None when no row has a ``logit_bias``. Raises
        ValueError on a token id outside ``[0, vocab_size)`` (the engine refuses those first)."""
        rows, ids, biases = [], [], []
        for i, p in enumerate(params):
            for token, bias in (p.logit_bias or {}).items():
                rows.append(i)
                ids.append(token)
                biases.append(bias)
        if not rows:
            return None
        if max(ids) >= vocab_size:
            raise ValueError(f"logit_bias token id {max(ids)} is outside [0, {vocab_size})")
        return cls(torch.tensor(rows, dtype=torch.int64, device=device),
                   torch.tensor(ids, dtype=torch.int64, device=device),
                   torch.tensor(biases, dtype=torch.float32, device=device))


def unpack_bitmask(bitmask: np.ndarray) -> np.ndarray:
    """``[k, words]`` int32 bitmask -> ``[k, words * 32]`` uint8, 1 where the token is allowed."""
    as_bytes = np.ascontiguousarray(bitmask, dtype="<i4").view(np.uint8)  # [k, words * 4]
    return np.unpackbits(as_bytes, axis=1, bitorder="little")


def apply_grammar_mask(logits: torch.Tensor, mask: GrammarMask | None) -> None:
    """Set the tokens each constrained row's grammar disallows to -inf (in place)."""
    if mask is None:
        return
    n, vocab = logits.shape
    # One masked_fill over the whole batch is cheaper than gathering and scattering rows;
    # unconstrained rows are all False, which leaves their logits bit-for-bit unchanged.
    full = torch.zeros(n, vocab, dtype=torch.bool, device=logits.device)  # [n, vocab]
    full.index_put_((mask.rows,), mask.disallowed[:, :vocab])
    logits.masked_fill_(full, _NEG_INF)


def apply_logit_bias(logits: torch.Tensor, bias: LogitBias | None) -> None:
    """Add each row's biases to its logits (in place)."""
    if bias is not None:
        logits.index_put_((bias.rows, bias.token_ids), bias.biases, accumulate=True)
