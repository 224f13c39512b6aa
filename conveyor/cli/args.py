"""Engine flags shared by every subcommand, generated from the engine's config dataclasses
(``conveyor.config``: one field, one flag; see ``conveyor.config_flags``)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

from conveyor.config import ENGINE_GROUPS, engine_config_from_kwargs
from conveyor.config_flags import add_config_flags, config_values, opt, parse_bytes

__all__ = ["LogConfig", "add_engine_args", "engine_kwargs", "parse_bytes"]


@dataclass(frozen=True, slots=True)
class LogConfig:
    """How much the command logs."""

    log_level: Literal["debug", "info", "warning", "error"] = opt("info", "logging threshold")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("engine")
    for config in (*ENGINE_GROUPS, LogConfig):
        add_config_flags(group, config)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The engine flags as ``engine_config_from_kwargs`` keyword arguments (flags left out give
    None, i.e. the field's default), checked now: a bad value raises ``ConfigError`` at start."""
    kwargs: dict = {}
    for config in ENGINE_GROUPS:
        kwargs.update(config_values(config, args))
    engine_config_from_kwargs(**kwargs)
    return kwargs
