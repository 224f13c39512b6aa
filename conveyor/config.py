"""Frozen, validated configuration, one dataclass per concern.

Nothing writes back into a config after construction: values derived at start-up (the number of
KV blocks once the model's size is known, the resolved dtype) live in the objects that derive them.
Invalid values raise ``InvalidRequestError`` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.errors import InvalidRequestError

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = (None, "int8")
BATCHING_POLICIES = ("continuous", "static", "dynamic")
KV_ALLOCATIONS = ("paged", "reservation")
PREFIX_CACHE_SCOPES = ("tenant", "global")
# How long a partial batch waits before launching: static batching waits for a full batch,
# dynamic batching launches after a short window.
DEFAULT_BATCH_TIMEOUT_S = {"static": 30.0, "dynamic": 0.05, "continuous": 0.0}


def _require(cond: bool, message: str, field: str) -> None:
    if not cond:
        raise InvalidRequestError(message, field)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Which checkpoint to run and how.

    model: an HF model directory, a .gguf file, or None for the default SmolLM2 GGUF.
    dtype: "auto" resolves per device in ``conveyor.platform`` (bf16 where the CPU has native bf16).
    max_model_len: context limit in tokens; None takes the checkpoint's (capped by KV capacity).
    quantization: None, or "int8" (CPU: int8 layer GEMMs with per-token activation scales; in
        float32 or bfloat16; the CPU must have VNNI, which ``models/int8.check_supported`` checks
        at start since it depends on the machine).
    """

    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    quantization: str | None = None

    def __post_init__(self) -> None:
        _require(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}", "dtype")
        _require(self.quantization in QUANTIZATIONS,
                 f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}",
                 "quantization")
        _require(self.quantization != "int8" or self.dtype != "float16",
                 "--quantization int8 computes in float32 or bfloat16, not float16; use --dtype "
                 "auto, float32 or bfloat16", "quantization")
        _require(self.max_model_len is None or self.max_model_len > 0,
                 "max_model_len must be a positive integer", "max_model_len")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Paged KV cache sizing: give ``num_blocks`` or ``kv_cache_bytes`` (the first wins).

    With neither, the pool is sized to ``max_num_seqs`` full-length sequences, capped at 4 GiB.
    prefix_cache_scope: "tenant" (a request only hits blocks its own tenant cached) or "global"
    (tenants share cached prefixes, so a hit reveals that another tenant sent the same prefix).
    """

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_bytes: int | None = None
    kv_allocation: str = "paged"
    enable_prefix_caching: bool = True
    prefix_cache_scope: str = "tenant"
    preemption_mode: str = "recompute"
    swap_space_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        _require(self.preemption_mode in ("recompute", "swap", "auto"),
                 "preemption_mode must be recompute, swap or auto", "preemption_mode")
        _require(self.prefix_cache_scope in PREFIX_CACHE_SCOPES,
                 f"prefix_cache_scope must be one of {PREFIX_CACHE_SCOPES}", "prefix_cache_scope")
        _require(self.swap_space_bytes > 0, "swap_space_bytes must be positive", "swap_space_bytes")
        _require(self.kv_allocation in KV_ALLOCATIONS,
                 f"kv_allocation must be one of {KV_ALLOCATIONS}", "kv_allocation")
        _require(self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
                 "block_size must be a positive power of two", "block_size")
        _require(self.num_blocks is None or self.num_blocks > 0,
                 "num_blocks must be positive", "num_blocks")
        _require(self.kv_cache_bytes is None or self.kv_cache_bytes > 0,
                 "kv_cache_bytes must be positive", "kv_cache_bytes")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Token-budget scheduling limits.

    max_num_batched_tokens: tokens (prefill chunks + decodes) computed in one step.
    max_num_seqs: requests running at once (batch slots).
    enable_chunked_prefill: False makes a prompt wait until it fits the budget whole.
    batching: "continuous" (iteration-level), or the "static" / "dynamic" baselines.
    batch_timeout_s: how long a partial static/dynamic batch waits before launching.
    fair_scheduling / tenant_weights: weighted fair queueing of computed tokens across tenants.
    target_itl_ms: the inter-token latency target (an SLO, milliseconds; None = off, the
        default): each step's prefill tokens are chosen so the step's predicted time, from a cost
        model measured on this machine (``core.step_cost``), stays under it; decodes always run
        and a prompt always advances. Needs chunked prefill and continuous batching.
    max_num_partial_prefills: chunks per step that leave their prompt unfinished (vLLM's name).
    max_long_partial_prefills: of those, how many may be for long prompts.
    long_prefill_token_threshold: a prompt with more tokens left than this is long: while other
        prefills wait its chunk is at most this many tokens (0 = no prompt is long).
    """

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    enable_chunked_prefill: bool = True
    batching: str = "continuous"
    batch_timeout_s: float | None = None
    fair_scheduling: bool = False
    tenant_weights: tuple[tuple[str, float], ...] = ()
    target_itl_ms: float | None = None
    max_num_partial_prefills: int = 1
    max_long_partial_prefills: int = 1
    long_prefill_token_threshold: int = 0

    @property
    def tenant_weights_dict(self) -> dict[str, float]:
        return dict(self.tenant_weights)

    @property
    def launch_timeout_s(self) -> float:
        if self.batch_timeout_s is not None:
            return self.batch_timeout_s
        return DEFAULT_BATCH_TIMEOUT_S[self.batching]

    def __post_init__(self) -> None:
        _require(self.batching in BATCHING_POLICIES,
                 f"batching must be one of {BATCHING_POLICIES}, got {self.batching!r}", "batching")
        _require(self.batch_timeout_s is None or self.batch_timeout_s >= 0,
                 "batch_timeout_s must be >= 0", "batch_timeout_s")
        if isinstance(self.tenant_weights, dict):
            object.__setattr__(self, "tenant_weights", tuple(sorted(self.tenant_weights.items())))
        _require(all(w > 0 for _, w in self.tenant_weights), "tenant weights must be > 0",
                 "tenant_weights")
        _require(self.max_num_batched_tokens > 0, "max_num_batched_tokens must be positive",
                 "max_num_batched_tokens")
        _require(self.max_num_seqs > 0, "max_num_seqs must be positive", "max_num_seqs")
        self._check_prefill_budget()

    def _check_prefill_budget(self) -> None:
        ms = self.target_itl_ms
        _require(ms is None or (ms > 0 and ms == ms and ms != float("inf")),
                 "target_itl_ms must be a positive number of milliseconds", "target_itl_ms")
        _require(ms is None or (self.enable_chunked_prefill and self.batching == "continuous"),
                 "target_itl_ms needs chunked prefill and continuous batching (it sizes prefill "
                 "chunks); drop --no-chunked-prefill / --batching or --target-itl-ms",
                 "target_itl_ms")
        _require(self.max_num_partial_prefills >= 1, "max_num_partial_prefills must be >= 1",
                 "max_num_partial_prefills")
        _require(1 <= self.max_long_partial_prefills <= self.max_num_partial_prefills,
                 "max_long_partial_prefills must be between 1 and max_num_partial_prefills",
                 "max_long_partial_prefills")
        _require(self.long_prefill_token_threshold >= 0,
                 "long_prefill_token_threshold must be >= 0", "long_prefill_token_threshold")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything an engine needs, grouped by concern."""

    model: ModelConfig = ModelConfig()
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
