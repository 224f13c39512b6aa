"""``ServerConfig``: the HTTP side's options, one field per ``conveyor serve`` flag.

Frozen and validated at construction (``ConfigError`` naming the field; key errors from
``server.auth``). Free of HTTP libraries so building the command line stays cheap: ``auth`` is
imported only when keys are checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from conveyor.config_flags import check_fields, opt, parse_bytes
from conveyor.errors import ConfigError
from conveyor.tools.formats import FORMATS

_KEY_SPEC = "KEY[:tenant=NAME,trusted=1,min_priority=N]"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """HTTP-side limits and identity; engine sizing lives in the engine's own config.

    api_keys: ``ApiKey`` objects, or ``--api-key`` specs (a string: ``KEY`` or ``KEY:options``,
    see ``server.auth.parse_api_key``); empty (and no ``api_key_file``) means no authentication.
    After construction they are ``ApiKey`` objects, the file's included. A ``watchdog_timeout``
    of 0 is stored as None (no watchdog).
    """

    host: str = opt("127.0.0.1", "address to listen on")
    port: int = opt(8000, "TCP port to listen on", min=1, max=65535)
    served_model_name: str | None = opt(
        None, "the model name clients use (default: the model file or directory name)")
    api_keys: tuple[Any, ...] = opt(
        (), "accepted API key (repeatable); every route but /health then needs one. The key is "
            "its tenant (NAME, default key<index>); trusted=1 lets it set X-Tenant (a gateway); "
            "min_priority: the most urgent priority it may ask for (default 0)",
        aliases=("--api-key",), parse=str, repeat=True, metavar=_KEY_SPEC)
    api_key_file: str | None = opt(
        None, 'keys as JSON: {"keys": [{"key": ..., "tenant": ..., "trusted": false, '
              '"min_priority": 0}]} (keeps keys out of the process arguments)',
        metavar="KEYS.JSON")
    max_body_bytes: int = opt(1 << 20, "largest accepted request body", parse=parse_bytes,
                              show_default="1MiB", min=1, max=1 << 32)
    max_waiting_requests: int = opt(1024, "requests queued beyond the running batch before 429",
                                    min=1, max=1 << 24)
    max_n: int = opt(8, "largest accepted n", min=1, max=1024)
    request_timeout: float | None = opt(
        None, "abort requests running longer than this many seconds (default: never)", gt=0)
    shutdown_timeout: float = opt(30.0, "on SIGTERM, seconds in-flight requests get to finish",
                                  min=0)
    tenant_max_concurrency: int | None = opt(
        None, "requests one tenant may have in flight (429 beyond)", min=1,
        show_default="no limit")
    tenant_max_tokens_per_minute: int | None = opt(
        None, "prompt + max_tokens one tenant may admit per minute (429 beyond)", min=1,
        show_default="no limit")
    stream_write_timeout: float | None = opt(
        30.0, "abort a request and close its connection when its client has read nothing for "
              "this many seconds", gt=0)
    watchdog_timeout: float | None = opt(
        60.0, "/health says 503 stalled when the engine has work and finishes no step for this "
              "many seconds; 0 turns it off", min=0)
    max_tokenizer_queue_chars: int = opt(
        4 << 20, "prompt characters queued for tokenization beyond which new requests get 429",
        min=1)
    tool_call_parser: str | None = opt(
        None, "how the model writes tool calls (vLLM's names); default: the format the chat "
              "template was written for, else hermes", choices=tuple(sorted(FORMATS)))
    max_connections: int = opt(
        2048, "open connections at most; at the cap a new one replaces the oldest without a "
              "request in flight", min=1, max=1 << 20)
    header_timeout: float = opt(10.0, "seconds a client gets to send a whole request head", gt=0)
    body_timeout: float = opt(30.0, "seconds a client gets to send a request body after its head",
                              gt=0)

    price_per_hour: float | None = opt(
        None, "the machine's price per hour in USD: /metrics and /dashboard show the cost per 1M "
              "output and per 1M total tokens (default: no cost shown)", metavar="USD", gt=0,
        max=1e9)

    metrics_names: Literal["conveyor", "vllm", "both"] = opt(
        "conveyor", "metric names on /metrics: conveyor (conveyor: prefix), vllm (vLLM V1's "
                    "names and model_name/engine labels, for vLLM dashboards and the Gateway API "
                    "Inference Extension; conveyor's extras keep their names) or both")

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("host", "served_model_name"):
            value = getattr(self, name)
            if value is not None and (not value.strip() or not value.isprintable()):
                raise ConfigError(f"{name} must be a non-empty printable name; got {value!r}", name)
        if self.watchdog_timeout == 0:
            object.__setattr__(self, "watchdog_timeout", None)
        object.__setattr__(self, "api_keys", _keys(self.api_keys, self.api_key_file))


def _keys(specs: tuple, path: str | None) -> tuple:
    """``--api-key`` specs / ``ApiKey`` objects, then the file's entries; each checked, none
    twice (``server.auth``; errors never name a key)."""
    from conveyor.server.auth import ApiKey, check_keys, load_api_key_file, parse_api_key
    keys = [k if isinstance(k, ApiKey) else parse_api_key(k, f"--api-key #{i + 1}")
            for i, k in enumerate(specs)]
    if path:
        keys += load_api_key_file(path)
    return check_keys(tuple(keys))
