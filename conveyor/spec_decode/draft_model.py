"""Draft-model proposals: a smaller model with the same vocabulary proposes ``k`` tokens.

The draft model has its own paged KV cache (same block size, its own block free list) and its own
view of each request: the tokens its KV was computed for. Before proposing it rolls that view back
to the longest common prefix with the request's committed tokens (rejected drafts are simply
recomputed over), computes the rest in one catch-up chunk, then runs ``k - 1`` single-token steps
batched over the requests. A request the draft KV pool cannot hold gets no proposal (drafts are
optional); its draft state is dropped on finish or preemption.

Greedy requests get the draft's argmax (a point mass ``q``). A request that samples gets drafts
sampled from the draft's *processed* distribution ``q``: its SamplingParams applied to the draft
logits as the Sampler applies them to the target's (penalties and min_tokens bans over its
output plus the drafts before, temperature, top-k, top-p, min-p; no grammar mask, which only
makes ``q`` put mass where ``p`` has none). Each draft comes with its ``q`` row so the verifier
can accept it with probability ``min(1, p/q)``. A seeded request draws from its own draft
generator, seeded from a value derived from its seed (never the target's stream, kept across
preemption); unseeded requests draw from the runner's default generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from conveyor.core.outputs import SchedulerOutput
from conveyor.errors import ConfigError
from conveyor.runner.input_batch import CachedRequestState, build_flat_batch
from conveyor.sampling.metadata import SamplingMetadata
from conveyor.sampling.sampler import processed_logits, sampling_probs
from conveyor.sampling_params import SamplingParams

_GREEDY = SamplingParams(temperature=0.0)
_SEED_OFFSET = 0x9E3779B97F4A7C15     # draft stream != target stream for the same seed


@dataclass(slots=True, frozen=True)
class DraftSampling:
    """What sampled drafts need to know of a request that samples (not greedy)."""

    params: SamplingParams
    num_prompt_tokens: int


def draft_seed(seed: int) -> int:
    """The draft generator's seed for a request seeded with ``seed`` (a uint64)."""
    return (seed + _SEED_OFFSET) % (1 << 64)


class DraftModelProposer:
    """Drafts from a second model with its own KV cache: argmax for greedy requests, sampled
    from the processed draft distribution (with its probabilities) for the others."""

    def __init__(self, model, kv_caches: list[torch.Tensor], block_size: int,
                 device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.vocab_size = model.config.vocab_size
        self.scratch_block = kv_caches[0].shape[1] - 1
        self.free_blocks = list(range(self.scratch_block))
        self.states: dict[str, CachedRequestState] = {}
        self.generators: dict[str, torch.Generator] = {}    # seeded requests' draft streams

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
        if finished:
            self.generators.pop(request_id, None)

    def propose(self, requests: dict[str, tuple[list[int], int]],
                scopes: dict[str, str] | None = None) -> dict[str, list[int]]:
        """Greedy drafts for every request (the ``Proposer`` interface)."""
        return self.propose_sampled(requests, {}, frozenset(), None)[0]

    @torch.inference_mode()
    def propose_sampled(self, requests: dict[str, tuple[list[int], int]],
                        sampling: dict[str, DraftSampling], eos_token_ids: frozenset[int],
                        default_generator: torch.Generator | None
                        ) -> tuple[dict[str, list[int]], dict[str, torch.Tensor]]:
        """(request id -> drafts, request id -> their ``q`` rows ``[len(drafts), vocab]``).

        ``requests`` as for ``propose``; requests in ``sampling`` get sampled drafts (and ``q``
        rows, float32 on the device), the others argmax drafts (no rows). Requests without a
        proposal are absent from both."""
        todo = {rid: k for rid, (tokens, k) in requests.items()
                if self._sync(rid, tokens, k, sampling.get(rid))}
        drafts: dict[str, list[int]] = {rid: [] for rid in todo}
        rows: dict[str, list[torch.Tensor]] = {rid: [] for rid in todo if rid in sampling}
        chunk = {rid: len(self.states[rid].token_ids) - self.states[rid].num_computed_tokens
                 for rid in todo}
        while chunk:
            logits = self._step(chunk)  # [len(chunk), vocab]
            tokens = self._pick(list(chunk), logits, rows, eos_token_ids, default_generator)
            for rid, token in zip(chunk, tokens):
                drafts[rid].append(token)
                self.states[rid].token_ids.append(token)
            chunk = {rid: 1 for rid in chunk if len(drafts[rid]) < todo[rid]}
        return ({rid: d for rid, d in drafts.items() if d},
                {rid: torch.stack(r) for rid, r in rows.items() if r})

    def _sync(self, rid: str, tokens: list[int], k: int, sampling: DraftSampling | None) -> bool:
        """Roll the draft's view back to its common prefix with ``tokens`` and make room for
        ``k`` drafts; False (nothing held) when the pool cannot."""
        st = self.states.get(rid)
        if st is None:
            st = self.states[rid] = CachedRequestState(rid, [], 0, _GREEDY, [], 0)
        if sampling is not None:
            st.sampling_params, st.num_prompt_tokens = sampling.params, sampling.num_prompt_tokens
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

    def _step(self, num_tokens: dict[str, int]) -> torch.Tensor:
        """One forward over ``num_tokens`` per request; the logits after each request's last."""
        sched = SchedulerOutput([], [], dict(num_tokens), sum(num_tokens.values()), set(), set())
        batch = build_flat_batch(sched, self.states, self.block_size, self.device,
                                 self.scratch_block)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.attn)
        for rid, n in num_tokens.items():
            self.states[rid].num_computed_tokens += n
        return self.model.compute_logits(hidden[batch.logits_indices])  # [N, V]

    def _pick(self, request_ids: list[str], logits: torch.Tensor,
              rows: dict[str, list[torch.Tensor]], eos_token_ids: frozenset[int],
              default_generator: torch.Generator | None) -> list[int]:
        """Each request's next draft from its logits row ``logits`` ``[N, vocab]``: the argmax,
        or for requests in ``rows`` a sample of its processed ``q`` (appended to ``rows``)."""
        tokens = logits.argmax(dim=-1)  # [N]
        sampled = [i for i, rid in enumerate(request_ids) if rid in rows]
        if not sampled:
            return tokens.tolist()
        states = [self.states[request_ids[i]] for i in sampled]
        md = SamplingMetadata.build(
            [st.sampling_params for st in states], [st.prompt_token_ids for st in states],
            [st.output_token_ids for st in states], [None] * len(states), eos_token_ids,
            self.vocab_size, logits.device)
        idx = torch.tensor(sampled, device=logits.device)
        q = sampling_probs(processed_logits(logits[idx], md), md)  # [S, vocab] float32
        noise = self._exponentials(states, default_generator)  # [S, vocab]
        tokens[idx] = (q / noise).argmax(dim=-1)  # the exponential race: a sample of q
        for st, row in zip(states, q):
            rows[st.request_id].append(row)
        return tokens.tolist()

    def _exponentials(self, states: list[CachedRequestState],
                      default_generator: torch.Generator | None) -> torch.Tensor:
        """Exp(1) noise ``[S, vocab]``, a seeded request's row from its own draft generator."""
        noise = torch.empty(len(states), self.vocab_size, device=self.device)  # [S, vocab]
        shared = [i for i, st in enumerate(states) if st.sampling_params.seed is None]
        if shared:
            idx = torch.tensor(shared, device=self.device)
            noise[idx] = torch.empty(len(shared), self.vocab_size, device=self.device
                                     ).exponential_(generator=default_generator)
        for i, st in enumerate(states):
            seed = st.sampling_params.seed
            if seed is None:
                continue
            g = self.generators.get(st.request_id)
            if g is None:
                g = self.generators[st.request_id] = torch.Generator(device=self.device)
                g.manual_seed(draft_seed(seed))
            noise[i].exponential_(generator=g)
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)
