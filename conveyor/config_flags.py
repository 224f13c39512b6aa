"""Command-line flags generated from frozen config dataclasses: each option is defined once.

Every field of a config dataclass is one flag. Its name is the field's (``max_num_batched_tokens``
-> ``--max-num-batched-tokens``), its help the field's ``metadata["help"]``, its choices the values
of its ``Literal`` type, its default the dataclass default, and it lands in the parsed namespace
under the field's name. ``field(metadata=...)`` keys:

- ``help``: the help text (every flag has one); the default is appended unless it says "default";
- ``aliases``: older spellings that keep working (``("--num-kv-blocks",)``); for a bool field an
  alias starting with ``--no-`` sets it False;
- ``parse``: ``str -> value`` for the field's element (sizes such as ``4GiB``, ``KEY=VALUE``
  pairs); it raises ``argparse.ArgumentTypeError`` with a one-line message;
- ``repeat``: the flag may be given several times; the field gets a tuple of the values;
- ``nargs``: the flag takes several values at once (``"+"``); the field gets a tuple of them;
- ``choices``: the accepted values where they are a registry's names rather than a ``Literal``;
- ``metavar``; ``show_default``: how the default reads in the help (e.g. ``"1GiB"``);
- ``flag``: False for a field set only programmatically (the engine's ``record_steps``).

Float flags accept finite numbers only (NaN and infinity are refused at parse time). The values
are checked by the dataclass's own ``__post_init__``, which raises ``ConfigError``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import types
import typing
from typing import Any, Callable, Literal

from conveyor.errors import ConfigError


@dataclasses.dataclass(frozen=True, slots=True)
class FlagSpec:
    """The argparse view of one config field."""

    field: str
    option_strings: tuple[str, ...]
    kwargs: dict
    negative_aliases: tuple[str, ...] = ()
    choices: tuple | None = None
    default: Any = None

    @property
    def name(self) -> str:
        return self.option_strings[0]


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of each field (once per class)."""
    return typing.get_type_hints(cls)


def literal_choices(hint: Any) -> tuple | None:
    """The values of a ``Literal[...]`` (or ``Literal[...] | None``) annotation, else None."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    if _is_union(hint):
        for arg in typing.get_args(hint):
            if typing.get_origin(arg) is Literal:
                return typing.get_args(arg)
    return None


def opt(default: Any, help: str, **meta: Any) -> Any:
    """A config field: ``default``, its flag's ``help`` and the other metadata keys above, plus
    bounds the field's ``__post_init__`` checks through ``check_fields``: ``min`` / ``max``
    (inclusive) and ``gt`` (exclusive) for numbers (None passes where the type allows it)."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def field_values(hint: Any) -> tuple:
    """The values a ``Literal`` type alias allows."""
    return literal_choices(hint) or ()


def check_fields(config: Any) -> None:
    """Raise ``ConfigError`` naming the field (and its flag) when a field holds a value outside
    its ``Literal`` choices or its ``min`` / ``max`` bounds, or a float that is not finite."""
    for f in dataclasses.fields(config):
        hint, value = field_types(type(config))[f.name], getattr(config, f.name)
        if value is None and _optional(hint):
            continue
        choices = literal_choices(hint) or f.metadata.get("choices")
        problem = _problem(value, choices, _base_type(hint), f.metadata)
        if problem:
            from conveyor.errors import ConfigError
            raise ConfigError(f"{f.name} {problem}; got {value!r} ({flag_name(f.name)})", f.name)


def _problem(value: Any, choices: tuple | None, base: Any, meta: typing.Mapping) -> str | None:
    if choices is not None:
        return None if value in choices else "must be one of " + ", ".join(map(repr, choices))
    if base in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return "must be a number"
    if base is float and not math.isfinite(value):
        return "must be a finite number"
    if base is int and not isinstance(value, int):
        return "must be an integer"
    lo, hi, above = meta.get("min"), meta.get("max"), meta.get("gt")
    if above is not None and not value > above:
        return f"must be greater than {above}"
    if lo is not None and value < lo:
        return f"must be at least {lo}"
    if hi is not None and value > hi:
        return f"must be at most {hi}"
    return None


def flag_specs(cls: type) -> list[FlagSpec]:
    """One ``FlagSpec`` per field of ``cls`` that is a flag, in field order."""
    return [_spec(f, field_types(cls)[f.name]) for f in dataclasses.fields(cls)
            if f.metadata.get("flag", True)]


def add_config_flags(parser: argparse.ArgumentParser | Any, cls: type,
                     title: str | None = None) -> None:
    """Add a flag for every field of ``cls`` (in an argument group ``title`` if given)."""
    group = parser.add_argument_group(title) if title else parser
    for spec in flag_specs(cls):
        group.add_argument(*spec.option_strings, **spec.kwargs)
        if spec.negative_aliases:
            group.add_argument(*spec.negative_aliases, dest=spec.field, action="store_false",
                               default=argparse.SUPPRESS, help=f"same as --no-{spec.name[2:]}")


def config_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The parsed value of each of ``cls``'s flags, keyed by field name (repeats as tuples)."""
    values = {}
    for spec in flag_specs(cls):
        value = getattr(args, spec.field)
        if spec.kwargs.get("action") == "append":     # repeated: a tuple; never given: the default
            value = spec.default if value is None else tuple(value)
        elif "nargs" in spec.kwargs and value is not None:
            value = tuple(value)
        values[spec.field] = value
    return values


def config_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """``cls`` built from the parsed flags (``overrides`` win); raises ``ConfigError``."""
    return cls(**{**config_values(cls, args), **overrides})


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _spec(f: dataclasses.Field, hint: Any) -> FlagSpec:
    meta = f.metadata
    if "help" not in meta:
        raise TypeError(f"config field {f.name} has no metadata['help']")
    names = (flag_name(f.name), *(a for a in meta.get("aliases", ()) if not a.startswith("--no-")))
    negative = tuple(a for a in meta.get("aliases", ()) if a.startswith("--no-"))
    choices = literal_choices(hint) or meta.get("choices")
    kwargs: dict[str, Any] = {"dest": f.name, "help": _help(meta, f.default)}
    base = _base_type(hint)
    if base is bool:
        kwargs.update(action=argparse.BooleanOptionalAction, default=f.default)
    else:
        kwargs.update(default=None if meta.get("repeat") else f.default,
                      type=meta.get("parse") or _parser_for(base, choices))
        if meta.get("repeat"):
            kwargs["action"] = "append"
        if choices is not None:
            kwargs["choices"] = [c for c in choices if c is not None]
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        if "nargs" in meta:
            kwargs["nargs"] = meta["nargs"]
    return FlagSpec(f.name, names, kwargs, negative, choices, f.default)


def _help(meta: typing.Mapping, default: Any) -> str:
    text = meta["help"]
    if "default" in text or default is dataclasses.MISSING:
        return text
    if isinstance(default, bool):    # "%(default)s": BooleanOptionalAction then adds nothing
        return f"{text} (default: %(default)s)"
    shown = meta.get("show_default", default)
    return f"{text} (default: {'none' if shown is None else shown})"


def _parser_for(base: Any, choices: tuple | None) -> Callable[[str], Any]:
    if choices is not None:
        return type(next(c for c in choices if c is not None))
    if base is float:
        return finite_float
    if base in (int, str):
        return base
    raise TypeError(f"no flag parser for {base!r}; give metadata['parse']")


def _base_type(hint: Any) -> Any:
    """``int | None`` -> int; ``Literal[...]`` -> its value type; tuple[...] -> tuple."""
    if _is_union(hint):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(rest[0]) if len(rest) == 1 else hint
    if typing.get_origin(hint) is Literal:
        return type(typing.get_args(hint)[0])
    return typing.get_origin(hint) or hint


def _optional(hint: Any) -> bool:
    return _is_union(hint) and type(None) in typing.get_args(hint)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40,
          "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """'512MiB', '4GiB', '1000000' -> bytes."""
    import re
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512MiB or 4GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def config_from_json(cls: type, value: Any, field: str) -> Any:
    """A config dataclass from a JSON-valued option (``--speculative-config``,
    ``--kv-events-config``): JSON text or a dict of its field names; None and an instance pass
    through. Raises ``ConfigError`` naming ``field`` for text that is not a JSON object or for a
    key the class has no field for (the dataclass checks the values)."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{field} is not JSON: {exc}", field) from None
    if not isinstance(value, dict):
        raise ConfigError(f"{field}: it must be a JSON object", field)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ConfigError(f"{field}: unknown key(s) {unknown}; known: {known}", field)
    return cls(**value)
