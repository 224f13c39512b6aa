"""``conveyor serve``: the OpenAI-compatible HTTP server (flags only; see conveyor.serving.server)."""

from __future__ import annotations

from conveyor.cli.args import add_engine_args, parse_bytes


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", default=None,
                   help="the model name clients use (default: the model file or directory name)")
    g.add_argument("--api-key", action="append", default=None,
                   help="accepted API key (repeatable); every route but /health then needs one")
    g.add_argument("--max-body-bytes", type=parse_bytes, default=1 << 20,
                   help="largest accepted request body (default: 1MiB)")
    g.add_argument("--max-waiting-requests", type=int, default=1024,
                   help="requests queued beyond the running batch before 429 (default: 1024)")
    g.add_argument("--max-n", type=int, default=8, help="largest accepted n (default: 8)")
    g.add_argument("--request-timeout", type=float, default=None,
                   help="abort requests running longer than this many seconds (default: never)")
    g.add_argument("--tenant-max-concurrency", type=int, default=None,
                   help="requests one tenant may have in flight (429 beyond)")
    g.add_argument("--tenant-max-tokens-per-minute", type=int, default=None,
                   help="prompt + max_tokens one tenant may admit per minute (429 beyond)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests get to finish (default: 30)")
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from conveyor.serving.server import run_server
    return run_server(args)
