"""``LLMEngine``: text in, text out, one step at a time, around an ``EngineCore``.

Builds the model, KV cache and runner from an ``EngineConfig``; validates and tokenizes requests;
turns the core's token deltas into ``RequestOutput`` objects (incremental detokenization, stop
strings, logprobs). A stop string finishes its request in the core within the same step, so its
KV blocks return to the pool before the next schedule.
"""

from __future__ import annotations

import itertools
import logging
import time

import torch

from conveyor import platform
from conveyor.config import (CacheConfig, EngineConfig, ModelConfig, SchedulerConfig,
                             SpeculativeConfig)
from conveyor.core.engine_core import EngineCore
from conveyor.core.request import FinishReason, Request
from conveyor.core.swap import PreemptionCosts, SwapManager
from conveyor.errors import InvalidRequestError
from conveyor.models.packed import num_parameters
from conveyor.runner.model_runner import ModelRunner, allocate_kv_caches
from conveyor.sampling_params import SamplingParams
from conveyor.serving.output_processor import OutputProcessor
from conveyor.serving.request_checks import (check_request_args, prompt_to_ids,
                                             resolve_max_tokens)
from conveyor.structured.manager import StructuredOutputManager
from conveyor.serving.outputs import RequestOutput
from conveyor.tokenizer import load_tokenizer
from conveyor.weights.loader import build_model, resolve_model_path

logger = logging.getLogger("conveyor")

_DEFAULT_KV_CAP_BYTES = 4 << 30


def engine_config_from_kwargs(**kw) -> EngineConfig:
    """Flat vLLM-style keyword arguments -> grouped frozen configs."""
    model_keys = {"model", "dtype", "device", "max_model_len", "seed", "quantization"}
    cache_keys = {"block_size", "num_blocks", "kv_cache_bytes", "kv_allocation",
                  "enable_prefix_caching", "prefix_cache_scope", "preemption_mode",
                  "swap_space_bytes"}
    sched_keys = {"max_num_batched_tokens", "max_num_seqs", "enable_chunked_prefill", "batching",
                  "batch_timeout_s", "fair_scheduling", "tenant_weights"}
    unknown = set(kw) - model_keys - cache_keys - sched_keys - {"speculative_config"}
    if unknown:
        raise InvalidRequestError(f"unknown engine option(s): {sorted(unknown)}")
    pick = lambda keys: {k: v for k, v in kw.items() if k in keys and v is not None}  # noqa: E731
    return EngineConfig(ModelConfig(**pick(model_keys)), CacheConfig(**pick(cache_keys)),
                        SchedulerConfig(**pick(sched_keys)),
                        SpeculativeConfig.from_json(kw.get("speculative_config")))


class LLMEngine:
    """Synchronous engine: ``add_request`` then call ``step`` until ``has_unfinished_requests`` is False."""

    def __init__(self, config: EngineConfig, attention_backend: str = "auto",
                 record_steps: bool = False):
        self.config = config
        mc = config.model
        self.model_path = resolve_model_path(mc.model)
        self.device = platform.resolve_device(mc.device)
        self.dtype = platform.resolve_dtype(mc.dtype, self.device)
        torch.manual_seed(mc.seed)
        self.tokenizer = load_tokenizer(self.model_path)
        if attention_backend == "auto":
            from conveyor.attention.select import default_backend
            attention_backend = default_backend(self.device)
        self.attention_backend = attention_backend
        self.model = build_model(self.model_path, self.dtype, self.device, attention_backend,
                                 mc.quantization)
        arch = self.model.config
        self.eos_token_ids = self.tokenizer.eos_token_ids | arch.eos_token_ids
        num_blocks = self._num_kv_blocks(arch)
        bs = config.cache.block_size
        self.max_model_len = min(mc.max_model_len or arch.max_position_embeddings,
                                 arch.max_position_embeddings, num_blocks * bs)
        kv = allocate_kv_caches(self.model, num_blocks, bs, self.dtype, self.device)
        swap, host_kv = self._swap_manager(arch)
        self.runner = ModelRunner(self.model, kv, bs, self.eos_token_ids, self.device, mc.seed,
                                  host_kv, self._proposer(num_blocks))
        self.core = EngineCore(self.runner, config.scheduler, num_blocks, bs, self.max_model_len,
                               kv_allocation=config.cache.kv_allocation, record_steps=record_steps,
                               enable_prefix_caching=config.cache.enable_prefix_caching
                               and config.scheduler.batching == "continuous", swap=swap,
                               isolate_tenants=config.cache.prefix_cache_scope == "tenant",
                               speculative=config.speculative)
        self.output_processor = OutputProcessor(self.tokenizer, self.core)
        self.structured = StructuredOutputManager(self.tokenizer.hf, arch.vocab_size,
                                                  self.eos_token_ids)
        self._ids = itertools.count()
        logger.info("model %s (%s) on %s, dtype %s%s, attention %s; %s", self.model_path,
                    arch.architecture, self.device, self.dtype,
                    f", {mc.quantization} GEMMs" if mc.quantization else "", attention_backend,
                    platform.describe(self.device))
        logger.info("KV cache: %d blocks x %d tokens = %d tokens; max_model_len %d; "
                    "max_num_seqs %d; max_num_batched_tokens %d", num_blocks, bs, num_blocks * bs,
                    self.max_model_len, config.scheduler.max_num_seqs,
                    config.scheduler.max_num_batched_tokens)

    @classmethod
    def from_kwargs(cls, attention_backend: str = "auto", record_steps: bool = False,
                    **kwargs) -> "LLMEngine":
        return cls(engine_config_from_kwargs(**kwargs), attention_backend, record_steps)

    def _num_kv_blocks(self, arch) -> int:
        cc, bs = self.config.cache, self.config.cache.block_size
        per_block = arch.kv_bytes_per_token(torch.finfo(self.dtype).bits // 8) * bs
        if cc.num_blocks is not None:
            return cc.num_blocks
        if cc.kv_cache_bytes is not None:
            n = cc.kv_cache_bytes // per_block
            if n < 1:
                raise InvalidRequestError(
                    f"kv_cache_bytes={cc.kv_cache_bytes} holds no block ({per_block} bytes each)")
            return n
        want_len = self.config.model.max_model_len or arch.max_position_embeddings
        want = self.config.scheduler.max_num_seqs * -(-want_len // bs)
        return max(1, min(want, _DEFAULT_KV_CAP_BYTES // per_block))

    def _proposer(self, num_blocks: int):
        """Speculative decoding's draft proposer, or None when it is off."""
        spec = self.config.speculative
        if spec is None:
            return None
        from conveyor.spec_decode import build_proposer

        def draft_model():
            from conveyor.spec_decode.draft_model import DraftModelProposer
            return DraftModelProposer.load(spec.model, self.model.config.vocab_size, self.dtype,
                                           self.device, self.attention_backend, num_blocks,
                                           self.config.cache.block_size)
        return build_proposer(spec, draft_model)

    def _swap_manager(self, arch):
        """Host pool and cost model for swap preemption (None when preempting by recompute)."""
        cc = self.config.cache
        if cc.preemption_mode == "recompute" or self.config.scheduler.batching != "continuous":
            return None, None
        elem = torch.finfo(self.dtype).bits // 8
        block_bytes = arch.kv_bytes_per_token(elem) * cc.block_size
        num_host = max(1, cc.swap_space_bytes // block_bytes)
        params = num_parameters(self.model)
        # Rough, deliberately simple: ~100 GFLOP/s of GEMM, ~5 GB/s of copy bandwidth each way.
        costs = PreemptionCosts(recompute_s_per_token=2 * params / 100e9,
                                swap_s_per_block=2 * block_bytes / 5e9)
        host_kv = allocate_kv_caches(self.model, num_host - 1, cc.block_size, self.dtype,
                                     torch.device("cpu"))
        return SwapManager(num_host, cc.preemption_mode, costs), host_kv

    @property
    def num_kv_blocks(self) -> int:
        return self.core.kv_manager.pool.num_blocks

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
        self.output_processor.add(request_id, prompt_text, prompt_ids, params, children)
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
        self.core.abort_requests(child_ids, FinishReason.ABORT)
        return self.output_processor.finish_aborted(child_ids)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """One engine iteration; returns outputs of requests that progressed or finished."""
        core_outputs = self.core.step()
        return self.output_processor.process(core_outputs)

    def check_invariants(self) -> None:
        self.core.check_invariants()


def _replace_seed(params: SamplingParams, seed: int) -> SamplingParams:
    """A child's own params: one sequence with its own seed (the parent checked seed + n - 1)."""
    import dataclasses
    return dataclasses.replace(params, seed=seed, n=1)
