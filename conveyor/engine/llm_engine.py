"""``LLMEngine``: text in, text out, one step at a time, around an ``EngineCore``.

Builds its ``EngineCore`` on what ``builder`` composes from an ``EngineConfig``; validates
(once, here: see ``add_request``) and tokenizes requests;
turns the core's token deltas into ``RequestOutput`` objects (incremental detokenization, stop
strings, logprobs). A stop string finishes its request in the core within the same step, so its
KV blocks return to the pool before the next schedule.
"""

from __future__ import annotations

import itertools
import logging
import time

from conveyor.config import EngineConfig, engine_config_from_kwargs
from conveyor.core.engine_core import EngineCore
from conveyor.core.outputs import StepStats
from conveyor.core.request import FinishReason, Request
from conveyor.core.stats import EngineStats
from conveyor.engine.builder import build_engine_parts
from conveyor.sampling_params import SamplingParams
from conveyor.engine.output_processor import OutputProcessor
from conveyor.engine.request_checks import (check_request_args, prompt_to_ids,
                                             resolve_max_tokens)
from conveyor.structured.manager import StructuredOutputManager
from conveyor.engine.outputs import RequestOutput

logger = logging.getLogger("conveyor")



class LLMEngine:
    """Synchronous engine: ``add_request`` then call ``step`` until ``has_unfinished_requests`` is False."""

    def __init__(self, config: EngineConfig):
        """Build the model, KV cache and runner (``builder``), then the core around them;
        ``config.scheduler.record_steps`` keeps a ``StepStats`` per step in ``step_log``."""
        self.config = config
        parts = build_engine_parts(config)
        self.model_path, self.device, self.dtype = parts.model_path, parts.device, parts.dtype
        self.attention_backend, self.tokenizer = parts.attention_backend, parts.tokenizer
        self.model, self.runner = parts.model, parts.runner
        self.eos_token_ids, self.max_model_len = parts.eos_token_ids, parts.max_model_len
        self.num_kv_blocks = parts.num_blocks
        cc, sc, bs = config.cache, config.scheduler, config.cache.block_size
        kv_events = _kv_event_publisher(config)
        self.kv_event_publisher = kv_events     # None unless --kv-events-config enables it
        self.core = EngineCore(self.runner, sc, parts.num_blocks, bs, self.max_model_len,
                               kv_allocation=cc.kv_allocation, record_steps=sc.record_steps,
                               enable_prefix_caching=cc.enable_prefix_caching
                               and sc.batching == "continuous", swap=parts.swap,
                               isolate_tenants=cc.prefix_cache_scope == "tenant",
                               speculative=config.speculative,
                               record_kv_events=kv_events is not None)
        self.output_processor = OutputProcessor(self.tokenizer, self.core)
        self.structured = StructuredOutputManager(self.tokenizer.hf, self.model.config.vocab_size,
                                                  self.eos_token_ids)
        self._ids = itertools.count()
        self.last_step_stats: StepStats | None = None     # the latest step()'s stats (data)
        logger.info("KV cache: %d blocks x %d tokens = %d tokens; max_model_len %d; "
                    "max_num_seqs %d; max_num_batched_tokens %d", parts.num_blocks, bs,
                    parts.num_blocks * bs, self.max_model_len, sc.max_num_seqs,
                    sc.max_num_batched_tokens)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "LLMEngine":
        """``LLMEngine(engine_config_from_kwargs(**kwargs))``: flat config field names."""
        return cls(engine_config_from_kwargs(**kwargs))

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None, arrival_time: float | None = None,
                    priority: int = 0, tenant: str = "", cache_salt: str = "") -> str:
        """Validate, tokenize and queue a request (n > 1 fans out). Returns its id.

        Every value is checked here, once (``SamplingParams`` at its construction, the rest in
        ``request_checks``): a bad one raises ``InvalidRequestError`` naming the field and
        nothing is queued. What passes cannot make a later step fail.
        """
        params = SamplingParams() if params is None else params
        vocab = self.model.config.vocab_size
        check_request_args(params, vocab, request_id, priority, tenant, cache_salt, arrival_time)
        request_id = request_id if request_id is not None else str(next(self._ids))
        prompt_text, prompt_ids = prompt_to_ids(prompt, self.tokenizer, vocab)
        max_tokens = resolve_max_tokens(len(prompt_ids), params, self.max_model_len)
        self.core.check_request_fits(len(prompt_ids), max_tokens)
        self.structured.check(params)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        children = []
        for i in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = _replace_seed(params, params.seed + i)
            children.append(Request(
                f"{request_id}#{i}" if params.n > 1 else request_id, prompt_ids, child_params,
                max_tokens, self.eos_token_ids, arrival, priority, tenant, cache_salt,
                structured=self.structured.request_state(child_params, self.core.clock())))
        self.output_processor.add(request_id, prompt_text, prompt_ids, params,
                                  [c.request_id for c in children], arrival)
        try:
            for child in children:
                self.core.add_request(child)
        except Exception:
            self.abort_request(request_id)
            raise
        return request_id

    def abort_request(self, request_id: str) -> list[RequestOutput]:
        """Abort a request (all its children) in any state; KV blocks are freed now."""
        child_ids = self.output_processor.child_ids(request_id)
        finished = self.core.finish_requests(child_ids, FinishReason.ABORT)
        return self.output_processor.finish_aborted(child_ids, finished)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """One engine iteration; returns outputs of requests that progressed or finished."""
        core_outputs = self.core.step()
        self.last_step_stats = core_outputs.stats
        if self.kv_event_publisher is not None:
            self._publish_kv_events()
        return self.output_processor.process(core_outputs)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (vLLM's ``reset_prefix_cache``); refused (False, nothing
        changes) while any request holds KV blocks. Publishes ``AllBlocksCleared`` when it
        reset."""
        done = self.core.reset_prefix_cache()
        if self.kv_event_publisher is not None:
            self._publish_kv_events()
        return done

    def _publish_kv_events(self) -> None:
        events = self.core.take_kv_events()
        if events:
            self.kv_event_publisher.publish(events)

    def cache_config_info(self) -> dict[str, str]:
        """The KV cache's config as vLLM's ``cache_config_info`` labels (names vLLM's, values
        conveyor's: ``num_gpu_blocks`` is the KV pool whatever the device, ``num_cpu_blocks``
        the host swap pool)."""
        cc, swap = self.config.cache, getattr(self.core.scheduler, "swap", None)
        return {"block_size": str(cc.block_size), "cache_dtype": "auto",
                "enable_prefix_caching": str(self.core.kv_manager.enable_prefix_caching),
                "num_gpu_blocks": str(self.num_kv_blocks),
                "num_cpu_blocks": str(swap.pool.num_blocks) if swap is not None else "None",
                "swap_space_bytes": str(cc.swap_space_bytes),
                "prefix_caching_hash_algo": "blake2b_keyed"}

    def stats(self) -> EngineStats:
        """Scheduler and KV-cache occupancy now, and the cumulative counters (typed, data)."""
        return self.core.stats()

    @property
    def step_log(self) -> list[StepStats] | None:
        """A ``StepStats`` per step that ran, oldest first (None unless ``record_steps``)."""
        return self.core.step_log

    def check_invariants(self) -> None:
        self.core.check_invariants()

    def shutdown(self) -> None:
        """Release what the engine started beside it: the KV-event publisher (queued events are
        sent first) and the tensor-parallel workers; idempotent. The engine cannot step
        afterwards. Without it the workers are stopped at interpreter exit."""
        if self.kv_event_publisher is not None:
            self.kv_event_publisher.close()
            self.kv_event_publisher = None
        self.runner.shutdown()


def _kv_event_publisher(config: EngineConfig):
    """The ZMQ publisher ``config.kv_events`` asks for, or None (not enabled, or "null")."""
    if config.kv_events is None or not config.kv_events.is_enabled:
        return None
    from conveyor.kv_events.publisher import ZmqEventPublisher
    return ZmqEventPublisher(config.kv_events)


def _replace_seed(params: SamplingParams, seed: int) -> SamplingParams:
    """A child's own params: one sequence with its own seed (the parent checked seed + n - 1)."""
    import dataclasses
    return dataclasses.replace(params, seed=seed, n=1)
