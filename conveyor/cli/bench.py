"""``conveyor bench offline | serve | compare | scenario | soak``: measure serving policies on a
workload, or soak a running server.

Thin: turns flags into a workload, an arrival process and engine keyword arguments (or a
scenario's parameters), then calls ``conveyor.bench``. Every run writes ``report.json``,
``report.html`` and PNG plots into ``--output-dir`` and prints a table; ``soak`` writes ``soak.json`` and exits 1 when a
check fails. See docs/bench.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os

from conveyor.cli.args import add_engine_args, engine_kwargs
from conveyor.bench.options import (BENCH_OPTIONS, ReportOptions, ScenarioOptions, SoakOptions,
                                     options_from)
from conveyor.config_flags import add_config_flags

logger = logging.getLogger("conveyor.bench")


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark batching policies in-process or over HTTP")
    bench_sub = p.add_subparsers(dest="bench_command", required=True)
    helps = {"offline": "drive conveyor's engine in-process",
             "serve": "load-test any OpenAI-compatible server over HTTP",
             "compare": "no batching vs static vs dynamic vs continuous, and reservation vs "
                        "paged KV, on one workload"}
    runs = {"offline": run_offline_cmd, "serve": run_serve_cmd, "compare": run_compare_cmd}
    for name, run in runs.items():
        cmd = bench_sub.add_parser(name, help=helps[name])
        _add_options(cmd, name)
        if name != "serve":
            add_engine_args(cmd)
        cmd.set_defaults(func=run)
    _add_scenario_parsers(bench_sub)
    soak = bench_sub.add_parser("soak", help="valid, invalid, cancelled and slow clients against "
                                             "a server on this machine; checks it comes through whole")
    _add_options(soak, "soak")
    soak.set_defaults(func=run_soak_cmd)


def _add_options(p, command: str) -> None:
    """``command``'s own flags, one per field of its option classes (``conveyor.bench.options``)."""
    for cls, title in BENCH_OPTIONS[command]:
        add_config_flags(p, cls, title)


# Scenario runs default to a batch of 16 and a 1024-token context (a small KV cache per engine).
_SCENARIO_ENGINE_DEFAULTS = {"max_num_seqs": 16, "max_model_len": 1024}


def _add_scenario_parsers(bench_sub) -> None:
    from conveyor.bench.scenarios.params import SCENARIO_PARAMS
    scn = bench_sub.add_parser("scenario", help="seeded experiments, runs side by side in one report")
    scn_sub = scn.add_subparsers(dest="scenario", required=True)
    for name, params in SCENARIO_PARAMS.items():
        p = scn_sub.add_parser(name, help=params.__doc__)
        g = p.add_argument_group(f"scenario {name}")
        for f in dataclasses.fields(params):
            default = "auto" if f.name == "request_rate" and f.default is None else f.default
            shown = f" (default {default})" if default is not None else ""
            g.add_argument("--" + f.name.replace("_", "-"), dest=f"scn_{f.name}", default=None,
                           type=f.metadata.get("type", type(f.default)), metavar=f.name.upper(),
                           help=f.metadata["help"] + shown)
        add_config_flags(g, ScenarioOptions)
        add_config_flags(p, ReportOptions, "report")
        add_engine_args(p)
        p.set_defaults(func=run_scenario_cmd, **_SCENARIO_ENGINE_DEFAULTS)


def build_workload(args, tokenizer):
    from conveyor.bench.datasets import load_workload_file
    from conveyor.bench.workloads import (LengthDist, WorkloadError, shared_prefix_workload,
                                          synthetic_workload)
    seed = args.workload_seed
    if args.dataset:
        fixed = LengthDist.parse(args.output_len) if args.output_len else None
        if fixed is not None and fixed.kind != "fixed":
            raise WorkloadError("with --dataset, --output-len is one number (it overrides the file's)")
        max_tokens = int(fixed.values[0]) if fixed is not None else None
        return load_workload_file(args.dataset, tokenizer, args.num_prompts, max_tokens, seed)
    n = args.num_prompts if args.num_prompts is not None else 64
    prompt = LengthDist.parse(args.prompt_len)
    output = LengthDist.parse(args.output_len or "uniform:16:256")
    vocab = tokenizer.vocab_size if tokenizer is not None else 32000
    if args.shared_prefix_len is not None:
        return shared_prefix_workload(n, args.shared_prefix_len, prompt, output, tokenizer, seed, vocab)
    return synthetic_workload(n, prompt, output, tokenizer, seed, vocab)


def rates_for(args, workload) -> list[float | None]:
    """--request-rate, else the file's own arrivals (None), else everything at once."""
    from conveyor.bench.arrivals import parse_rates
    if args.request_rate is not None:
        return parse_rates(args.request_rate)
    return [None] if workload.spec.get("file_arrivals") else [math.inf]


def _load_tokenizer(model: str | None):
    from conveyor.tokenizer import load_tokenizer
    from conveyor.weights.loader import resolve_model_path
    return load_tokenizer(resolve_model_path(model))


def _serve_tokenizer(path: str | None):
    """--tokenizer PATH, 'none', or (default) conveyor's default model's when it is installed."""
    from conveyor.errors import ModelLoadError
    if (path or "").lower() == "none":
        return None
    try:
        return _load_tokenizer(path)
    except ModelLoadError:
        if path is not None:
            raise
        logger.warning("no tokenizer (the default model is not installed): sending random token ids; "
                       "pass --tokenizer PATH for text prompts")
        return None


def _out_dir(args, mode: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return args.output_dir or os.path.join("bench-results", f"{mode}-{stamp}")


def _finish(meta: dict, runs, args, mode: str, scenario: dict | None = None) -> int:
    from conveyor.bench.console import format_table
    from conveyor.bench.metrics import parse_slos
    from conveyor.bench.suite import write_outputs
    out_dir = _out_dir(args, mode)
    report = write_outputs(meta, runs, out_dir, parse_slos(getattr(args, "goodput", None)),
                           plots=args.plots, scenario=scenario,
                           price_per_hour=args.price_per_hour)
    print(format_table(report))
    print(f"report: {os.path.join(out_dir, 'report.json')} (and report.html)")
    return 0


def _bench_engine_kwargs(args) -> dict:
    return dict(engine_kwargs(args), record_steps=True)


def _engine_factory(args):
    from conveyor.engine.llm_engine import LLMEngine
    return lambda kwargs: LLMEngine.from_kwargs(**kwargs)


def run_offline_cmd(args) -> int:
    from conveyor.bench.report import report_meta
    from conveyor.bench.suite import run_rates
    options_from("offline", args)     # bounds, in one line
    kwargs = _bench_engine_kwargs(args)
    engine = _engine_factory(args)(kwargs)
    workload = build_workload(args, engine.tokenizer)
    runs = run_rates(engine, args.batching, kwargs, workload, rates_for(args, workload),
                     args.burstiness, args.workload_seed, args.progress)
    meta = report_meta("offline", workload.spec, engine=runs[0].config)
    return _finish(meta, runs, args, "offline")


def run_compare_cmd(args) -> int:
    from conveyor.bench.report import report_meta
    from conveyor.bench.suite import compare_variants, kv_budget_blocks, run_variants
    options_from("compare", args)     # bounds, in one line
    workload = build_workload(args, _load_tokenizer(args.model))
    rates = rates_for(args, workload)
    kwargs = _bench_engine_kwargs(args)
    bs = args.block_size
    budget = kv_budget_blocks(workload, args.kv_budget_requests, bs)
    user_sized = args.num_blocks is not None or args.kv_cache_bytes is not None
    roomy = None if user_sized else args.max_num_seqs * -(-workload.max_request_tokens // bs)
    only = [p.strip() for p in args.policies.split(",")] if args.policies else None
    variants = compare_variants(args.max_num_seqs, budget, roomy, args.batch_timeout_s, only)
    runs = run_variants(_engine_factory(args), kwargs, variants, workload, rates,
                        args.burstiness, args.workload_seed, args.progress)
    meta = report_meta("compare", workload.spec, engine=dict(kwargs),
                       kv_budget={"requests": args.kv_budget_requests, "num_blocks": budget,
                                  "block_size": bs, "worst_case_tokens": workload.max_request_tokens})
    return _finish(meta, runs, args, "compare")


def run_serve_cmd(args) -> int:
    from conveyor.bench.http_client import run_http
    from conveyor.bench.offline import spec_delta
    from conveyor.bench.report import report_meta
    from conveyor.bench.server_counters import scrape_spec_counters
    from conveyor.bench.suite import workload_at
    options_from("serve", args)     # bounds, in one line
    workload = build_workload(args, _serve_tokenizer(args.tokenizer))
    runs = []
    auth = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    for rate in rates_for(args, workload):
        before = scrape_spec_counters(args.base_url, auth)
        run = run_http(args.base_url, workload_at(workload, rate, args.burstiness, args.workload_seed),
                       model=args.model, label="serve", max_concurrency=args.max_concurrency,
                       api_key=args.api_key, send_token_ids=args.send_token_ids,
                       progress=args.progress, timeout_s=args.timeout)
        run.request_rate, run.burstiness = rate, None if rate is None else args.burstiness
        spec = spec_delta(before, scrape_spec_counters(args.base_url, auth))
        run.engine_stats = None if spec is None else {"spec_decode": spec}
        runs.append(run)
    meta = report_meta("serve", workload.spec, server={k: v for k, v in runs[0].config.items()})
    return _finish(meta, runs, args, "serve")


def run_scenario_cmd(args) -> int:
    from conveyor.bench.report import report_meta
    from conveyor.bench.scenarios.params import SCENARIO_PARAMS, params_from
    from conveyor.bench.scenarios.plan import ScenarioContext, run_scenario
    from conveyor.bench.suite import jsonable
    options_from("scenario", args)     # bounds, in one line
    fields = dataclasses.fields(SCENARIO_PARAMS[args.scenario])
    params = params_from(args.scenario, {f.name: getattr(args, f"scn_{f.name}") for f in fields})
    kwargs = _bench_engine_kwargs(args)
    ctx = ScenarioContext(_engine_factory(args), kwargs, _load_tokenizer(args.model),
                          args.workload_seed, args.progress)
    result = run_scenario(args.scenario, ctx, params)
    meta = report_meta("scenario", result.workload_spec, engine=jsonable(kwargs),
                       scenario=args.scenario)
    section = {"name": result.name, "params": result.params, "findings": result.findings}
    return _finish(meta, result.runs, args, f"scenario-{args.scenario}", section)


def run_soak_cmd(args) -> int:
    """Exit 0 when every check passed, 1 otherwise; writes soak.json into the output directory."""
    import json

    from conveyor.bench.soak import SoakConfig, format_report, run_soak
    o = options_from("soak", args)[SoakOptions]
    config = SoakConfig(o.base_url, o.duration, o.concurrency, o.warmup, o.max_warmup, o.api_key,
                        o.model, o.server_pid, o.max_requests, o.max_body_bytes, o.timeout,
                        rss_tolerance=o.rss_tolerance, seed=o.seed)
    report = run_soak(config)
    out_dir = _out_dir(args, "soak")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "soak.json")
    with open(path, "w") as f:
        json.dump(report.to_json(), f, indent=1)
    print(format_report(report))
    print(f"report: {path}")
    return 0 if report.passed else 1
