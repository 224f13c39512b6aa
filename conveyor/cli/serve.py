"""``conveyor serve``: the OpenAI-compatible HTTP server."""

from __future__ import annotations

from conveyor.cli.args import add_engine_args


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--api-key", action="append", default=None, help="accepted API key (repeatable)")
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from conveyor.serving.server import run_server
    return run_server(args)
