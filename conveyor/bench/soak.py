"""``conveyor bench soak``: hostile and ordinary clients against a server for a long time, then
the checks that say the server came through whole.

Owns the run (a warm-up, then ``concurrency`` workers each sending one request at a time, of a
kind drawn from ``MIX``, until the duration or ``max_requests`` is reached), the RSS samples and
the final verdict. The warm-up runs the same mix for at least ``warmup`` seconds and then until
the server's RSS settles (less than a tenth of ``rss_tolerance`` growth over one more window),
at most ``max_warmup`` seconds: oneDNN and ideep cache a compiled primitive per GEMM shape (up to
1,024 each, ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` / ``LRU_CACHE_CAPACITY``), so a server's RSS
climbs by up to a few hundred MiB until every batch size it meets has been seen. The checks, in
``SoakReport.checks``:

- no request lost: every request got a complete answer, a clean 4xx or was left by its client
  (``soak_clients.Outcome``); ``failed`` is 0 for every kind;
- the KV pool is whole: once the server is idle, ``kv_cache_free_blocks`` equals
  ``kv_cache_total_blocks`` (from ``/metrics``);
- memory is flat: the server's RSS at the end is at most ``1 + rss_tolerance`` times its RSS right
  after the warm-up (``/proc/<server_pid>`` or ``process_resident_memory_bytes``);
- ``/health`` answers 200.

Invariants: only a loopback server is ever targeted; every request and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import httpx

from conveyor.bench.soak_clients import ClientResult, Kind, Outcome, SoakTarget, run_client
from conveyor.bench.soak_probe import ServerProbe, first_model
from conveyor.errors import InvalidRequestError

# How often each kind is drawn.
MIX: dict[Kind, float] = {Kind.VALID: 0.4, Kind.INVALID: 0.15, Kind.BAD_JSON: 0.08,
                          Kind.OVERSIZE: 0.05, Kind.CANCELLED: 0.17, Kind.SLOW_READER: 0.15}
_MAX_FAILURE_SAMPLES = 20
_SAMPLE_EVERY_S = 5.0


@dataclass(frozen=True, slots=True)
class SoakConfig:
    """warmup_s None: a tenth of the duration, between 5 s and 120 s; max_warmup_s None: the
    larger of that and a quarter of the duration."""

    base_url: str
    duration_s: float
    concurrency: int = 8
    warmup_s: float | None = None
    max_warmup_s: float | None = None
    api_key: str | None = None
    model: str | None = None
    server_pid: int | None = None
    max_requests: int = 200_000
    max_body_bytes: int = 1 << 20
    timeout_s: float = 120.0
    idle_timeout_s: float = 120.0
    rss_tolerance: float = 0.10
    seed: int = 0

    def __post_init__(self) -> None:
        check_loopback(self.base_url)
        for name in ("duration_s", "concurrency", "max_requests", "max_body_bytes", "timeout_s"):
            if getattr(self, name) <= 0:
                raise InvalidRequestError(f"--{name.removesuffix('_s').replace('_', '-')} "
                                          "must be positive")

    @property
    def warmup(self) -> float:
        if self.warmup_s is not None:
            return self.warmup_s
        return min(120.0, max(5.0, self.duration_s / 10))

    @property
    def max_warmup(self) -> float:
        if self.max_warmup_s is not None:
            return max(self.max_warmup_s, self.warmup)
        return max(self.warmup, self.duration_s / 4)


@dataclass(slots=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(slots=True)
class SoakReport:
    config: dict
    seconds: float = 0.0
    num_requests: int = 0
    warmup_seconds: float = 0.0
    warmup_settled: bool = False
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    cases: dict[str, int] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    rss_samples: list[tuple[float, int]] = field(default_factory=list)
    load_samples: list[tuple[float, float]] = field(default_factory=list)   # 1-min load average
    num_cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    rss_after_warmup: int | None = None
    rss_final: int | None = None
    kv_free_blocks: int | None = None
    kv_total_blocks: int | None = None
    health_status: int | None = None
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def to_json(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def check_loopback(base_url: str) -> None:
    host = urlsplit(base_url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise InvalidRequestError(f"the soak only targets a server on this machine (127.0.0.1, "
                                  f"::1 or localhost), not {host!r}: it sends hostile traffic")


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``20m`` or ``1h``."""
    units = {"s": 1, "m": 60, "h": 3600}
    scale = units.get(text[-1:].lower(), 1)
    number = text[:-1] if text[-1:].lower() in units else text
    try:
        seconds = float(number) * scale
    except ValueError:
        raise InvalidRequestError(f"a duration is like 90, 90s, 20m or 1h, not {text!r}") from None
    if not seconds > 0:
        raise InvalidRequestError(f"a duration must be positive, got {text!r}")
    return seconds


def run_soak(config: SoakConfig, log=print) -> SoakReport:
    """Run the soak against ``config.base_url`` and return its report (checks filled in)."""
    return asyncio.run(_soak(config, log))


async def _soak(config: SoakConfig, log) -> SoakReport:
    report = SoakReport(config=asdict(config))
    results: list[ClientResult] = []
    limits = httpx.Limits(max_connections=4 * config.concurrency)
    async with httpx.AsyncClient(timeout=config.timeout_s, limits=limits) as client:
        probe = ServerProbe(client, config.base_url, config.api_key, config.server_pid)
        model = config.model or await first_model(client, config.base_url, config.api_key)
        target = SoakTarget(config.base_url.rstrip("/"), model, config.api_key,
                            config.max_body_bytes, config.timeout_s)
        rng = random.Random(config.seed)
        start = time.monotonic()
        log(f"soak: warm-up of {config.warmup:.0f} to {config.max_warmup:.0f} s against "
            f"{config.base_url} ({model})")
        await _warm_up(config, client, target, rng, results, probe, report)
        await probe.wait_idle(config.idle_timeout_s)
        report.rss_after_warmup = await probe.rss()
        log(f"soak: running {config.duration_s:.0f} s with {config.concurrency} clients")
        sampler = asyncio.ensure_future(_sample_rss(probe, report, start))
        try:
            await _workers(config, client, target, rng, results, config.duration_s)
        finally:
            sampler.cancel()
        await probe.wait_idle(config.idle_timeout_s)
        report.seconds = time.monotonic() - start
        await _final_state(probe, report)
    _tally(report, results, start)
    report.checks = evaluate(report, config.rss_tolerance)
    return report


async def _warm_up(config: SoakConfig, client: httpx.AsyncClient, target: SoakTarget,
                   rng: random.Random, results: list[ClientResult], probe: ServerProbe,
                   report: SoakReport) -> None:
    """Every kind once, the mix for ``warmup`` seconds, then windows until RSS settles."""
    start = time.monotonic()
    for kind in Kind:
        results.append(await run_client(kind, client, target, rng))
    await _workers(config, client, target, rng, results, config.warmup)
    window = max(5.0, config.warmup / 4)
    previous = await probe.rss()
    while previous is not None and time.monotonic() - start + window <= config.max_warmup:
        await _workers(config, client, target, rng, results, window)
        current = await probe.rss()
        if current is not None and current <= previous * (1 + config.rss_tolerance / 10):
            report.warmup_settled = True
            break
        previous = current
    report.warmup_seconds = time.monotonic() - start


async def _workers(config: SoakConfig, client: httpx.AsyncClient, target: SoakTarget,
                   rng: random.Random, results: list[ClientResult], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    kinds, weights = list(MIX), list(MIX.values())

    async def worker(seed: int) -> None:
        worker_rng = random.Random(seed)
        while time.monotonic() < deadline and len(results) < config.max_requests:
            kind = worker_rng.choices(kinds, weights)[0]
            results.append(await run_client(kind, client, target, worker_rng))

    await asyncio.gather(*(worker(rng.getrandbits(64)) for _ in range(config.concurrency)))


async def _sample_rss(probe: ServerProbe, report: SoakReport, start: float) -> None:
    """RSS of the server and this machine's load, every few seconds: a server starved of CPU
    (load well above the core count) answers slowly, and the report must say so."""
    while True:
        rss = await probe.rss()
        at = round(time.monotonic() - start, 1)
        if rss is not None:
            report.rss_samples.append((at, rss))
        report.load_samples.append((at, os.getloadavg()[0]))
        await asyncio.sleep(_SAMPLE_EVERY_S)


def load_note(report: SoakReport) -> str | None:
    """A warning line when the machine was oversubscribed during the run, else None."""
    if not report.load_samples:
        return None
    peak = max(load for _, load in report.load_samples)
    mean = sum(load for _, load in report.load_samples) / len(report.load_samples)
    if mean <= report.num_cpus:
        return None
    return (f"warning: the machine was oversubscribed (load average mean {mean:.1f}, peak "
            f"{peak:.1f} on {report.num_cpus} CPUs): the server was starved of CPU, so "
            "timeouts here measure the machine, not the server; soak on a quiet machine")


async def _final_state(probe: ServerProbe, report: SoakReport) -> None:
    gauges = await probe.gauges()
    report.kv_free_blocks = int(gauges.get("conveyor:kv_cache_free_blocks", -1))
    report.kv_total_blocks = int(gauges.get("conveyor:kv_cache_total_blocks", -1))
    report.rss_final = await probe.rss()
    report.health_status = await probe.health()


def _tally(report: SoakReport, results: list[ClientResult], start: float) -> None:
    report.num_requests = len(results)
    counts = {kind.value: Counter() for kind in Kind}
    for r in results:
        counts[r.kind.value][r.outcome.value] += 1
    report.counts = {k: {o.value: c[o.value] for o in Outcome} for k, c in counts.items()}
    report.cases = dict(Counter(f"{r.kind.value}: {r.case}" for r in results).most_common())
    report.failures = [{"kind": r.kind.value, "case": r.case, "status": r.status,
                        "at_s": round(r.started - start, 1), "detail": r.detail}
                       for r in results if r.outcome is Outcome.FAILED][:_MAX_FAILURE_SAMPLES]


def evaluate(report: SoakReport, rss_tolerance: float) -> list[Check]:
    """The soak's verdict, one ``Check`` per assertion (pure: reads the report only)."""
    failed = sum(c[Outcome.FAILED.value] for c in report.counts.values())
    checks = [Check("no request lost", report.num_requests > 0 and failed == 0,
                    f"{failed} failed of {report.num_requests}"),
              Check("KV blocks all free", report.kv_total_blocks is not None
                    and report.kv_total_blocks > 0
                    and report.kv_free_blocks == report.kv_total_blocks,
                    f"{report.kv_free_blocks}/{report.kv_total_blocks} free once idle")]
    warm, final = report.rss_after_warmup, report.rss_final
    if warm and final:
        growth = final / warm - 1
        checks.append(Check("RSS flat", growth <= rss_tolerance,
                            f"{warm / 2**20:.0f} MiB after warm-up, {final / 2**20:.0f} MiB at "
                            f"the end ({growth:+.1%}, limit {rss_tolerance:+.0%})"))
    else:
        checks.append(Check("RSS flat", False, "no RSS reading: pass --server-pid, or serve "
                                               "process_resident_memory_bytes on /metrics"))
    checks.append(Check("/health 200", report.health_status == 200,
                        f"/health answered {report.health_status}"))
    return checks


def format_report(report: SoakReport) -> str:
    """The console summary: outcomes per kind, a few failures, then every check."""
    settled = "RSS settled" if report.warmup_settled else "RSS had not settled"
    lines = [f"soak: {report.num_requests} requests in {report.seconds:.0f} s (warm-up "
             f"{report.warmup_seconds:.0f} s, {settled})",
             f"{'kind':<12}" + "".join(f"{o.value:>11}" for o in Outcome)]
    for kind, counts in report.counts.items():
        lines.append(f"{kind:<12}" + "".join(f"{counts[o.value]:>11}" for o in Outcome))
    for f in report.failures[:10]:
        lines.append(f"  failed {f['kind']} ({f['case']}, HTTP {f['status']}, sent at "
                     f"{f['at_s']:.0f} s): {f['detail']}")
    for check in report.checks:
        lines.append(f"[{'ok' if check.passed else 'FAIL'}] {check.name}: {check.detail}")
    note = load_note(report)
    if note:
        lines.append(note)
    return "\n".join(lines)
