"""Flags generated from the config dataclasses: one field, one flag (name, help, choices,
default); hostile values are refused at start in one line (``ConfigError``), never a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Literal

import pytest
import torch

from conveyor.cli import main as cli_main
from conveyor.cli import serve
from conveyor.cli.args import LogConfig, engine_kwargs
from conveyor.config import (ENGINE_GROUPS, CacheConfig, EngineConfig, ModelConfig,
                             SchedulerConfig, engine_config_from_kwargs)
from conveyor.config_flags import add_config_flags, config_from_args, field_types, flag_specs
from conveyor.errors import ConfigError, InvalidRequestError
from conveyor.server import app as server_module
from conveyor.ray.config import RayConfig
from conveyor.server.server_config import ServerConfig

SERVE_CONFIGS = (ServerConfig, *ENGINE_GROUPS, LogConfig, RayConfig)


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conveyor")
    serve.add_parser(parser.add_subparsers())
    return parser


def _flag_fields(cls):
    return [f for f in dataclasses.fields(cls) if f.metadata.get("flag", True)]


@pytest.mark.parametrize("cls", SERVE_CONFIGS, ids=lambda c: c.__name__)
def test_every_field_is_a_flag_with_its_name_doc_choices_and_default(cls):
    args = _serve_parser().parse_args(["serve"])
    specs = {s.field: s for s in flag_specs(cls)}
    assert list(specs) == [f.name for f in _flag_fields(cls)]
    for f in _flag_fields(cls):
        spec = specs[f.name]
        assert spec.name == "--" + f.name.replace("_", "-")
        assert spec.kwargs["help"].startswith(f.metadata["help"])
        parsed = getattr(args, f.name)
        assert parsed == (f.default if not f.metadata.get("repeat") else None)
        hint = str(field_types(cls)[f.name])
        if "Literal" in hint:
            assert [repr(c) for c in spec.choices if c is not None] == [
                repr(c) for c in spec.kwargs["choices"]]
            assert all(repr(c) in hint for c in spec.kwargs["choices"])
    # the defaults the flags give build exactly the default config
    assert config_from_args(cls, args) == cls()


def test_help_lists_every_flag_and_alias(capsys):
    with pytest.raises(SystemExit):
        cli_main(["serve", "--help"])
    text = capsys.readouterr().out
    for cls in SERVE_CONFIGS:
        for spec in flag_specs(cls):
            for name in (*spec.option_strings, *spec.negative_aliases):
                assert name in text, name
    for legacy in ("--num-kv-blocks", "--kv-cache-memory", "--no-chunked-prefill",
                   "--no-prefix-caching", "--batch-timeout", "--swap-space", "--tenant-weight",
                   "--api-key", "-q"):
        assert legacy in text


def test_generate_flags_are_its_options_fields():
    from conveyor.cli import generate
    parser = argparse.ArgumentParser(prog="conveyor")
    generate.add_parser(parser.add_subparsers())
    assert config_from_args(generate.GenerateOptions,
                            parser.parse_args(["generate"])) == generate.GenerateOptions()
    args = parser.parse_args(["generate", "--stop", "a", "--stop", "b", "--chat", "--top-k", "5"])
    opts = config_from_args(generate.GenerateOptions, args)
    assert (opts.stop, opts.chat, opts.top_k) == (("a", "b"), True, 5)
    assert [s.name for s in flag_specs(generate.GenerateOptions)] == [
        "--" + f.name.replace("_", "-") for f in dataclasses.fields(generate.GenerateOptions)]


def test_legacy_spellings_set_the_fields():
    args = _serve_parser().parse_args([
        "serve", "--num-kv-blocks", "7", "--kv-cache-memory", "2MiB", "--no-chunked-prefill",
        "--no-prefix-caching", "--batch-timeout", "0.5", "--swap-space", "1GiB",
        "--tenant-weight", "a=2", "--tenant-weight", "b=0.5", "-q", "int8",
        "--api-key", "k1", "--api-key", "k2:tenant=t"])
    kw = engine_kwargs(args)
    assert (kw["num_blocks"], kw["kv_cache_bytes"], kw["batch_timeout_s"]) == (7, 2 << 20, 0.5)
    assert kw["enable_chunked_prefill"] is False and kw["enable_prefix_caching"] is False
    assert kw["swap_space_bytes"] == 1 << 30 and kw["quantization"] == "int8"
    config = engine_config_from_kwargs(**kw)
    assert config.scheduler.tenant_weights == (("a", 2.0), ("b", 0.5))
    keys = config_from_args(ServerConfig, args).api_keys
    assert [k.tenant for k in keys] == [None, "t"]


def test_config_errors_are_their_own_class():
    with pytest.raises(ConfigError, match="max_num_seqs must be at least 1") as err:
        SchedulerConfig(max_num_seqs=0)
    assert err.value.param == "max_num_seqs" and not isinstance(err.value, InvalidRequestError)
    with pytest.raises(ConfigError, match="unknown engine option"):
        engine_config_from_kwargs(max_num_seq=4)
    with pytest.raises(ConfigError, match="batching must be one of"):
        SchedulerConfig(batching="greedy")
    with pytest.raises(ConfigError, match="finite"):
        SchedulerConfig(batch_timeout_s=math.nan)
    with pytest.raises(ConfigError, match="power of two"):
        CacheConfig(block_size=24)
    with pytest.raises(ConfigError, match="device"):
        ModelConfig(device="tpu")
    with pytest.raises(ConfigError, match="port must be at most 65535"):
        ServerConfig(port=65536)
    with pytest.raises(ConfigError, match="greater than 0"):
        ServerConfig(request_timeout=0)
    assert ServerConfig(watchdog_timeout=0).watchdog_timeout is None
    assert EngineConfig().model.attention_backend == "auto"
    assert SchedulerConfig(record_steps=True).record_steps is True


def _hostile_values(spec) -> list[str]:
    """Values of one flag no start should accept."""
    if spec.kwargs.get("action") is argparse.BooleanOptionalAction:
        return []
    if spec.choices is not None:
        return ["not-a-choice"]
    kind = spec.kwargs.get("type")
    if kind in (int, float) or getattr(kind, "__name__", "") in ("finite_float", "parse_bytes"):
        values = ["nan", "-1", "1e400", "x"]
        return values if spec.field == "watchdog_timeout" else ["0", *values]
    return []


HOSTILE = [(spec.name, value) for cls in SERVE_CONFIGS for spec in flag_specs(cls)
           for value in _hostile_values(spec)
           # 0 blocks/bytes of swap etc. are refused; these optional limits accept any positive
           if (spec.name, value) not in {("--seed", "0"), ("--shutdown-timeout", "0"),
                                         ("--batch-timeout-s", "0"),
                                         ("--long-prefill-token-threshold", "0"),
                                         ("--replicas", "0")}]      # 0: no Ray, one server
HOSTILE += [("--api-key", ""), ("--api-key", " k"), ("--tenant-weight", "a=0"),
            ("--tenant-weight", "=1"), ("--tenant-weight", "a=nan"), ("--host", ""),
            ("--served-model-name", ""), ("--max-model-len", "99999999999"),
            ("--max-num-seqs", "1000000000"), ("--block-size", "3"), ("--block-size", "1048576"),
            ("--port", "65536"), ("--device", "tpu"), ("--device", "cuda:x"),
            ("--kv-cache-memory", "12 parsecs"), ("--max-n", "100000"),
            ("--kv-events-config", "{"), ("--kv-events-config", "[]"),
            ("--kv-events-config", '{"publisher": "carrier-pigeon"}'),
            ("--autoscaling-config", "{"), ("--autoscaling-config", "[]")]


@pytest.mark.parametrize("flag,value", HOSTILE)
def test_hostile_flag_values_exit_in_one_line(flag, value, capsys, monkeypatch):
    def started(*args, **kwargs):
        raise AssertionError("the server started")
    monkeypatch.setattr(server_module, "build_app", started)
    try:
        code = cli_main(["serve", flag, value])
    except SystemExit as exc:          # argparse refuses it while parsing
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in err


def test_generated_flags_parse_into_a_subset_parser():
    @dataclasses.dataclass(frozen=True)
    class Tiny:
        mode: Literal["a", "b"] = dataclasses.field(default="a", metadata={"help": "the mode"})
        count: int = dataclasses.field(default=3, metadata={"help": "how many"})
        on: bool = dataclasses.field(default=False, metadata={"help": "switch"})
    parser = argparse.ArgumentParser()
    add_config_flags(parser, Tiny)
    assert config_from_args(Tiny, parser.parse_args([])) == Tiny()
    args = parser.parse_args(["--mode", "b", "--count", "5", "--on"])
    assert config_from_args(Tiny, args) == Tiny("b", 5, True)
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])


def test_a_kv_cache_larger_than_the_machine_is_refused_before_allocating():
    from conveyor import platform
    from conveyor.engine.builder import _check_fits
    cpu = torch.device("cpu")
    have = platform.memory_bytes(cpu)
    assert have is not None and have > 0
    assert _check_fits(4, 1 << 20, cpu, "--num-blocks") == 4
    with pytest.raises(ConfigError, match="--kv-cache-bytes: .* KV blocks need"):
        _check_fits(have // 4096 + 1, 4096, cpu, "--kv-cache-bytes")


@pytest.mark.parametrize("text, message", [
    ("{bad", "speculative_config is not JSON"),
    ('["ngram"]', "speculative_config: it must be a JSON object"),
    ('{"method": "ngram", "num_spec_tokens": 4}', "unknown key(s) ['num_spec_tokens']; known: ["),
])
def test_json_options_share_one_parser_and_name_their_field(text, message):
    """--speculative-config and --kv-events-config go through config_from_json: a one-line
    ConfigError naming the option's field; a valid object builds the config, None stays None."""
    from conveyor.config import SpeculativeConfig
    from conveyor.kv_events.config import KVEventsConfig
    with pytest.raises(ConfigError) as err:
        SpeculativeConfig.from_json(text)
    assert message in str(err.value) and err.value.param == "speculative_config"
    with pytest.raises(ConfigError) as err:
        KVEventsConfig.from_json(text.replace("method", "publisher"))
    assert err.value.param == "kv_events_config"
    spec = SpeculativeConfig.from_json('{"method": "ngram", "num_speculative_tokens": 3}')
    assert spec.method == "ngram" and spec.num_speculative_tokens == 3
    assert SpeculativeConfig.from_json(spec) is spec and SpeculativeConfig.from_json(None) is None
