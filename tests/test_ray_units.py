"""conveyor.ray's Ray-free parts: the exposition merge, the registry's staleness, RayConfig."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conveyor.errors import ConfigError
from conveyor.ray.config import RayConfig
from conveyor.ray.metrics_merge import merge_expositions
from conveyor.ray.registry import ReplicaRegistry, ReplicaReport


def _exposition(tokens: int) -> str:
    registry = CollectorRegistry()
    Counter("conveyor:generation_tokens", "Tokens.", registry=registry).inc(tokens)
    Histogram("conveyor:ttft_seconds", "TTFT.", registry=registry).observe(0.1)
    return generate_latest(registry).decode()


def test_merge_labels_every_sample_and_keeps_one_family_each():
    text = merge_expositions({"a": _exposition(3), "b": _exposition(5), "bad": "x{ 1"})
    families = {f.name: f for f in text_string_to_metric_families(text)}
    tokens = {s.labels["replica"]: s.value for s in families["conveyor:generation_tokens"].samples
              if s.name.endswith("_total")}
    assert tokens == {"a": 3.0, "b": 5.0}
    assert all("replica" in s.labels for f in families.values() for s in f.samples)
    assert text.count("# TYPE conveyor:ttft_seconds histogram") == 1


def test_registry_marks_silent_replicas_unreachable_then_forgets_them():
    registry = ReplicaRegistry(report_interval_s=0.05, forget_after_s=0.4)
    registry.report(ReplicaReport("r1", 1, "n", 200, {"status": "ok"}))
    registry.report(ReplicaReport("r2", 2, "n", 503, {"status": "loading"}))
    views = {v.report.replica: v for v in registry.snapshot()}
    assert views["r1"].healthy and views["r1"].state == "ok"
    assert not views["r2"].healthy and views["r2"].state == "loading"
    time.sleep(0.2)
    assert all(v.state == "unreachable" and not v.healthy for v in registry.snapshot())
    time.sleep(0.3)
    assert registry.snapshot() == []


@pytest.mark.parametrize("kwargs", [{"replicas": -1}, {"replica_num_cpus": 0},
                                    {"autoscaling_config": "[1]"},
                                    {"autoscaling_config": {"max_replica": 2}},
                                    {"request_router": "random"}, {"ray_address": " "}])
def test_bad_ray_config_is_a_config_error(kwargs):
    with pytest.raises(ConfigError):
        RayConfig(**kwargs)


def test_ray_config_parses_autoscaling_json():
    config = RayConfig(replicas=2, autoscaling_config='{"max_replicas": 4}')
    assert config.enabled and config.autoscaling_config == {"max_replicas": 4}
    assert not RayConfig().enabled
