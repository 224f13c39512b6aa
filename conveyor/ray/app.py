"""``build_app``: conveyor as a Ray Serve application (front door + N engine replicas).

For ``serve run conveyor.ray.app:app_builder ...``, Serve config files (``import_path:
conveyor.ray.app:app_builder`` with ``args:``) and ``conveyor serve --replicas N``. Two
deployments: ``conveyor-front-door`` (the ingress, no CPUs reserved; ``front_door``) and
``conveyor-engine`` (``replica.EngineReplica``, one ``LLMEngine`` each; per-replica resources,
autoscaling and the request router are its options, passed through to Serve). Every option is
checked here, before anything is deployed: a bad value raises ``ConfigError``.
"""

from __future__ import annotations

from typing import Any, Mapping

from conveyor.config import engine_config_from_kwargs
from conveyor.errors import ConfigError
from conveyor.ray.config import RayConfig
from conveyor.server.server_config import ServerConfig

ENGINE_DEPLOYMENT = "conveyor-engine"
FRONT_DOOR_DEPLOYMENT = "conveyor-front-door"
DEFAULT_MAX_ONGOING_REQUESTS = 256      # per replica; conveyor queues beyond its running batch
_FRONT_DOOR_MAX_ONGOING = 1 << 16


def build_app(engine_kwargs: Mapping[str, Any] | None = None,
              server_config: ServerConfig | Mapping[str, Any] | None = None, *,
              num_replicas: int = 1, ray_actor_options: Mapping[str, Any] | None = None,
              autoscaling_config: Mapping[str, Any] | None = None,
              request_router: str = "pow2",
              request_router_kwargs: Mapping[str, Any] | None = None,
              max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS,
              report_interval_s: float = 1.0) -> Any:
    """The Serve ``Application`` serving conveyor's OpenAI API from ``num_replicas`` engines.

    engine_kwargs: the engine's options by field name (``conveyor.config``:
    ``{"model": ..., "num_blocks": 256}``; none given: the default model); server_config:
    a ``ServerConfig`` or its fields (every replica's HTTP side: keys, limits, model name;
    host and port are Serve's ``http_options``, not these); ray_actor_options: each engine
    replica's Ray resources (default ``{"num_cpus": 1}``); autoscaling_config: Serve's, passed
    through (``num_replicas`` is then its ``initial_replicas`` unless that is given);
    request_router: ``pow2`` (Serve's default) or a name ``conveyor.ray.router`` knows;
    report_interval_s: how often replicas report to the front door (``registry``).
    """
    from ray import serve

    from conveyor.ray.front_door import front_door_class
    from conveyor.ray.replica import EngineReplica
    engine_kwargs = dict(engine_kwargs or {})
    engine_config_from_kwargs(**engine_kwargs)            # raises ConfigError on a bad value
    config = server_config if isinstance(server_config, ServerConfig) else \
        ServerConfig(**dict(server_config or {}))
    RayConfig(replicas=num_replicas, request_router=request_router,       # checks the values
              autoscaling_config=dict(autoscaling_config) if autoscaling_config else None)
    if not report_interval_s > 0 or max_ongoing_requests < 1:
        raise ConfigError("report_interval_s must be > 0 and max_ongoing_requests >= 1")
    if num_replicas < 1 and not autoscaling_config:
        raise ConfigError(f"num_replicas must be at least 1 (or give autoscaling_config); got "
                          f"{num_replicas}")
    options: dict[str, Any] = {
        "name": ENGINE_DEPLOYMENT, "max_ongoing_requests": max_ongoing_requests,
        "ray_actor_options": dict(ray_actor_options or {"num_cpus": 1}),
        "graceful_shutdown_timeout_s": config.shutdown_timeout + 5,
        "health_check_period_s": 2, "health_check_timeout_s": 30}
    if autoscaling_config:
        options["autoscaling_config"] = {"initial_replicas": num_replicas,
                                         **dict(autoscaling_config)}
    else:
        options["num_replicas"] = num_replicas
    router = _router_config(request_router, request_router_kwargs)
    if router is not None:
        options["request_router_config"] = router
    engine = serve.deployment(EngineReplica).options(**options)
    front = serve.deployment(front_door_class()).options(
        name=FRONT_DOOR_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=_FRONT_DOOR_MAX_ONGOING)
    return front.bind(engine.bind(engine_kwargs, config, report_interval_s), config,
                      report_interval_s)


def app_builder(args: Mapping[str, Any]) -> Any:
    """``build_app`` from a Serve config file's ``args`` (or ``serve run ... key=value``):
    ``engine`` (dict), ``server`` (dict), and ``build_app``'s keyword options by name."""
    args = dict(args)
    engine_kwargs, server = args.pop("engine", None), args.pop("server", None)
    if "num_replicas" in args:
        args["num_replicas"] = int(args["num_replicas"])
    known = {"num_replicas", "ray_actor_options", "autoscaling_config", "request_router",
             "request_router_kwargs", "max_ongoing_requests", "report_interval_s"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ConfigError(f"unknown conveyor.ray app argument(s) {', '.join(unknown)}; expected "
                          f"engine, server, {', '.join(sorted(known))}")
    return build_app(engine_kwargs, server, **args)


def _router_config(name: str, kwargs: Mapping[str, Any] | None) -> Any:
    if name == "pow2":
        if kwargs:
            raise ConfigError("request_router_kwargs need a request_router other than pow2")
        return None
    try:
        from conveyor.ray.router import request_router_config
    except ImportError as exc:
        raise ConfigError(f"request router {name!r} is not available in this build "
                          f"(conveyor.ray.router: {exc}); use pow2") from None
    return request_router_config(name, **dict(kwargs or {}))
