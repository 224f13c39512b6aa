"""``conveyor bench <sub>``'s own flags are generated from the option dataclasses in
``conveyor.bench.options`` (name, help, default), like ``serve``'s; bad values exit 2 in one line."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from conveyor.bench.options import BENCH_OPTIONS, SoakOptions, WorkloadOptions
from conveyor.bench.scenarios.params import SCENARIO_PARAMS
from conveyor.cli import bench
from conveyor.cli import main as cli_main
from conveyor.cli.args import LogConfig
from conveyor.config import ENGINE_GROUPS
from conveyor.config_flags import config_from_args, flag_specs



def _names(cls) -> set[str]:
    """Every spelling of ``cls``'s flags (a bool's ``--no-`` form too)."""
    names = set()
    for spec in flag_specs(cls):
        names.update(spec.option_strings, spec.negative_aliases)
        if spec.kwargs.get("action") is argparse.BooleanOptionalAction:
            names.add("--no-" + spec.name[2:])
    return names


ENGINE_FLAGS = set().union(*(_names(cls) for cls in (*ENGINE_GROUPS, LogConfig)))


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _bench_parsers() -> dict[str, argparse.ArgumentParser]:
    root = argparse.ArgumentParser(prog="conveyor")
    bench.add_parser(root.add_subparsers())
    subs = dict(_subparsers(_subparsers(root)["bench"]))
    scenario = subs.pop("scenario")
    subs.update({f"scenario {n}": p for n, p in _subparsers(scenario).items()})
    return subs


def _generated(command: str) -> set[str]:
    names = {"-h", "--help"}
    for cls, _ in BENCH_OPTIONS[command.split()[0]]:
        names |= _names(cls)
    if command.startswith("scenario "):
        names.update("--" + f.name.replace("_", "-")
                     for f in dataclasses.fields(SCENARIO_PARAMS[command.split()[1]]))
    return names


@pytest.mark.parametrize("command", sorted(_bench_parsers()))
def test_every_bench_flag_is_a_field(command):
    parser = _bench_parsers()[command]
    given = {n for a in parser._actions for n in a.option_strings}
    if command not in ("serve", "soak"):          # these two drive a server: no engine flags
        given -= ENGINE_FLAGS
    assert given == _generated(command)
    args = parser.parse_args([])
    for cls, _ in BENCH_OPTIONS[command.split()[0]]:
        for f in dataclasses.fields(cls):
            spec = next(s for s in flag_specs(cls) if s.field == f.name)
            assert spec.name == "--" + f.name.replace("_", "-")
            assert spec.kwargs["help"].startswith(f.metadata["help"])
            assert getattr(args, f.name) == f.default
        assert config_from_args(cls, args) == cls()


def test_flags_keep_their_spellings_and_parse():
    parsers = _bench_parsers()
    args = parsers["serve"].parse_args([
        "--goodput", "ttft:500", "itl:100", "--no-plots", "--no-progress", "--send-token-ids",
        "--price-per-hour", "2.5", "--request-rate", "1,2,inf", "--prompt-len", "uniform:4:8"])
    assert (args.plots, args.progress, args.send_token_ids) == (False, False, True)
    opts = config_from_args(WorkloadOptions, args)
    assert opts.goodput == ("ttft:500", "itl:100") and args.price_per_hour == 2.5
    soak = config_from_args(SoakOptions, parsers["soak"].parse_args(
        ["--duration", "10s", "--warmup", "2m", "--max-warmup", "1h"]))
    assert (soak.duration, soak.warmup, soak.max_warmup) == (10.0, 120.0, 3600.0)
    assert SoakOptions().duration == 1200.0


HOSTILE = [
    ("offline", "--goodput", "ttft:-1"), ("offline", "--goodput", "latency:5"),
    ("offline", "--request-rate", "0"), ("offline", "--request-rate", "fast"),
    ("offline", "--prompt-len", "uniform:9"), ("offline", "--burstiness", "nan"),
    ("offline", "--burstiness", "0"), ("offline", "--num-prompts", "0"),
    ("offline", "--price-per-hour", "inf"), ("offline", "--workload-seed", "x"),
    ("serve", "--max-concurrency", "0"), ("serve", "--timeout", "-1"),
    ("compare", "--kv-budget-requests", "0"),
    ("soak", "--duration", "0"), ("soak", "--duration", "inf"), ("soak", "--duration", "soon"),
    ("soak", "--warmup", "-3s"), ("soak", "--concurrency", "0"), ("soak", "--timeout", "nan"),
    ("soak", "--rss-tolerance", "-0.1"), ("soak", "--max-body-bytes", "0"),
]


@pytest.mark.parametrize("command,flag,value", HOSTILE)
def test_hostile_bench_values_exit_in_one_line(command, flag, value, capsys, monkeypatch):
    def started(*args, **kwargs):
        raise AssertionError("the run started")
    for name in ("_engine_factory", "build_workload", "_serve_tokenizer"):
        monkeypatch.setattr(bench, name, started)
    monkeypatch.setattr("conveyor.bench.soak.run_soak", started)
    try:
        code = cli_main(["bench", command, f"{flag}={value}"])
    except SystemExit as exc:          # argparse refuses it while parsing
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in err
