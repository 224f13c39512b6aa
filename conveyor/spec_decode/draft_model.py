"""Draft-model proposals: a smaller model with the same vocabulary proposes ``k`` tokens.

The draft model has its own paged KV cache (same block size, its own block free list) and its own
view of each request: the tokens its KV was computed for. Before proposing it rolls that view back
to the longest common prefix with the request's committed tokens (rejected drafts are simply
recomputed over), computes the rest in one catch-up chunk, then runs ``k - 1`` single-token steps
batched over the requests. Proposals are the draft's argmax, so the draft distribution ``q`` is a
point mass and the verifier's rule is exact rejection sampling for it. A request the draft KV pool
cannot hold gets no proposal (drafts are optional); its draft state is dropped on finish or
preemption.
"""

from __future__ import annotations

import torch

from conveyor.core.outputs import SchedulerOutput
from conveyor.errors import ConfigError
from conveyor.runner.input_batch import CachedRequestState, build_flat_batch
from conveyor.sampling_params import SamplingParams

_GREEDY = SamplingParams(temperature=0.0)


class DraftModelProposer:
    """Greedy drafts from a second model with its own KV cache."""

    def __init__(self, model, kv_caches: list[torch.Tensor], block_size: int,
                 device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.scratch_block = kv_caches[0].shape[1] - 1
        self.free_blocks = list(range(self.scratch_block))
        self.states: dict[str, CachedRequestState] = {}

    @classmethod
    def load(cls, path: str, vocab_size: int, dtype: torch.dtype, device: torch.device,
             attention_backend: str, num_blocks: int, block_size: int) -> "DraftModelProposer":
        """Build the draft from ``path``; raises if its vocabulary differs from the target's."""
        from conveyor.runner.model_runner import allocate_kv_caches
        from conveyor.weights.loader import build_model, resolve_model_path
        model = build_model(resolve_model_path(path), dtype, device, attention_backend)
        if model.config.vocab_size != vocab_size:
            raise ConfigError(
                f"the draft model's vocabulary ({model.config.vocab_size}) differs from the "
                f"target's ({vocab_size}); use a draft with the same tokenizer", "model")
        kv = allocate_kv_caches(model, num_blocks, block_size, dtype, device)
        return cls(model, kv, block_size, device)

    def drop(self, request_id: str, finished: bool) -> None:
        st = self.states.pop(request_id, None)
        if st is not None:
            self.free_blocks += st.block_ids

    @torch.inference_mode()
    def propose(self, requests: dict[str, tuple[list[int], int]],
                scopes: dict[str, str] | None = None) -> dict[str, list[int]]:
        todo = {rid: k for rid, (tokens, k) in requests.items() if self._sync(rid, tokens, k)}
        drafts: dict[str, list[int]] = {rid: [] for rid in todo}
        chunk = {rid: len(self.states[rid].token_ids) - self.states[rid].num_computed_tokens
                 for rid in todo}
        while chunk:
            for rid, token in zip(chunk, self._step(chunk)):
                drafts[rid].append(token)
                self.states[rid].token_ids.append(token)
            chunk = {rid: 1 for rid in chunk if len(drafts[rid]) < todo[rid]}
        return {rid: d for rid, d in drafts.items() if d}

    def _sync(self, rid: str, tokens: list[int], k: int) -> bool:
        """Roll the draft's view back to its common prefix with ``tokens`` and make room for
        ``k`` drafts; False (nothing held) when the pool cannot."""
        st = self.states.get(rid)
        if st is None:
            st = self.states[rid] = CachedRequestState(rid, [], 0, _GREEDY, [], 0)
        common = 0
        limit = min(st.num_computed_tokens, len(tokens), len(st.token_ids))
        while common < limit and st.token_ids[common] == tokens[common]:
            common += 1
        st.token_ids, st.num_computed_tokens = list(tokens), common
        needed = -(-(len(tokens) + k - 1) // self.block_size) - len(st.block_ids)
        if needed > len(self.free_blocks):
            self.drop(rid, finished=False)
            return False
        if needed > 0:
            st.block_ids += self.free_blocks[-needed:]
            del self.free_blocks[-needed:]
        return True

    def _step(self, num_tokens: dict[str, int]) -> list[int]:
        """One forward over ``num_tokens`` per request; the argmax after each request's last."""
        sched = SchedulerOutput([], [], dict(num_tokens), sum(num_tokens.values()), set(), set())
        batch = build_flat_batch(sched, self.states, self.block_size, self.device,
                                 self.scratch_block)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.attn)
        for rid, n in num_tokens.items():
            self.states[rid].num_computed_tokens += n
        logits = self.model.compute_logits(hidden[batch.logits_indices])  # [N, V]
        return logits.argmax(dim=-1).tolist()
