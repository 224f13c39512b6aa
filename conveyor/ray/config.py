"""``RayConfig``: how ``conveyor serve`` spreads over Ray Serve replicas, one field per flag.

Frozen and validated at construction (``ConfigError`` naming the field). Free of Ray: building
the command line never imports it; ``replicas`` 0 (the default) means "no Ray at all".
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any, Literal

from conveyor.config_flags import check_fields, opt
from conveyor.errors import ConfigError

RequestRouterName = Literal["pow2", "round-robin", "prefix"]

# Ray Serve's AutoscalingConfig fields a user may pass through (checked again by Ray itself).
_AUTOSCALING_KEYS = frozenset({
    "min_replicas", "initial_replicas", "max_replicas", "target_ongoing_requests",
    "max_ongoing_requests", "metrics_interval_s", "look_back_period_s", "smoothing_factor",
    "upscale_smoothing_factor", "downscale_smoothing_factor", "upscaling_factor",
    "downscaling_factor", "downscale_delay_s", "downscale_to_zero_delay_s", "upscale_delay_s",
    "aggregation_function", "policy"})


def json_object(text: str) -> dict[str, Any]:
    """A flag's JSON object (``'{"min_replicas": 1}'``); a one-line error otherwise."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


@dataclass(frozen=True, slots=True)
class RayConfig:
    """Engine replicas on Ray Serve behind one OpenAI front door (``conveyor.ray``).

    autoscaling_config: Ray Serve's ``autoscaling_config`` (a dict, or its JSON text); when set,
    ``replicas`` is the initial number unless it names ``initial_replicas`` itself.
    """

    replicas: int = opt(0, "engine replicas on Ray Serve behind the same API, host and port "
                           "(0: one engine in this process, no Ray)", min=0, max=1024)
    ray_address: str | None = opt(
        None, "join this Ray cluster (e.g. 'auto' or 'ray://head:10001') instead of starting a "
              "local Ray instance", metavar="ADDRESS")
    replica_num_cpus: float = opt(1.0, "CPUs Ray reserves for each engine replica", gt=0,
                                  max=1024)
    autoscaling_config: dict[str, Any] | None = opt(
        None, "Ray Serve autoscaling settings as JSON, passed through (e.g. "
              "'{\"min_replicas\": 1, \"max_replicas\": 4, \"target_ongoing_requests\": 8}')",
        parse=json_object, metavar="JSON")
    request_router: RequestRouterName = opt(
        "pow2", "how the front door picks a replica: pow2 (Ray Serve's power of two choices), "
                "round-robin, prefix (prefix-cache aware)")

    def __post_init__(self) -> None:
        if isinstance(self.autoscaling_config, str):
            try:
                object.__setattr__(self, "autoscaling_config",
                                   json_object(self.autoscaling_config))
            except argparse.ArgumentTypeError as exc:
                raise ConfigError(f"autoscaling_config {exc}", "autoscaling_config") from None
        check_fields(self)
        if self.ray_address is not None and (not self.ray_address.strip()
                                             or not self.ray_address.isprintable()):
            raise ConfigError(f"ray_address must be a non-empty address; got "
                              f"{self.ray_address!r} (--ray-address)", "ray_address")
        if self.autoscaling_config is not None:
            unknown = sorted(set(self.autoscaling_config) - _AUTOSCALING_KEYS)
            if unknown:
                raise ConfigError(f"autoscaling_config has unknown key(s) {', '.join(unknown)}; "
                                  f"Ray Serve accepts {', '.join(sorted(_AUTOSCALING_KEYS))} "
                                  "(--autoscaling-config)", "autoscaling_config")

    @property
    def enabled(self) -> bool:
        """Whether ``conveyor serve`` runs on Ray Serve."""
        return self.replicas > 0
