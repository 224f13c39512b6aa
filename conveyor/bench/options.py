"""``conveyor bench``'s own flags, generated from frozen dataclasses (``conveyor.config_flags``:
one field, one flag; the engine's flags come from ``conveyor.config``).

A field's name is its flag's, its help the flag's help, its default the flag's default. Values
that need parsing (lengths, rates, SLOs, durations, a price) are parsed, or at least checked, by
the field's ``parse`` while the flags are read: a bad value is one line and exit status 2. Bounds
(``min`` / ``gt``) are checked when the options are built (``options_from``), also in one line.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Callable

from conveyor.cli.price import PRICE_HELP, parse_price
from conveyor.config_flags import check_fields, config_from_args, opt
from conveyor.errors import ConveyorError

__all__ = ["BENCH_OPTIONS", "CompareOptions", "HttpBenchOptions", "ReportOptions",
           "ScenarioOptions", "SoakOptions", "WorkloadOptions", "options_from"]


def _checked(check: Callable[[str], Any]) -> Callable[[str], str]:
    """A ``parse`` that keeps the text once ``check`` accepts it (its error: one line)."""
    def parse(text: str) -> str:
        try:
            check(text)
        except ConveyorError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text
    parse.__name__ = getattr(check, "__name__", "value")
    return parse


def _length(text: str) -> None:
    from conveyor.bench.workloads import LengthDist
    LengthDist.parse(text)


def _rates(text: str) -> None:
    from conveyor.bench.arrivals import parse_rates
    parse_rates(text)


def _slo(text: str) -> None:
    from conveyor.bench.metrics import parse_slos
    parse_slos([text])


def parse_duration_flag(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``20m`` or ``1h``: positive and finite."""
    from conveyor.bench.soak import parse_duration
    try:
        seconds = parse_duration(text)
    except ConveyorError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not math.isfinite(seconds):
        raise argparse.ArgumentTypeError(f"a duration must be finite, got {text!r}")
    return seconds


class _Checked:
    __slots__ = ()

    def __post_init__(self) -> None:
        check_fields(self)


def _seed() -> Any:
    return opt(0, "one seed for prompts, lengths and arrivals", min=0)


@dataclass(frozen=True, slots=True)
class WorkloadOptions(_Checked):
    """The requests a run sends and when (``offline``, ``serve``, ``compare``)."""

    dataset: str | None = opt(None, "JSONL replay file or ShareGPT JSON (else synthetic)")
    num_prompts: int | None = opt(None, "requests (default 64; a file: all)", min=1)
    prompt_len: str = opt("32,128,512", "prompt tokens: 128 | uniform:32:512 | normal:128:32 | "
                                        "32,128,512 | 32:1,512:3", parse=_checked(_length))
    output_len: str | None = opt(None, "max_tokens, same syntax (default uniform:16:256); with "
                                       "--dataset, one number overriding the file's",
                                 parse=_checked(_length))
    shared_prefix_len: int | None = opt(None, "every prompt starts with the same N-token system "
                                              "prompt; --prompt-len is then the question length",
                                        min=0)
    request_rate: str | None = opt(None, "requests/s: inf (all at once, the default), 2.5, or a "
                                         "sweep 1,2,4,inf", parse=_checked(_rates))
    burstiness: float = opt(1.0, "gamma shape of gaps; 1 = Poisson", gt=0)
    workload_seed: int = _seed()
    goodput: tuple[str, ...] | None = opt(
        None, "SLOs for goodput, e.g. ttft:500 tpot:50 e2e:10000 itl:100 (itl: every "
              "inter-token gap of the request)", nargs="+", metavar="KEY:MS",
        parse=_checked(_slo), show_default="none")


@dataclass(frozen=True, slots=True)
class ReportOptions(_Checked):
    """Where a run's report goes and what it holds."""

    output_dir: str | None = opt(None, "default bench-results/<mode>-<date>")
    plots: bool = opt(True, "write PNG plots next to report.json")
    progress: bool = opt(True, "show a progress bar")
    price_per_hour: float | None = opt(None, PRICE_HELP["bench"], parse=parse_price,
                                       metavar="USD")


@dataclass(frozen=True, slots=True)
class HttpBenchOptions(_Checked):
    """``bench serve``: the server to load-test over HTTP and how."""

    base_url: str = opt("http://127.0.0.1:8000", "server root (without /v1)")
    model: str | None = opt(None, "model name to send (default: first of GET /v1/models)")
    tokenizer: str | None = opt(None, "HF directory or .gguf to build prompts and count tokens "
                                      "with (default: conveyor's default model; 'none' sends "
                                      "token ids)")
    max_concurrency: int | None = opt(None, "requests in flight at most", min=1)
    api_key: str | None = opt(None, "bearer token sent with every request")
    send_token_ids: bool = opt(False, "send prompts as token id lists (exact lengths; the server "
                                      "must accept them)")
    timeout: float = opt(3600.0, "per-request timeout in seconds", gt=0)


@dataclass(frozen=True, slots=True)
class CompareOptions(_Checked):
    """``bench compare``: the KV budget of the reservation/paged pair, and which policies."""

    kv_budget_requests: int = opt(8, "KV pool for the reservation/paged pair: this many "
                                     "worst-case requests", min=1)
    policies: str | None = opt(None, "comma-separated subset of: no-batching,static,dynamic,"
                                     "continuous,continuous+reservation,continuous+paged")


@dataclass(frozen=True, slots=True)
class ScenarioOptions(_Checked):
    """``bench scenario NAME``'s own flags besides the scenario's parameters."""

    workload_seed: int = _seed()


@dataclass(frozen=True, slots=True)
class SoakOptions(_Checked):
    """``bench soak``: the loopback server to soak, for how long, with how many clients."""

    base_url: str = opt("http://127.0.0.1:8000", "loopback server root")
    duration: float = opt(1200.0, "90, 90s, 20m, 1h (after the warm-up)",
                          parse=parse_duration_flag, show_default="20m")
    warmup: float | None = opt(None, "at least this long (default: a tenth of --duration, 5 s "
                                     "to 120 s), then until RSS settles", parse=parse_duration_flag)
    max_warmup: float | None = opt(None, "at most this long (default: a quarter of --duration)",
                                   parse=parse_duration_flag)
    concurrency: int = opt(8, "clients, one request at a time each", min=1)
    api_key: str | None = opt(None, "bearer token sent with every request")
    model: str | None = opt(None, "default: first of GET /v1/models")
    server_pid: int | None = opt(None, "read RSS from /proc (default: /metrics "
                                       "process_resident_memory_bytes)", min=1)
    max_requests: int = opt(200_000, "stop after this many", min=1)
    max_body_bytes: int = opt(1 << 20, "the server's body cap (oversize clients send a bit more)",
                              min=1)
    timeout: float = opt(120.0, "per-request limit in seconds", gt=0)
    rss_tolerance: float = opt(0.10, "allowed RSS growth after the warm-up (0.10 = 10%%)", min=0)
    seed: int = opt(0, "the clients' random seed", min=0)
    output_dir: str | None = opt(None, "default bench-results/soak-<date>")


# Each subcommand's own option classes, in the order their flags are added (groups: title).
BENCH_OPTIONS: dict[str, tuple[tuple[type, str | None], ...]] = {
    "offline": ((WorkloadOptions, "workload"), (ReportOptions, "report")),
    "serve": ((HttpBenchOptions, None), (WorkloadOptions, "workload"), (ReportOptions, "report")),
    "compare": ((CompareOptions, None), (WorkloadOptions, "workload"), (ReportOptions, "report")),
    "scenario": ((ScenarioOptions, None), (ReportOptions, "report")),
    "soak": ((SoakOptions, None),),
}


def options_from(command: str, args: argparse.Namespace) -> dict[type, Any]:
    """Each of ``command``'s option classes built from the parsed flags (raises ``ConfigError``
    naming the flag when a value is out of bounds)."""
    return {cls: config_from_args(cls, args) for cls, _ in BENCH_OPTIONS[command]}
