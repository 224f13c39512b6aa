"""Composes what one ``LLMEngine`` runs on, from an ``EngineConfig``: the model and its
tokenizer, the KV cache (its size in blocks and the context it allows), the model runner, and,
for swap preemption, the host pool with its cost model. ``LLMEngine`` builds its ``EngineCore``
on top of the ``EngineParts`` returned here and does nothing heavy itself.

Seeds no process-wide RNG: the runner's own generator is seeded with ``ModelConfig.seed``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from conveyor import platform
from conveyor.config import EngineConfig
from conveyor.core.swap import PreemptionCosts, SwapManager
from conveyor.errors import ConfigError
from conveyor.models.packed import num_parameters
from conveyor.runner.model_runner import ModelRunner, allocate_kv_caches
from conveyor.tokenizer import load_tokenizer
from conveyor.weights.loader import build_model, resolve_model_path

logger = logging.getLogger("conveyor")

_DEFAULT_KV_CAP_BYTES = 4 << 30


@dataclass(slots=True)
class EngineParts:
    """Everything an ``EngineCore`` and its front end need, built and sized."""

    model_path: str
    device: torch.device
    dtype: torch.dtype
    attention_backend: str
    tokenizer: Any
    model: Any
    eos_token_ids: frozenset[int]
    num_blocks: int
    max_model_len: int
    runner: ModelRunner
    swap: SwapManager | None


def build_engine_parts(config: EngineConfig) -> EngineParts:
    """Load the model and tokenizer, size and allocate the KV cache, build the runner."""
    mc, bs = config.model, config.cache.block_size
    attention_backend = mc.attention_backend
    model_path = resolve_model_path(mc.model)
    device = platform.resolve_device(mc.device)
    dtype = platform.resolve_dtype(mc.dtype, device)
    tokenizer = load_tokenizer(model_path, mc.chat_template)
    if attention_backend == "auto":
        from conveyor.attention.select import default_backend
        attention_backend = default_backend(device)
    tp = config.parallel.tensor_parallel_size
    model = build_model(model_path, dtype, device, attention_backend, mc.quantization,
                        tp_rank=0, tp_size=tp)
    attention_backend = model.dispatch.attention_backend
    arch = model.config
    eos_token_ids = tokenizer.eos_token_ids | arch.eos_token_ids
    num_blocks = num_kv_blocks(config, arch, dtype, device)
    max_model_len = min(mc.max_model_len or arch.max_position_embeddings,
                        arch.max_position_embeddings, num_blocks * bs)
    kv = allocate_kv_caches(model, num_blocks, bs, dtype, device)
    swap, host_kv = _swap_manager(config, model, dtype)
    proposer = _proposer(config, model, dtype, device, attention_backend, num_blocks)
    args = (model, kv, bs, eos_token_ids, device, mc.seed, host_kv, proposer)
    if tp == 1:
        runner = ModelRunner(*args)
    else:
        runner = _tp_runner(config, args, model_path, attention_backend, dtype, num_blocks)
    logger.info("model %s (%s) on %s, dtype %s%s, attention %s%s; %s", model_path,
                arch.architecture, device, dtype,
                f", {mc.quantization} GEMMs" if mc.quantization else "", attention_backend,
                f", tensor parallel over {tp} ranks" if tp > 1 else "", platform.describe(device))
    return EngineParts(model_path, device, dtype, attention_backend, tokenizer, model,
                       eos_token_ids, num_blocks, max_model_len, runner, swap)


def _tp_runner(config: EngineConfig, args: tuple, model_path: str, attention_backend: str,
               dtype: torch.dtype, num_blocks: int) -> ModelRunner:
    """Rank 0's runner: start ranks 1..N-1 (each loads its shard), join them, shard the
    row-parallel layers of rank 0's model (``args[0]``, already loaded as shard 0)."""
    from conveyor.distributed.group import TPWorkerGroup, default_num_threads
    from conveyor.distributed.runner import TPModelRunner
    from conveyor.distributed.worker import WorkerSpec
    from conveyor.models.parallel import parallelize
    mc, tp, device, host_kv = config.model, config.parallel.tensor_parallel_size, args[4], args[6]
    spec = WorkerSpec(model_path, str(dtype).removeprefix("torch."), str(device),
                      attention_backend, mc.quantization, tp, num_blocks,
                      config.cache.block_size, host_kv[0].shape[1] if host_kv else None,
                      default_num_threads(tp))
    workers = TPWorkerGroup.start(spec)
    parallelize(args[0], workers.comm)
    return TPModelRunner(*args, workers=workers)


def _proposer(config: EngineConfig, model, dtype: torch.dtype, device: torch.device,
              attention_backend: str, num_blocks: int):
    """Speculative decoding's draft proposer, or None when it is off."""
    spec = config.speculative
    if spec is None:
        return None
    from conveyor.spec_decode import build_proposer

    def draft_model():
        from conveyor.spec_decode.draft_model import DraftModelProposer
        return DraftModelProposer.load(spec.model, model.config.vocab_size, dtype, device,
                                       attention_backend, num_blocks, config.cache.block_size)
    return build_proposer(spec, draft_model)


def num_kv_blocks(config: EngineConfig, arch, dtype: torch.dtype, device: torch.device) -> int:
    """KV blocks to allocate: ``num_blocks``, else ``kv_cache_bytes`` worth, else enough for
    ``max_num_seqs`` full-length sequences capped at 4 GiB."""
    cc, bs = config.cache, config.cache.block_size
    per_block = arch.kv_bytes_per_token(torch.finfo(dtype).bits // 8) * bs
    if cc.num_blocks is not None:
        return _check_fits(cc.num_blocks, per_block, device, "--num-blocks")
    if cc.kv_cache_bytes is not None:
        n = cc.kv_cache_bytes // per_block
        if n < 1:
            raise ConfigError(
                f"kv_cache_bytes={cc.kv_cache_bytes} holds no block ({per_block} bytes each)",
                "kv_cache_bytes")
        return _check_fits(n, per_block, device, "--kv-cache-bytes")
    want_len = config.model.max_model_len or arch.max_position_embeddings
    want = config.scheduler.max_num_seqs * -(-want_len // bs)
    return max(1, min(want, _DEFAULT_KV_CAP_BYTES // per_block))


def _swap_manager(config: EngineConfig, model, dtype: torch.dtype):
    """Host pool and cost model for swap preemption (None when preempting by recompute)."""
    cc = config.cache
    if cc.preemption_mode == "recompute" or config.scheduler.batching != "continuous":
        return None, None
    block_bytes = model.config.kv_bytes_per_token(torch.finfo(dtype).bits // 8) * cc.block_size
    num_host = _check_fits(max(1, cc.swap_space_bytes // block_bytes), block_bytes,
                           torch.device("cpu"), "--swap-space-bytes")
    params = num_parameters(model)
    # Rough, deliberately simple: ~100 GFLOP/s of GEMM, ~5 GB/s of copy bandwidth each way.
    costs = PreemptionCosts(recompute_s_per_token=2 * params / 100e9,
                            swap_s_per_block=2 * block_bytes / 5e9)
    host_kv = allocate_kv_caches(model, num_host - 1, cc.block_size, dtype, torch.device("cpu"))
    return SwapManager(num_host, cc.preemption_mode, costs), host_kv


def _check_fits(num_blocks: int, block_bytes: int, device: torch.device, flag: str) -> int:
    """``num_blocks``, or ``ConfigError`` when they need more memory than ``device`` has."""
    have = platform.memory_bytes(device)
    if have is not None and num_blocks * block_bytes > have:
        raise ConfigError(f"{flag}: {num_blocks} KV blocks need {num_blocks * block_bytes} bytes "
                          f"but {device} has {have}; ask for less")
    return num_blocks
