"""/metrics under vLLM's names (``--metrics-names``): names, types, labels and buckets as vLLM V1
exports them (the list below is written from vllm/v1/metrics/loggers.py), values equal to
conveyor's own names and to the engine's."""

from __future__ import annotations

import asyncio

import httpx
from engine_helpers import NUM_BLOCKS, small_engine
from prometheus_client.parser import text_string_to_metric_families

from conveyor.metrics.prometheus import ServingMetrics
from conveyor.server.app import ServerConfig, build_app

# vLLM V1's families (name without the _total/_bucket sample suffixes) -> type
VLLM_FAMILIES = {
    "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge", "vllm:cache_config_info": "gauge",
    "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter", "vllm:num_preemptions": "counter",
    "vllm:prefix_cache_queries": "counter", "vllm:prefix_cache_hits": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:request_time_per_output_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_inference_time_seconds": "histogram",
    "vllm:request_prefill_time_seconds": "histogram",
    "vllm:request_decode_time_seconds": "histogram",
    "vllm:request_prompt_tokens": "histogram", "vllm:request_generation_tokens": "histogram",
}
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0]
LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
N = 5


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(family, sample_name: str, **labels) -> float:
    return sum(s.value for s in family.samples if s.name == sample_name
               and all(s.labels.get(k) == v for k, v in labels.items()))


def _buckets(family) -> list[float]:
    return [float(s.labels["le"]) for s in family.samples
            if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"]


def test_vllm_names_over_http_match_vllm_and_the_engine():
    engine = small_engine()
    app = build_app(ServerConfig(metrics_names="both", served_model_name="smol"), lambda: engine)

    async def scenario(client):
        for _ in range(200):
            if (await client.get("/health")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        usage = []
        for i in range(N):
            r = await client.post("/v1/completions", json={
                "model": "smol", "prompt": f"Count to {i}:", "max_tokens": 3 + i,
                "temperature": 0})
            assert r.status_code == 200, r.text
            usage.append(r.json()["usage"])
        return usage, (await client.get("/metrics")).text, app.state.conveyor.engine.snapshot

    async def serve():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                return await scenario(client)

    before = engine.stats()
    usage, text, snap = asyncio.run(serve())
    fams = _families(text)
    for name, kind in VLLM_FAMILIES.items():
        assert name in fams, name
        assert fams[name].type == kind, name
        for s in fams[name].samples:
            assert s.labels["engine"] == "0", s
            if name != "vllm:cache_config_info":
                assert s.labels["model_name"] == "smol", s
    assert _buckets(fams["vllm:time_to_first_token_seconds"]) == TTFT_BUCKETS
    assert _buckets(fams["vllm:inter_token_latency_seconds"]) == ITL_BUCKETS
    assert _buckets(fams["vllm:e2e_request_latency_seconds"]) == LATENCY_BUCKETS
    assert _buckets(fams["vllm:request_prompt_tokens"])[:4] == [1, 2, 5, 10]
    success = fams["vllm:request_success"]
    assert {s.labels["finished_reason"] for s in success.samples} >= {"stop", "length", "abort"}
    assert _value(success, "vllm:request_success_total") == N
    assert _value(fams["vllm:prompt_tokens"], "vllm:prompt_tokens_total") == \
        sum(u["prompt_tokens"] for u in usage)
    assert _value(fams["vllm:generation_tokens"], "vllm:generation_tokens_total") == \
        sum(u["completion_tokens"] for u in usage)
    assert _value(fams["vllm:request_generation_tokens"], "vllm:request_generation_tokens_sum") \
        == sum(u["completion_tokens"] for u in usage)
    assert _value(fams["vllm:e2e_request_latency_seconds"],
                  "vllm:e2e_request_latency_seconds_count") == N
    assert _value(fams["vllm:num_requests_running"], "vllm:num_requests_running") == \
        snap.num_running == 0
    assert _value(fams["vllm:num_requests_waiting"], "vllm:num_requests_waiting") == \
        snap.num_waiting == 0
    assert _value(fams["vllm:kv_cache_usage_perc"], "vllm:kv_cache_usage_perc") == \
        snap.kv_cache_usage
    assert _value(fams["vllm:prefix_cache_queries"], "vllm:prefix_cache_queries_total") == \
        snap.prefix_cache_queries > before.prefix_cache_queries
    (info,) = fams["vllm:cache_config_info"].samples
    assert info.value == 1 and info.labels["block_size"] == "16"
    assert info.labels["num_gpu_blocks"] == str(NUM_BLOCKS)
    # "both": the same samples under both names, from one observation
    for name in ("prompt_tokens_total", "request_success_total",
                 "time_to_first_token_seconds_count", "e2e_request_latency_seconds_sum"):
        family = name.rsplit("_", 1)[0] if name.endswith(("_count", "_sum")) else name[:-6]
        assert _value(fams["conveyor:" + family], "conveyor:" + name) == \
            _value(fams["vllm:" + family], "vllm:" + name), name


class _Snap:
    num_running, num_waiting, num_free_blocks, num_total_blocks = 2, 3, 5, 8
    kv_cache_usage, num_preemptions_total, num_cached_free_blocks = 0.375, 1, 0
    prefix_cache_queries, prefix_cache_hits, preemptions_by_mode, spec_decode = 10, 4, (), None
    step_cost = None


def test_vllm_only_replaces_the_mapped_names_and_keeps_conveyors_extras():
    metrics = ServingMetrics(lambda: _Snap(), names="vllm", model_name=lambda: "m")
    fams = _families(metrics.render().decode())
    assert _value(fams["vllm:num_requests_waiting"], "vllm:num_requests_waiting", model_name="m") == 3
    assert "conveyor:num_requests_waiting" not in fams and "conveyor:prompt_tokens" not in fams
    assert _value(fams["conveyor:kv_cache_total_blocks"], "conveyor:kv_cache_total_blocks") == 8
    conveyor_only = _families(ServingMetrics(lambda: _Snap()).render().decode())
    assert not any(name.startswith("vllm:") for name in conveyor_only)
    assert "conveyor:num_requests_waiting" in conveyor_only
