"""Per-step sampling metadata: the batched, on-device form of the requests' SamplingParams.

Owns ``SamplingMetadata`` and its ``build`` from one step's requests (one row per request that
samples this step, in batch order). Invariants:
- every tensor has leading dimension ``n`` (the number of rows) and lives on the given device;
- an optional tensor is ``None`` exactly when no row needs it; when present, rows that do not use
  the feature hold its neutral value (top_k = vocab_size, top_p = 1, min_p = 0, repetition 1,
  frequency 0, presence 0), which leaves those rows' logits bit-for-bit unchanged;
- filters that only affect random sampling (top-k/top-p/min-p) are neutral in greedy rows;
- token history is only gathered for rows that use a penalty (other rows are all zero/False);
- nothing is mutated after ``build``; a new instance is built every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from conveyor.sampling.constraints import GrammarMask, LogitBias
from conveyor.sampling.penalties import token_counts, token_presence
from conveyor.sampling_params import SamplingParams


@dataclass(slots=True)
class SamplingMetadata:
    """Everything the Sampler needs for one step, one row per sampling request, in batch order.

    Fields:
        temperature: ``[n]`` float32, as requested (greedy rows hold their value, usually 0).
        greedy_mask: ``[n]`` bool, True for greedy rows; ``None`` when all_greedy or all_random.
        is_greedy: per row, whether it samples greedily (``SamplingParams.is_greedy``).
        top_k: ``[n]`` int64, ``vocab_size`` where disabled; ``None`` if no random row uses it.
        top_p: ``[n]`` float32, 1.0 where disabled; ``None`` if no random row uses it.
        min_p: ``[n]`` float32, 0.0 where disabled; ``None`` if no random row uses it.
        repetition_penalty / frequency_penalty / presence_penalty: ``[n]`` float32 or ``None``.
        seen_token_mask: ``[n, vocab]`` bool, token occurs in prompt or output (rows with a
            repetition penalty only); ``None`` when repetition_penalty is ``None``.
        output_token_counts: ``[n, vocab]`` int32 counts of output tokens (rows with a frequency
            or presence penalty only); ``None`` when both are ``None``.
        generators: per row, its own generator (seeded requests) or ``None`` to draw from the
            sampler's default generator. A generator must live on the logits' device.
        all_greedy / all_random: every row greedy / no row greedy (both True when n == 0).
        num_logprobs: per row, ``SamplingParams.logprobs`` (None = no logprobs for that row).
        max_num_logprobs: max over rows of num_logprobs, ``None`` if no row asked.
        banned_token_ids: per row, ids forced to -inf this step (min_tokens not yet reached:
            EOS ids and stop_token_ids, restricted to ids < vocab_size).
        vocab_size: width of the logits this metadata was built for.
        grammar: the allowed-token bitmask of the rows with structured outputs (None if none).
        logit_bias: the (row, token, bias) triples of rows with a ``logit_bias`` (None if none).
    """

    temperature: torch.Tensor
    greedy_mask: torch.Tensor | None
    is_greedy: list[bool]
    top_k: torch.Tensor | None
    top_p: torch.Tensor | None
    min_p: torch.Tensor | None
    repetition_penalty: torch.Tensor | None
    frequency_penalty: torch.Tensor | None
    presence_penalty: torch.Tensor | None
    seen_token_mask: torch.Tensor | None
    output_token_counts: torch.Tensor | None
    generators: list[torch.Generator | None]
    all_greedy: bool
    all_random: bool
    num_logprobs: list[int | None]
    max_num_logprobs: int | None
    banned_token_ids: list[list[int]]
    vocab_size: int
    grammar: GrammarMask | None = None
    logit_bias: LogitBias | None = None

    @property
    def num_rows(self) -> int:
        return len(self.is_greedy)

    @classmethod
    def build(cls, params: list[SamplingParams], prompt_token_ids: list[list[int]],
              output_token_ids: list[list[int]], generators: list[torch.Generator | None],
              eos_token_ids: frozenset[int], vocab_size: int,
              device: torch.device | str, grammar: GrammarMask | None = None) -> SamplingMetadata:
        """Batch one step's requests into tensors on ``device``.

        All lists are per row and must have the same length. ``output_token_ids[i]`` is the
        tokens generated so far (before this step's sample). Raises ValueError on mismatched
        lengths or on a prompt/output token id outside ``[0, vocab_size)`` in a penalised row.
        """
        n = len(params)
        if not len(prompt_token_ids) == len(output_token_ids) == len(generators) == n:
            raise ValueError("params, prompt_token_ids, output_token_ids and generators differ in length")
        greedy = [p.is_greedy for p in params]
        all_greedy, all_random = all(greedy), not any(greedy)
        temperature = torch.tensor([float(p.temperature) for p in params],
                                   dtype=torch.float32, device=device)  # [n]
        greedy_mask = None if all_greedy or all_random else torch.tensor(greedy, device=device)  # [n]
        rand = [not g for g in greedy]
        top_k = _optional([min(p.top_k, vocab_size) if p.top_k > 0 and r else vocab_size
                           for p, r in zip(params, rand)], vocab_size, torch.int64, device)
        top_p = _optional([p.top_p if r else 1.0 for p, r in zip(params, rand)], 1.0,
                          torch.float32, device)
        min_p = _optional([p.min_p if r else 0.0 for p, r in zip(params, rand)], 0.0,
                          torch.float32, device)
        rep, freq, pres = (_optional([float(getattr(p, name)) for p in params], neutral,
                                     torch.float32, device)
                           for name, neutral in (("repetition_penalty", 1.0),
                                                 ("frequency_penalty", 0.0),
                                                 ("presence_penalty", 0.0)))
        seen, counts = _history(params, prompt_token_ids, output_token_ids, rep is not None,
                                freq is not None or pres is not None, vocab_size, device)
        num_logprobs = [p.logprobs for p in params]
        asked = [k for k in num_logprobs if k is not None]
        banned = [_banned_ids(p, out, eos_token_ids, vocab_size)
                  for p, out in zip(params, output_token_ids)]
        return cls(temperature=temperature, greedy_mask=greedy_mask, is_greedy=greedy,
                   top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=rep,
                   frequency_penalty=freq, presence_penalty=pres, seen_token_mask=seen,
                   output_token_counts=counts, generators=list(generators),
                   all_greedy=all_greedy, all_random=all_random, num_logprobs=num_logprobs,
                   max_num_logprobs=max(asked) if asked else None, banned_token_ids=banned,
                   vocab_size=vocab_size, grammar=grammar,
                   logit_bias=LogitBias.build(params, vocab_size, device))


def _optional(values: list, neutral, dtype: torch.dtype,
              device: torch.device | str) -> torch.Tensor | None:
    """``values`` as a ``[n]`` tensor, or None when every value is the neutral one."""
    if all(v == neutral for v in values):
        return None
    return torch.tensor(values, dtype=dtype, device=device)  # [n]


def _history(params: list[SamplingParams], prompts: list[list[int]], outputs: list[list[int]],
             need_seen: bool, need_counts: bool, vocab_size: int,
             device: torch.device | str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Seen-token mask (prompt + output) for repetition rows and output counts for
    frequency/presence rows; each None when not needed."""
    seen = counts = None
    if need_seen:
        rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        both: list[list[int]] = [[] for _ in params]
        for i in rows:
            both[i] = prompts[i] + outputs[i]
        seen = token_presence(both, rows, vocab_size, device)  # [n, vocab]
    if need_counts:
        rows = [i for i, p in enumerate(params)
                if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
        counts = token_counts(outputs, rows, vocab_size, device)  # [n, vocab]
    return seen, counts


def is_plain_greedy(p: SamplingParams, num_output_tokens: int) -> bool:
    """Whether the Sampler's token for this row is just the argmax of the raw logits: greedy,
    no logprobs, no penalty, no logit bias, no structured outputs, and nothing banned
    (min_tokens reached, see ``_banned_ids``)."""
    return (p.is_greedy and p.logprobs is None and p.repetition_penalty == 1.0
            and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0
            and num_output_tokens >= p.min_tokens and p.logit_bias is None
            and p.structured_outputs is None)


def _banned_ids(p: SamplingParams, output: list[int], eos_token_ids: frozenset[int],
                vocab_size: int) -> list[int]:
    """Ids to forbid this step: EOS and stop_token_ids while fewer than min_tokens were generated.

    EOS is banned even with ignore_eos (the stop checker, not the sampler, owns ignore_eos).
    """
    if len(output) >= p.min_tokens:
        return []
    ids = set(eos_token_ids) | set(p.stop_token_ids or ())
    return sorted(i for i in ids if 0 <= i < vocab_size)
