"""Frozen, validated configuration, one dataclass per concern; every field is also a flag.

Nothing writes back into a config after construction: values derived at start-up (the number of
KV blocks once the model's size is known, the resolved dtype) live in the objects that derive them.
Each field's ``metadata`` (its help, bounds, older flag spellings) is what ``conveyor.config_flags``
turns into the ``conveyor`` flags; choices are the field's ``Literal`` type. Invalid values raise
``ConfigError`` naming the field.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Literal

from conveyor.config_flags import check_fields, config_from_json, field_values, opt, parse_bytes
from conveyor.kv_events.config import KVEventsConfig

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Batching = Literal["continuous", "static", "dynamic"]
KvAllocation = Literal["paged", "reservation"]
PrefixCacheScope = Literal["tenant", "global"]
PreemptionMode = Literal["recompute", "swap", "auto"]
AttentionBackend = Literal["auto", "cpu", "sdpa", "reference"]
DTYPES, BATCHING_POLICIES = field_values(Dtype), field_values(Batching)
PREEMPTION_MODES = field_values(PreemptionMode)
# How long a partial batch waits before launching: static batching waits for a full batch,
# dynamic batching launches after a short window.
DEFAULT_BATCH_TIMEOUT_S = {"static": 30.0, "dynamic": 0.05, "continuous": 0.0}


def parse_tenant_weight(text: str) -> tuple[str, float]:
    """``TENANT=WEIGHT`` -> (tenant, weight)."""
    name, sep, value = text.partition("=")
    try:
        weight = float(value)
    except ValueError:
        sep = ""
    if not sep or not name or not 0 < weight < float("inf"):
        raise argparse.ArgumentTypeError(f"expected TENANT=WEIGHT with WEIGHT > 0, got {text!r}")
    return name, weight



@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Which checkpoint to run and how (dtype "auto" resolves per device in ``conveyor.platform``;
    int8 needs VNNI, which ``models/int8.check_supported`` checks at start)."""

    model: str | None = opt(None, "HF model directory or .gguf file (default: SmolLM2-135M-"
                                  "Instruct GGUF)")
    dtype: Dtype = opt("auto", "compute dtype; auto: bfloat16 where the CPU has native bf16")
    device: str = opt("auto", "auto, cpu or cuda[:N]")
    max_model_len: int | None = opt(None, "context limit in tokens (default: the checkpoint's, "
                                          "capped by the KV cache)", min=1, max=1 << 24)
    seed: int = opt(0, "seed of the model's sampling generator", min=0, max=(1 << 63) - 1)
    quantization: Literal["int8"] | None = opt(
        None, "int8: int8 weights and per-token int8 activations in the layer GEMMs (CPU, VNNI "
              "where present); accuracy and speed in BENCHMARKS.md", aliases=("-q",))
    attention_backend: AttentionBackend = opt(
        "auto", "auto: the C++ paged kernel on CPU where it builds, else sdpa")
    chat_template: str | None = opt(
        None, "chat template for /v1/chat/completions: a Jinja file or the template text; "
              "overrides the model's own (a base model's GGUF carries none)")

    def __post_init__(self) -> None:
        check_fields(self)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            _fail(f"device must be auto, cpu or cuda[:N]; got {self.device!r} (--device)", "device")
        if self.quantization == "int8" and self.dtype == "float16":
            _fail("--quantization int8 computes in float32 or bfloat16, not float16; use --dtype "
                  "auto, float32 or bfloat16", "quantization")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Paged KV cache sizing: ``num_blocks`` or ``kv_cache_bytes`` (the first wins); with neither,
    the pool holds ``max_num_seqs`` full-length sequences, capped at 4 GiB."""

    block_size: int = opt(16, "tokens per KV block (a power of two)", min=1, max=4096)
    num_blocks: int | None = opt(None, "KV cache size in blocks", aliases=("--num-kv-blocks",),
                                 min=1, max=1 << 30)
    kv_cache_bytes: int | None = opt(
        None, "KV cache size in bytes (e.g. 2GiB); default: enough for max-num-seqs full "
              "contexts, at most 4GiB", aliases=("--kv-cache-memory",), parse=parse_bytes, min=1)
    kv_allocation: KvAllocation = opt(
        "paged", "reservation: reserve prompt + max_tokens at admission (Orca-era baseline)")
    enable_prefix_caching: bool = opt(True, "automatic prefix caching",
                                      aliases=("--no-prefix-caching",))
    prefix_cache_scope: PrefixCacheScope = opt(
        "tenant", "tenant: each tenant only hits its own cached prefixes; global: share them "
                  "across tenants (reveals shared prompts' cache hits)")
    preemption_mode: PreemptionMode = opt(
        "recompute", "swap: copy preempted KV to host memory; auto: per request, by estimated cost")
    swap_space_bytes: int = opt(1 << 30, "host swap pool size", aliases=("--swap-space",),
                                parse=parse_bytes, show_default="1GiB", min=1)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.block_size & (self.block_size - 1):
            _fail(f"block_size must be a power of two; got {self.block_size}", "block_size")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Token-budget scheduling limits; ``record_steps`` keeps a ``StepStats`` per executed step
    in the core's ``step_log`` (benchmarks; no flag, since a server's log would grow forever)."""

    max_num_batched_tokens: int = opt(2048, "tokens (prefill chunks + decodes) computed in one "
                                            "step", min=1, max=1 << 20)
    max_num_seqs: int = opt(64, "requests running at once (batch slots)", min=1, max=1 << 16)
    enable_chunked_prefill: bool = opt(True, "split long prompts over steps; off: a prompt waits "
                                             "until it fits the budget whole",
                                       aliases=("--no-chunked-prefill",))
    batching: Batching = opt("continuous", "scheduling policy; static/dynamic are the measured "
                                           "baselines")
    batch_timeout_s: float | None = opt(
        None, "static/dynamic: launch a partial batch after this many seconds (default: 30 / "
              "0.05)", aliases=("--batch-timeout",), min=0, max=86400)
    fair_scheduling: bool = opt(False, "weighted fair queueing of the token budget across tenants")
    tenant_weights: tuple[tuple[str, float], ...] = opt(
        (), "weight of a tenant under --fair-scheduling (repeatable; default 1)",
        aliases=("--tenant-weight",), parse=parse_tenant_weight, repeat=True,
        metavar="TENANT=WEIGHT")
    record_steps: bool = opt(False, "keep a StepStats per executed step", flag=False)
    target_itl_ms: float | None = opt(
        None, "inter-token latency target (an SLO, milliseconds): each step's prefill tokens are "
              "sized so its predicted time (a cost model measured on this machine, core.step_cost) "
              "stays under it; decodes always run and a prompt always advances (default: off, the "
              "fixed token budget); needs chunked prefill and continuous batching",
        metavar="MS", gt=0, max=3.6e6)
    max_num_partial_prefills: int = opt(1, "prefill chunks per step that leave their prompt "
                                           "unfinished (vLLM's name)", min=1, max=1 << 16)
    max_long_partial_prefills: int = opt(1, "of those, how many may be for long prompts",
                                         min=1, max=1 << 16)
    long_prefill_token_threshold: int = opt(
        0, "a prompt with more tokens left is long: while other prefills wait its chunk is at "
           "most this many tokens (default 0: none is long)", min=0, max=1 << 30)

    @property
    def tenant_weights_dict(self) -> dict[str, float]:
        return dict(self.tenant_weights)

    @property
    def launch_timeout_s(self) -> float:
        if self.batch_timeout_s is not None:
            return self.batch_timeout_s
        return DEFAULT_BATCH_TIMEOUT_S[self.batching]

    def __post_init__(self) -> None:
        weights = self.tenant_weights
        pairs = weights.items() if isinstance(weights, dict) else weights
        object.__setattr__(self, "tenant_weights", tuple(sorted(dict(pairs).items())))
        check_fields(self)
        if not all(name and 0 < w < float("inf") for name, w in self.tenant_weights):
            _fail("tenant weights need a tenant name and a finite weight > 0", "tenant_weights")
        self._check_prefill_budget()

    def _check_prefill_budget(self) -> None:
        if self.target_itl_ms is not None and not (self.enable_chunked_prefill
                                                   and self.batching == "continuous"):
            _fail("target_itl_ms needs chunked prefill and continuous batching (it sizes prefill "
                  "chunks); drop --no-chunked-prefill / --batching or --target-itl-ms",
                  "target_itl_ms")
        if self.max_long_partial_prefills > self.max_num_partial_prefills:
            _fail("max_long_partial_prefills must be between 1 and max_num_partial_prefills",
                  "max_long_partial_prefills")


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    """How many processes run the model: ``tensor_parallel_size`` ranks, each holding 1/N of every
    layer's heads and MLP columns (``conveyor/distributed``). Whether N divides the model's head
    and MLP sizes is checked once the checkpoint's config is read (``ConfigError`` naming them)."""

    tensor_parallel_size: int = opt(
        1, "tensor-parallel ranks, one process each (gloo on CPU, NCCL on CUDA: rank r on "
           "cuda:r); N must divide the attention heads, KV heads and intermediate size",
        aliases=("-tp",), min=1, max=512)

    def __post_init__(self) -> None:
        check_fields(self)


SPEC_METHODS = ("ngram", "suffix", "draft_model")


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """Speculative decoding (vLLM's ``--speculative-config`` JSON spelling).

    method: "ngram" (prompt lookup over the request's own tokens), "suffix" (a suffix index over
        the request's tokens and, with ``suffix_cross_request``, earlier requests' outputs) or
        "draft_model" (a smaller model with the same vocabulary proposes: its argmax for
        greedy requests, a sample of its processed distribution for the others).
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
        return config_from_json(cls, value, "speculative_config")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything an engine needs, grouped by concern (``speculative``, ``kv_events``: None =
    off)."""

    model: ModelConfig = ModelConfig()
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    speculative: SpeculativeConfig | None = None
    kv_events: KVEventsConfig | None = None
    parallel: ParallelConfig = ParallelConfig()


@dataclass(frozen=True, slots=True)
class SpeculativeOption:
    """The one engine flag that is not a field of a group above: ``--speculative-config``."""

    speculative_config: str | None = opt(
        None, "speculative decoding, vLLM's JSON: {\"method\":\"ngram\",\"num_speculative_"
              "tokens\":4,\"prompt_lookup_max\":4,\"prompt_lookup_min\":2}; \"suffix\"; or "
              "\"draft_model\" with \"model\": PATH (same vocabulary) (default: off)",
        metavar="JSON")


@dataclass(frozen=True, slots=True)
class KVEventsOption:
    """``--kv-events-config``: vLLM's KV cache events over ZMQ (``conveyor.kv_events``)."""

    kv_events_config: str | None = opt(
        None, "publish KV cache events like vLLM, its JSON: {\"enable_kv_cache_events\":true,"
              "\"publisher\":\"zmq\",\"endpoint\":\"tcp://*:5557\",\"replay_endpoint\":null,"
              "\"topic\":\"\"} (also buffer_steps, hwm, max_queue_size; conveyor's "
              "\"event_encoding\": \"map\" or \"array\") (default: off)", metavar="JSON")


ENGINE_GROUPS = (ModelConfig, CacheConfig, SchedulerConfig, ParallelConfig, SpeculativeOption,
                 KVEventsOption)


def _fail(message: str, field: str) -> None:
    from conveyor.errors import ConfigError
    raise ConfigError(message, field)


def _require(ok: bool, message: str, field: str) -> None:
    if not ok:
        _fail(message, field)


def engine_config_from_kwargs(**kw) -> EngineConfig:
    """Flat vLLM-style keyword arguments (each group's field names; None: the default) ->
    grouped frozen configs. Raises ``ConfigError`` for a name no group has.
    ``speculative_config`` / ``kv_events_config``: JSON text, a dict or the config object."""
    from dataclasses import fields
    spec = SpeculativeConfig.from_json(kw.pop("speculative_config", None))
    kv_events = KVEventsConfig.from_json(kw.pop("kv_events_config", None))
    groups = ENGINE_GROUPS[:4]
    names = [{f.name for f in fields(group)} for group in groups]
    unknown = set(kw).difference(*names)
    if unknown:
        _fail(f"unknown engine option(s): {sorted(unknown)}", sorted(unknown)[0])
    parts = [group(**{k: v for k, v in kw.items() if k in keys and v is not None})
             for group, keys in zip(groups, names)]
    model, cache, scheduler, parallel = parts
    return EngineConfig(model, cache, scheduler, spec, kv_events, parallel)
