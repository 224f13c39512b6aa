"""``conveyor serve``: the OpenAI-compatible HTTP server (flags only; see conveyor.server.app).

The server flags are ``ServerConfig``'s fields, the engine flags the engine configs' fields, the
Ray flags ``RayConfig``'s: with ``--replicas N`` the same API is served by N engine replicas on
Ray Serve (``conveyor.ray``); without it nothing of Ray is imported.
"""

from __future__ import annotations

from conveyor.cli.args import add_engine_args, engine_kwargs
from conveyor.config_flags import add_config_flags, config_from_args
from conveyor.ray.config import RayConfig
from conveyor.server.server_config import ServerConfig


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    add_config_flags(p, ServerConfig, "server")
    add_config_flags(p, RayConfig, "ray serve (replicas)")
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    ray_config = config_from_args(RayConfig, args)
    if ray_config.enabled:
        from conveyor.ray.serve_cli import run_on_ray
        return run_on_ray(args, engine_kwargs(args), ray_config)
    from conveyor.server.app import run_server
    return run_server(args, engine_kwargs(args))
