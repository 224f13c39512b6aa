"""Executes a ``SchedulerOutput``: flat ragged batch -> model -> logits of sampling rows -> sampler.

Owns the KV cache tensors (one ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` tensor per
layer), the per-request token state and generators. Returns plain lists (``ModelRunnerOutput``).
Work that belongs to one request (its generator, its logits row, its sampling) fails that request
alone: it is reported in ``ModelRunnerOutput.failed`` (``row_sampling``) and the step goes on.
Only the forward pass itself, which serves the whole batch, may raise out of ``execute``.
"""

from __future__ import annotations

import torch

from conveyor.core.outputs import ModelRunnerOutput, SchedulerOutput
from conveyor.models.layers import CausalLM
from conveyor.runner.input_batch import CachedRequestState, FlatBatch, build_flat_batch
from conveyor.runner.row_sampling import sample_isolated
from conveyor.runner.spec_step import grammar_mask, propose_drafts, stage_drafts, verify_step
from conveyor.spec_decode.ngram import Proposer
from conveyor.sampling import Sampler, SamplingMetadata, is_plain_greedy
from conveyor.structured.request_state import GrammarBitmask


def allocate_kv_caches(model: CausalLM, num_blocks: int, block_size: int,
                       dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """One tensor per layer with ``num_blocks`` pool blocks plus one scratch block (the last),
    where the static/dynamic baselines' padding sequences write."""
    cfg = model.config
    shape = (2, num_blocks + 1, block_size, cfg.num_kv_heads, cfg.head_dim)
    # Zeroed: padded attention reads slots past a sequence's end (masked, but 0 * NaN is NaN).
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]


def swap_blocks(kv_caches: list[torch.Tensor], host_kv_caches: list[torch.Tensor] | None,
                swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
    """Copy (src, dst) block pairs device -> host, then host -> device: swap-outs first, since a
    device block freed by one may be filled by the other."""
    for pairs, to_host in ((swap_out, True), (swap_in, False)):
        if not pairs:
            continue
        src_idx, dst_idx = (torch.tensor(x) for x in zip(*pairs))
        for dev, host in zip(kv_caches, host_kv_caches):
            if to_host:
                host[:, dst_idx] = dev[:, src_idx.to(dev.device)].to("cpu")
            else:
                dev[:, dst_idx.to(dev.device)] = host[:, src_idx].to(dev.device)


class ModelRunner:
    """Runs one step of the model for whatever the scheduler decided."""

    def __init__(self, model: CausalLM, kv_caches: list[torch.Tensor], block_size: int,
                 eos_token_ids: frozenset[int], device: torch.device, seed: int = 0,
                 host_kv_caches: list[torch.Tensor] | None = None,
                 proposer: Proposer | None = None):
        """proposer: speculative decoding's draft proposer (None: off)."""
        self.model = model
        self.proposer = proposer
        self.kv_caches = kv_caches
        self.host_kv_caches = host_kv_caches     # swap space, same layout, on the host
        self.block_size = block_size
        self.eos_token_ids = eos_token_ids
        self.device = device
        self.vocab_size = model.config.vocab_size
        # the C++ row reductions (argmax, finiteness) where the model runs the C++ ops
        self.fused_rows = model.fused_ops and torch.device(device).type == "cpu"
        self.scratch_block = kv_caches[0].shape[1] - 1
        self.states: dict[str, CachedRequestState] = {}
        self.generators: dict[str, torch.Generator] = {}
        # request id -> (proposed drafts, their draft probabilities [k, vocab]); see spec_step
        self.draft_probs: dict[str, tuple[list[int], torch.Tensor]] = {}
        default = torch.Generator(device=device)
        default.manual_seed(seed)
        self.sampler = Sampler(default)

    def _update_states(self, sched: SchedulerOutput, failed: dict[str, str]) -> None:
        for rid in sched.finished_request_ids:
            self.states.pop(rid, None)
            self.generators.pop(rid, None)
            self.draft_probs.pop(rid, None)
            if self.proposer is not None:
                self.proposer.drop(rid, finished=True)
        for rid in sched.preempted_request_ids:
            self.states.pop(rid, None)        # generator kept: the request comes back
            self.draft_probs.pop(rid, None)   # its drafts are dropped
            if self.proposer is not None:
                self.proposer.drop(rid, finished=False)
        for new in sched.new_requests:
            self.states[new.request_id] = CachedRequestState(
                new.request_id, new.prompt_token_ids + new.output_token_ids,
                len(new.prompt_token_ids), new.sampling_params, list(new.block_ids),
                new.num_computed_tokens, new.history_scope)
            seed = new.sampling_params.seed
            if seed is not None and new.request_id not in self.generators:
                try:
                    g = torch.Generator(device=self.device)
                    g.manual_seed(seed)
                except Exception as exc:  # noqa: BLE001 - its own value: it alone fails
                    failed[new.request_id] = f"seed {seed} was refused by the generator: {exc}"
                    continue
                self.generators[new.request_id] = g
        for cached in sched.cached_requests:
            st = self.states[cached.request_id]
            st.block_ids.extend(cached.new_block_ids)
            st.num_computed_tokens = cached.num_computed_tokens

    def shutdown(self) -> None:
        """Release what outlives the runner (nothing here; the tensor-parallel runner's workers)."""

    def _swap(self, sched: SchedulerOutput) -> None:
        swap_blocks(self.kv_caches, self.host_kv_caches, sched.swap_out, sched.swap_in)

    def _forward(self, batch: FlatBatch) -> torch.Tensor:
        """The model over the flat batch (its hidden states, ``[T, H]``); the tensor-parallel
        runner first hands the same batch to the other ranks."""
        return self.model(batch.input_ids, batch.positions, self.kv_caches, batch.attn)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        failed: dict[str, str] = {}
        self._swap(sched)
        self._update_states(sched, failed)
        if sched.total_num_scheduled_tokens == 0:
            return ModelRunnerOutput([], [], failed=failed)
        stage_drafts(sched, self.states)
        batch = build_flat_batch(sched, self.states, self.block_size, self.device,
                                 self.scratch_block)
        hidden = self._forward(batch)                                          # [T, H]
        for rid, n in sched.num_scheduled_tokens.items():
            self.states[rid].num_computed_tokens += n
        if batch.logits_indices.numel() == 0:
            return ModelRunnerOutput([], [], failed=failed)
        logits = self.model.compute_logits(hidden[batch.logits_indices])       # [N + D + P, V]
        if not batch.sample_request_ids:
            return ModelRunnerOutput([], [], failed=failed)
        num_rows = batch.logits_indices.numel() - len(batch.pad_logits)
        if sched.scheduled_spec_tokens:
            out = verify_step(self, logits[:num_rows], batch.sample_request_ids, sched, failed)
        else:
            out = self._sample(logits[:num_rows], batch.sample_request_ids, sched.grammar, failed)
        if self.proposer is not None:
            propose_drafts(self, sched, out)
        return out

    def _sample(self, logits: torch.Tensor, request_ids: list[str],
                grammar: GrammarBitmask | None, failed: dict[str, str]) -> ModelRunnerOutput:
        greedy = all(_plain_greedy(self.states[rid]) for rid in request_ids)
        out = sample_isolated(logits, request_ids,
                              lambda rows, ids: self._sample_batch(rows, ids, grammar), failed,
                              greedy=greedy, fused=self.fused_rows)
        for rid, token in zip(out.request_ids, out.sampled_token_ids):
            self.states[rid].token_ids.append(token)
        return out

    def _sample_batch(self, logits: torch.Tensor, request_ids: list[str],
                      grammar: GrammarBitmask | None):
        """(tokens, logprobs, top logprobs) of rows ``logits`` ``[n, vocab]``; no state changes."""
        states = [self.states[rid] for rid in request_ids]
        md = SamplingMetadata.build(
            [s.sampling_params for s in states], [s.prompt_token_ids for s in states],
            [s.output_token_ids for s in states], [self.generators.get(rid) for rid in request_ids],
            self.eos_token_ids, self.vocab_size, logits.device,
            grammar_mask(grammar, request_ids, logits.device))
        out = self.sampler(logits, md)
        return out.sampled_token_ids, out.logprobs, out.top_logprobs


def _plain_greedy(st: CachedRequestState) -> bool:
    return is_plain_greedy(st.sampling_params, len(st.token_ids) - st.num_prompt_tokens)


