"""The offline API: ``LLM(model=...).generate(prompts, sampling_params)``.

Mirrors vLLM's ``LLM`` so scripts written for it run unchanged: one params object for all prompts
or one per prompt; outputs come back in prompt order; a progress bar for many prompts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from tqdm import tqdm

from conveyor.sampling_params import SamplingParams
from conveyor.engine.llm_engine import LLMEngine
from conveyor.engine.outputs import RequestOutput


class LLM:
    """An engine plus a run-to-completion loop.

    Keyword arguments are the engine's config fields (``conveyor.config``: dtype, device,
    attention_backend, max_model_len, block_size, num_blocks, kv_cache_bytes,
    max_num_batched_tokens, max_num_seqs, enable_chunked_prefill, seed, ...), vLLM's names; ``speculative_config``: JSON text, a dict
    or a ``SpeculativeConfig``; ``kv_events_config`` likewise (``conveyor.kv_events``).
    """

    def __init__(self, model: str | None = None, **kwargs):
        self.engine = LLMEngine.from_kwargs(model=model, **kwargs)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (False while a request holds KV blocks; none does between
        ``generate`` calls)."""
        return self.engine.reset_prefix_cache()

    def close(self) -> None:
        """Release what the engine started beside it (``LLMEngine.shutdown``: the KV-event
        publisher, tensor-parallel workers); the LLM cannot generate afterwards."""
        self.engine.shutdown()

    def generate(self, prompts: str | Sequence[str] | Sequence[list[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion together (continuous batching); outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.engine.add_request(prompt, p))
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm and len(ids) > 1)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        ids = [self.engine.tokenizer.encode_chat(c) for c in convs]
        return self.generate(ids, sampling_params, use_tqdm)

    def _run(self, ids: list[str], show_progress: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="requests", unit="req", disable=not show_progress)
        while self.engine.has_unfinished_requests():
            steps = self.engine.stats().num_steps
            outputs = self.engine.step()
            if self.engine.stats().num_steps == steps:
                time.sleep(0.001)       # nothing ran: a static/dynamic batch waits to launch
            for out in outputs:
                if out.finished:
                    final[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [final[rid] for rid in ids]
