"""vLLM's metric names on /metrics: a view of the one set of conveyor metrics, renamed.

Every value is observed once, into conveyor's own metric objects (``prometheus.py``); at scrape
time ``NameView`` yields each family under the name sets ``--metrics-names`` asks for:
"conveyor" (``conveyor:`` names, no labels), "vllm" (vLLM V1's names with its ``model_name`` and
``engine`` labels, for the families vLLM has; conveyor's own extras keep their ``conveyor:`` names)
or "both". So the two name sets can never disagree: they are the same samples.

The vLLM names, types, label sets and buckets follow ``vllm/v1/metrics/loggers.py``; the
families vLLM has and conveyor cannot fill (LoRA, multimodal, external KV connectors) are absent.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

NAME_SETS = ("conveyor", "vllm", "both")
_C, _V = "conveyor:", "vllm:"

# conveyor family (without its prefix) -> vLLM family; the same suffix unless listed otherwise
VLLM_FAMILIES = frozenset({
    "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_preemptions",
    "prefix_cache_queries", "prefix_cache_hits", "prompt_tokens", "generation_tokens",
    "request_success", "time_to_first_token_seconds", "inter_token_latency_seconds",
    "e2e_request_latency_seconds", "request_queue_time_seconds",
    "request_inference_time_seconds", "request_prefill_time_seconds",
    "request_decode_time_seconds", "request_time_per_output_token_seconds",
    "request_prompt_tokens", "request_generation_tokens",
    "spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens",
    "spec_decode_num_accepted_tokens_per_pos", "cache_config_info"})
_NO_MODEL_LABEL = frozenset({"cache_config_info"})     # vLLM labels it by engine only


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's token-count buckets)."""
    buckets, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return buckets
            buckets.append(m * scale)
        scale *= 10


class NameView(Collector):
    """Yields the families ``source`` collects under the chosen name sets (see module doc).
    ``model_name()`` is the served model's name (None until it loaded: vLLM names wait)."""

    def __init__(self, source: Collector, names: str, model_name: Callable[[], str | None]):
        if names not in NAME_SETS:
            raise ValueError(f"metrics names must be one of {NAME_SETS}; got {names!r}")
        self._source, self._model_name = source, model_name
        self._conveyor, self._vllm = names != "vllm", names != "conveyor"

    def collect(self) -> Iterable[Metric]:
        model = self._model_name()
        for family in self._source.collect():
            suffix = family.name[len(_C):] if family.name.startswith(_C) else None
            if suffix not in VLLM_FAMILIES:
                yield family
                continue
            if self._conveyor:
                yield family
            if self._vllm and model is not None:
                yield _renamed(family, suffix, model)


def _renamed(family: Metric, suffix: str, model: str) -> Metric:
    name = _V + suffix
    out = Metric(name, family.documentation, family.type, family.unit)
    extra = {"engine": "0"} if suffix in _NO_MODEL_LABEL else {"model_name": model, "engine": "0"}
    for s in family.samples:
        out.samples.append(s._replace(name=name + s.name[len(family.name):],
                                      labels={**extra, **s.labels}))
    return out
