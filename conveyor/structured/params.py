"""``StructuredOutputsParams``: what a request's output must match (pure Python, no backend).

Mirrors vLLM's ``StructuredOutputsParams``: exactly one of ``json`` (a JSON schema, as a dict or
a JSON string), ``regex``, ``choice`` (a list of strings), ``grammar`` (Lark or GBNF text),
``json_object`` (any JSON object) or ``structural_tag`` (vLLM's ``{"type": "structural_tag",
"structures": [...], "triggers": [...]}``, as a dict or a JSON string). Invariants:

- Construction validates the shape of the spec and raises ``InvalidRequestError`` naming
  ``structured_outputs.<field>``; whether a schema, regex or grammar compiles is the backend's
  check (``conveyor.structured.compile_service``), which reports the same way.
- An instance never changes: JSON given as a string is parsed once, dicts are copied, and
  ``key()`` (a SHA-256 of the compact JSON of the spec, key order kept) names the compiled grammar
  in the compile cache, so the same schema sent as a dict or as a string compiles once.
"""

from __future__ import annotations

import hashlib
import json as jsonlib
from dataclasses import dataclass, field
from typing import Any

from conveyor.errors import InvalidRequestError

MAX_SPEC_CHARS = 256 * 1024          # canonical JSON of the whole spec
MAX_CHOICES = 1024

_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass(frozen=True, slots=True, eq=False)
class StructuredOutputsParams:
    """Exactly one constraint; see the module docstring. Compared and hashed by ``key()``."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: dict | str | None = None
    # The request field errors about this spec name (default ``structured_outputs.<kind>``),
    # e.g. ``response_format.json_schema.schema``; not part of the spec or its key.
    field_name: str | None = None
    _canonical: str = field(default="", init=False, repr=False)
    _key: str = field(default="", init=False, repr=False)

    def __post_init__(self) -> None:
        given = [k for k in _KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            what = "none was" if not given else f"{', '.join(given)} were"
            raise InvalidRequestError(
                f"structured_outputs takes exactly one of {', '.join(_KINDS)}; {what} given",
                "structured_outputs")
        kind = given[0]
        param = self.field_name or f"structured_outputs.{kind}"
        value = _CHECKS[kind](getattr(self, kind), param)
        object.__setattr__(self, kind, value)
        canonical = _dumps({kind: value}, param)
        if len(canonical) > MAX_SPEC_CHARS:
            raise InvalidRequestError(
                f"{param} is {len(canonical)} characters; at most {MAX_SPEC_CHARS} are accepted",
                param)
        object.__setattr__(self, "_canonical", canonical)
        object.__setattr__(self, "_key", hashlib.sha256(canonical.encode()).hexdigest())

    @property
    def kind(self) -> str:
        """The one field that is set."""
        return next(k for k in _KINDS if getattr(self, k) is not None)

    @property
    def param(self) -> str:
        """The request field that errors about this spec name."""
        return self.field_name or f"structured_outputs.{self.kind}"

    def key(self) -> str:
        """A stable hash of the canonical spec (the compile cache's key)."""
        return self._key

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StructuredOutputsParams):
            return NotImplemented
        return self._canonical == other._canonical

    def __hash__(self) -> int:
        return hash(self._key)


def _dumps(value: Any, param: str) -> str:
    try:
        # Key order is kept: it is the order properties are generated in.
        return jsonlib.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"{param} is not JSON-serialisable: {exc}", param) from None


def _json_object_value(value: Any, param: str) -> dict:
    """A dict, or a JSON string holding one, as a private deep copy."""
    if isinstance(value, str):
        try:
            value = jsonlib.loads(value)
        except ValueError as exc:
            raise InvalidRequestError(f"{param} is not valid JSON: {exc}", param) from None
    if not isinstance(value, dict):
        raise InvalidRequestError(
            f"{param} must be a JSON object (or a string holding one), got {type(value).__name__}",
            param)
    return jsonlib.loads(_dumps(value, param))


def _check_text(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{param} must be a non-empty string", param)
    return value


def _check_choice(value: Any, param: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise InvalidRequestError(f"{param} must be a non-empty list of strings", param)
    if len(value) > MAX_CHOICES:
        raise InvalidRequestError(f"{param} has {len(value)} entries; at most {MAX_CHOICES}", param)
    if not all(isinstance(c, str) and c for c in value):
        raise InvalidRequestError(f"{param} entries must be non-empty strings", param)
    return tuple(value)


def _check_json_object(value: Any, param: str) -> bool:
    if value is not True:
        raise InvalidRequestError(
            f"{param} must be true (omit structured_outputs for free text)", param)
    return True


def _check_structural_tag(value: Any, param: str) -> dict:
    tag = _json_object_value(value, param)
    structures, triggers = tag.get("structures"), tag.get("triggers")
    if tag.get("type", "structural_tag") != "structural_tag" or set(tag) - {
            "type", "structures", "triggers"}:
        raise InvalidRequestError(
            f'{param} must be {{"type": "structural_tag", "structures": [...], "triggers": [...]}}',
            param)
    if not isinstance(triggers, list) or not triggers or not all(
            isinstance(t, str) and t for t in triggers):
        raise InvalidRequestError(f"{param}.triggers must be a non-empty list of strings", param)
    if not isinstance(structures, list) or not structures:
        raise InvalidRequestError(f"{param}.structures must be a non-empty list", param)
    for s in structures:
        if not (isinstance(s, dict) and set(s) == {"begin", "schema", "end"}
                and isinstance(s["begin"], str) and isinstance(s["end"], str)
                and isinstance(s["schema"], dict)):
            raise InvalidRequestError(
                f'{param}.structures entries must be {{"begin": str, "schema": object, '
                f'"end": str}}', param)
        if not any(s["begin"].startswith(t) for t in triggers):
            raise InvalidRequestError(
                f"{param}: structure begin {s['begin']!r} starts with none of the triggers", param)
    return tag


_CHECKS = {"json": _json_object_value, "regex": _check_text, "choice": _check_choice,
           "grammar": _check_text, "json_object": _check_json_object,
           "structural_tag": _check_structural_tag}
