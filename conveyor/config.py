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
    """

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    enable_chunked_prefill: bool = True
    batching: str = "continuous"
    batch_timeout_s: float | None = None
    fair_scheduling: bool = False
    tenant_weights: tuple[tuple[str, float], ...] = ()

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


SPEC_METHODS = ("ngram", "suffix", "draft_model")


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """Speculative decoding (vLLM's ``--speculative-config`` JSON spelling).

    method: "ngram" (prompt lookup over the request's own tokens), "suffix" (a suffix index over
        the request's tokens and, with ``suffix_cross_request``, earlier requests' outputs) or
        "draft_model" (a smaller model with the same vocabulary proposes greedily).
    num_speculative_tokens: most draft tokens verified per request per step.
    prompt_lookup_max / prompt_lookup_min: longest / shortest n-gram (ngram) or suffix (suffix)
        matched against the history to find a continuation.
    model: the draft model (HF directory or .gguf); only with method "draft_model".
    adaptive: decide per step how many drafts pay off from measured step costs and each request's
        acceptance (False: always ``num_speculative_tokens`` when a draft exists).
    suffix_cross_request: the suffix index also holds finished requests' outputs.
    suffix_max_requests: how many finished requests' outputs the suffix index keeps.
    """

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    model: str | None = None
    adaptive: bool = True
    suffix_cross_request: bool = True
    suffix_max_requests: int = 64

    def __post_init__(self) -> None:
        _require(self.method in SPEC_METHODS,
                 f"speculative method must be one of {SPEC_METHODS}, got {self.method!r}", "method")
        _require(self.num_speculative_tokens > 0, "num_speculative_tokens must be positive",
                 "num_speculative_tokens")
        _require(1 <= self.prompt_lookup_min <= self.prompt_lookup_max,
                 "need 1 <= prompt_lookup_min <= prompt_lookup_max", "prompt_lookup_min")
        _require((self.model is not None) == (self.method == "draft_model"),
                 'speculative "model" is required with method "draft_model" and only there',
                 "model")
        _require(self.suffix_max_requests >= 0, "suffix_max_requests must be >= 0",
                 "suffix_max_requests")

    @classmethod
    def from_json(cls, value: "str | dict | SpeculativeConfig | None") -> "SpeculativeConfig | None":
        """From the JSON text or dict of ``--speculative-config`` (None stays None)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            import json
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(f"speculative config is not JSON: {exc}",
                                          "speculative_config") from None
        _require(isinstance(value, dict), "speculative config must be a JSON object",
                 "speculative_config")
        unknown = set(value) - set(cls.__dataclass_fields__)
        _require(not unknown, f"unknown speculative config key(s): {sorted(unknown)}",
                 "speculative_config")
        return cls(**value)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything an engine needs, grouped by concern (``speculative``: None = off)."""

    model: ModelConfig = ModelConfig()
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    speculative: SpeculativeConfig | None = None
