"""``conveyor serve``: the OpenAI-compatible HTTP server (flags only; see conveyor.server.app).

The server flags are ``ServerConfig``'s fields, the engine flags the engine configs' fields.
"""

from __future__ import annotations

from conveyor.cli.args import add_engine_args, engine_kwargs
from conveyor.config_flags import add_config_flags
from conveyor.server.server_config import ServerConfig


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    add_config_flags(p, ServerConfig, "server")
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from conveyor.server.app import run_server
    return run_server(args, engine_kwargs(args))
