"""``conveyor serve``: the OpenAI-compatible HTTP server (flags only; see conveyor.serving.server)."""

from __future__ import annotations

from conveyor.cli.args import add_engine_args, parse_bytes
from conveyor.cli.price import add_price_arg
from conveyor.tools.formats import FORMATS


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", default=None,
                   help="the model name clients use (default: the model file or directory name)")
    g.add_argument("--api-key", action="append", default=None,
                   metavar="KEY[:tenant=NAME,trusted=1,min_priority=N]",
                   help="accepted API key (repeatable); every route but /health then needs one. "
                        "The key is its tenant (NAME, default key<index>); trusted=1 lets it set "
                        "X-Tenant (a gateway); min_priority: the most urgent priority it may ask "
                        "for (default 0)")
    g.add_argument("--api-key-file", default=None, metavar="KEYS.JSON",
                   help='keys as JSON: {"keys": [{"key": ..., "tenant": ..., "trusted": false, '
                        '"min_priority": 0}]} (keeps keys out of the process arguments)')
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
    g.add_argument("--max-connections", type=int, default=2048,
                   help="open connections at most; at the cap a new one replaces the oldest "
                        "without a request in flight (default: 2048)")
    g.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client gets to send a whole request head (default: 10)")
    g.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client gets to send a request body after its head "
                        "(default: 30)")
    g.add_argument("--stream-write-timeout", type=float, default=30.0,
                   help="abort a request and close its connection when its client has read "
                        "nothing for this many seconds (default: 30)")
    g.add_argument("--watchdog-timeout", type=float, default=60.0,
                   help="/health says 503 stalled when the engine has work and finishes no "
                        "step for this many seconds; 0 turns it off (default: 60)")
    g.add_argument("--max-tokenizer-queue-chars", type=int, default=4 << 20,
                   help="prompt characters queued for tokenization beyond which new requests "
                        "get 429 (default: 4194304)")
    g.add_argument("--tool-call-parser", default=None, choices=sorted(FORMATS),
                   help="how the model writes tool calls (vLLM's names); default: the format "
                        "the chat template was written for, else hermes")
    add_price_arg(g, "serve")
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from conveyor.serving.server import run_server
    return run_server(args)
