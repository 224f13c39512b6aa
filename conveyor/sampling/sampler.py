"""Token sampling for one engine step: logits ``[n, vocab]`` -> one token id per row.

Owns the order of logit processing (vLLM semantics): logprobs are taken from the raw logits;
then the grammar bitmask of constrained rows and banned ids -> -inf, ``logit_bias`` added,
repetition, frequency and presence penalties; greedy rows take the
argmax of the penalised logits; random rows divide by temperature, apply top-k, top-p and min-p,
and sample with the exponential race ``argmax(probs / q)``, ``q ~ Exp(1)``.

Invariants:
- everything is batched; the only per-row Python loop draws ``q`` for rows with their own
  generator (each such row draws exactly ``vocab`` values per step from it);
- a row's token depends only on its own logits, metadata and generator, never on the other rows
  in the batch or their order (neutral filter values leave a row's logits unchanged);
- greedy rows consume no randomness; rows without a generator draw together from the sampler's
  default generator (``None`` = torch's global RNG for the device);
- the caller's logits tensor is never modified; all work stays on ``logits.device``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from conveyor.sampling.constraints import apply_grammar_mask, apply_logit_bias
from conveyor.sampling.metadata import SamplingMetadata
from conveyor.sampling.penalties import apply_banned_tokens, apply_penalties

_NEG_INF = float("-inf")


@dataclass(slots=True)
class SamplerOutput:
    """One step's result, per row in batch order.

    sampled_token_ids: the chosen token of each row.
    logprobs: per row, the raw-logit log-probability of its sampled token; ``None`` if no row
        asked for logprobs (when some did, every row gets a value).
    top_logprobs: per row, the top-N ``(token_id, logprob)`` pairs sorted by logprob descending
        with N = that row's ``num_logprobs`` (``[]`` for rows that asked for none or for 0);
        ``None`` if no row asked.
    """

    sampled_token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None


def processed_logits(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """A float32 copy of ``logits`` ``[n, vocab]`` with grammar masks, banned ids, logit bias
    and penalties applied.

    Greedy rows sample the argmax of this tensor.
    """
    work = logits.to(torch.float32, copy=True)  # [n, vocab]
    apply_grammar_mask(work, md.grammar)
    apply_banned_tokens(work, md.banned_token_ids)
    apply_logit_bias(work, md.logit_bias)
    apply_penalties(work, md)
    return work


def apply_temperature(logits: torch.Tensor, md: SamplingMetadata) -> None:
    """Divide each row by its temperature in place (greedy rows are divided by 1)."""
    if md.all_greedy:
        return
    temp = md.temperature  # [n]
    if md.greedy_mask is not None:
        temp = torch.where(md.greedy_mask, 1.0, temp)  # [n]
    logits.div_(temp.unsqueeze(1))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> None:
    """Mask (to -inf, in place) tokens outside each row's top-k, then outside its top-p nucleus.

    top-k keeps tokens whose logit is >= the k-th largest (ties at the threshold are kept).
    top-p, on the top-k-renormalised distribution, keeps the smallest set of most likely tokens
    whose total probability is >= p (always at least the most likely token).
    """
    if top_k is None and top_p is None:
        return
    sorted_logits, sorted_idx = logits.sort(dim=-1)  # [n, vocab] ascending
    vocab = logits.shape[-1]
    if top_k is not None:
        kth = sorted_logits.gather(1, (vocab - top_k).unsqueeze(1))  # [n, 1]
        sorted_logits.masked_fill_(sorted_logits < kth, _NEG_INF)
    if top_p is not None:
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [n, vocab] mass at or below each token
        drop = cum <= (1.0 - top_p).unsqueeze(1)  # [n, vocab]
        drop[:, -1] = False
        sorted_logits.masked_fill_(drop, _NEG_INF)
    logits.scatter_(1, sorted_idx, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor | None) -> None:
    """Mask (in place) tokens whose probability is < min_p * (the row's max probability)."""
    if min_p is None:
        return
    probs = logits.softmax(dim=-1)  # [n, vocab]
    max_prob = probs.amax(dim=-1, keepdim=True)  # [n, 1]
    logits.masked_fill_(probs < min_p.unsqueeze(1) * max_prob, _NEG_INF)


def sampling_probs(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """The distribution random rows sample from: ``[n, vocab]`` float32, rows sum to 1.

    ``logits`` is the output of ``processed_logits`` and is modified in place. Greedy rows are
    computed at temperature 1 without filters; their values are not used for sampling.
    """
    apply_temperature(logits, md)
    apply_top_k_top_p(logits, md.top_k, md.top_p)
    apply_min_p(logits, md.min_p)
    return logits.softmax(dim=-1)  # [n, vocab]


class Sampler:
    """Turns a step's logits into tokens (and logprobs) according to ``SamplingMetadata``.

    ``default_generator`` serves rows whose metadata generator is ``None``; it must live on the
    logits' device (``None`` = torch's global RNG). The Sampler holds no other state.
    """

    def __init__(self, default_generator: torch.Generator | None = None) -> None:
        self.default_generator = default_generator

    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        """Sample one token per row of ``logits`` ``[n, vocab]`` (any float dtype; float32 math).

        Per-row logprob counts come from ``md.num_logprobs``. Does not modify ``logits``.
        """
        n, vocab = logits.shape
        if n != md.num_rows or vocab != md.vocab_size:
            raise ValueError(f"logits {tuple(logits.shape)} do not match metadata "
                             f"({md.num_rows} rows, vocab {md.vocab_size})")
        if n == 0:
            return SamplerOutput([], None, None)
        raw_logprobs = None
        if md.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits.float(), dim=-1)  # [n, vocab]
        if md.all_greedy and untouched_by_processing(md):
            sampled = logits.argmax(dim=-1)  # [n]: nothing to apply, no copy needed
        else:
            sampled = self._sample(processed_logits(logits, md), md)  # [n] int64
        logprobs, top = gather_logprobs(raw_logprobs, sampled, md)
        return SamplerOutput(sampled.tolist(), logprobs, top)

    def _sample(self, work: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """Token per row from processed logits ``[n, vocab]`` (consumed in place)."""
        greedy_ids = None if md.all_random else work.argmax(dim=-1)  # [n]
        if md.all_greedy:
            return greedy_ids
        probs = sampling_probs(work, md)  # [n, vocab]
        q = self._exponentials(md, probs.shape, probs.device)  # [n, vocab]
        random_ids = probs.div_(q).argmax(dim=-1)  # [n]
        if md.all_random:
            return random_ids
        return torch.where(md.greedy_mask, greedy_ids, random_ids)  # [n]

    def _exponentials(self, md: SamplingMetadata, shape: torch.Size,
                      device: torch.device) -> torch.Tensor:
        """Exp(1) noise ``[n, vocab]``: own generator per seeded row, default for the rest,
        ones (no draw) for greedy rows. Clamped away from 0 so masked tokens stay at 0."""
        n, vocab = shape
        seeded = [i for i, g in enumerate(md.generators) if g is not None and not md.is_greedy[i]]
        if not seeded and md.all_random:
            q = torch.empty(n, vocab, dtype=torch.float32, device=device).exponential_(generator=self.default_generator)
            return q.clamp_min_(torch.finfo(q.dtype).tiny)  # [n, vocab]
        q = torch.ones(n, vocab, dtype=torch.float32, device=device)  # [n, vocab]
        shared = [i for i, g in enumerate(md.generators) if g is None and not md.is_greedy[i]]
        if shared:
            draw = torch.empty(len(shared), vocab, dtype=torch.float32, device=device).exponential_(
                generator=self.default_generator)  # [len(shared), vocab]
            q[torch.tensor(shared, device=device)] = draw
        for i in seeded:
            q[i] = torch.empty(vocab, dtype=torch.float32, device=device).exponential_(generator=md.generators[i])
        return q.clamp_min_(torch.finfo(q.dtype).tiny)


def untouched_by_processing(md: SamplingMetadata) -> bool:
    """No grammar, banned ids, bias or penalty this step: ``processed_logits`` would return a
    plain copy."""
    return (md.repetition_penalty is None and md.frequency_penalty is None
            and md.presence_penalty is None and not any(md.banned_token_ids)
            and md.grammar is None and md.logit_bias is None)


def gather_logprobs(raw: torch.Tensor | None, sampled: torch.Tensor, md: SamplingMetadata
                     ) -> tuple[list[float] | None, list[list[tuple[int, float]]] | None]:
    """Sampled-token logprob per row and each row's top-N, from raw log-softmax ``[n, vocab]``."""
    if raw is None or md.max_num_logprobs is None:
        return None, None
    chosen = raw.gather(1, sampled.unsqueeze(1)).squeeze(1).tolist()  # [n]
    k = min(md.max_num_logprobs, raw.shape[-1])
    top_vals, top_ids = raw.topk(k, dim=-1)  # [n, k] descending
    vals, ids = top_vals.tolist(), top_ids.tolist()
    top = [list(zip(ids[i][:want], vals[i][:want])) if want else []
           for i, want in enumerate(md.num_logprobs)]
    return chosen, top
