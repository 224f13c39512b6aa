"""The runner's view of the requests it holds, and the flat ragged batch built from them each step.

The runner keeps its own copy of each request's tokens (it appends what it samples), so the
scheduler only sends what changed. Generators live apart from request state so a request
preempted and resumed keeps drawing from the same random stream (same seed, same text).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from conveyor.attention.backend import AttentionMetadata
from conveyor.core.outputs import SchedulerOutput
from conveyor.sampling_params import SamplingParams


@dataclass(slots=True)
class CachedRequestState:
    request_id: str
    token_ids: list[int]              # prompt + output so far
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    history_scope: str = ""           # see NewRequestData.history_scope

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass(slots=True)
class FlatBatch:
    """One step's model inputs. ``sample_rows`` are the request ids whose last token is sampled."""

    input_ids: torch.Tensor           # [T]
    positions: torch.Tensor           # [T]
    attn: AttentionMetadata
    logits_indices: torch.Tensor      # [N + D + P] last token of each sampling request (and before
                                      # it one row per draft it verifies: D in all), then of each
                                      # length-1 padding sequence (computed, then discarded)
    sample_request_ids: list[str]     # [N]
    pad_logits: list[int]             # [P] flat positions of the padding rows


def build_flat_batch(sched: SchedulerOutput, states: dict[str, CachedRequestState], block_size: int,
                     device: torch.device, scratch_block: int = 0) -> FlatBatch:
    """Flatten the scheduled tokens of every request into one batch.

    Real requests carry no padding. Padding sequences asked for by the static/dynamic baselines
    (``sched.padding_seq_lens``) are laid out before them as dummy requests whose K/V go to a
    scratch block, so their compute is really spent and their results are thrown away.
    """
    ids, starts, q_lens, seq_lens, tables, sample_ids, logits_idx = [], [0], [], [], [], [], []
    for n in sched.padding_seq_lens:
        ids.append([0] * n)
        q_lens.append(n)
        seq_lens.append(n)
        starts.append(starts[-1] + n)
        tables.append([scratch_block] * (-(-n // block_size)))
    pad_logits = [starts[i + 1] - 1 for i, n in enumerate(sched.padding_seq_lens) if n == 1]
    for rid, n in sched.num_scheduled_tokens.items():
        st = states[rid]
        nc = st.num_computed_tokens
        ids.append(st.token_ids[nc:nc + n])
        q_lens.append(n)
        seq_lens.append(nc + n)
        starts.append(starts[-1] + n)
        tables.append(st.block_ids)
        if nc + n == len(st.token_ids):
            sample_ids.append(rid)
            k = len(sched.scheduled_spec_tokens.get(rid, ()))   # drafts: one row per position
            logits_idx.extend(range(starts[-1] - 1 - k, starts[-1]))
    q_lens_np = np.asarray(q_lens, dtype=np.int64)
    seq_np = np.asarray(seq_lens, dtype=np.int64)
    # position of every flat token: its request's first new position + its offset in the chunk
    first_pos = np.repeat(seq_np - q_lens_np, q_lens_np)
    offsets = np.arange(starts[-1], dtype=np.int64) - np.repeat(np.asarray(starts[:-1]), q_lens_np)
    positions = first_pos + offsets
    max_blocks = max((len(t) for t in tables), default=1)
    table_np = np.zeros((len(tables), max_blocks), dtype=np.int64)
    for i, t in enumerate(tables):
        table_np[i, :len(t)] = t
    req_of_token = np.repeat(np.arange(len(tables)), q_lens_np)
    slots = table_np[req_of_token, positions // block_size] * block_size + positions % block_size
    logits_idx += pad_logits
    flat_ids = np.fromiter((t for chunk in ids for t in chunk), dtype=np.int64, count=starts[-1])
    to = lambda a: torch.from_numpy(a).to(device, non_blocking=True)  # noqa: E731
    attn = AttentionMetadata(
        query_start_loc=to(np.asarray(starts, dtype=np.int64)), seq_lens=to(seq_np),
        block_tables=to(table_np), slot_mapping=to(slots), query_start_loc_cpu=starts,
        query_lens_cpu=q_lens,
        seq_lens_cpu=seq_lens, max_query_len=max(q_lens, default=0),
        max_seq_len=max(seq_lens, default=0))
    return FlatBatch(to(flat_ids), to(positions), attn,
                     to(np.asarray(logits_idx, dtype=np.int64)), sample_ids, pad_logits)
