"""The tools a chat request offers and how it lets the model use them (pure Python).

Owns the checked, immutable form of OpenAI's ``tools``, ``tool_choice`` and
``parallel_tool_calls``. Invariants:

- Function names are unique and match OpenAI's ``^[a-zA-Z0-9_-]{1,64}$``; ``parameters`` is a
  JSON-schema object whose ``type`` is ``object`` (absent ``parameters`` means "no arguments").
- ``tool_choice`` other than ``none`` needs tools; a named choice names one of them.
- Every problem raises ``InvalidRequestError`` naming the field and what to change.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

from conveyor.errors import InvalidRequestError

_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_NO_ARGUMENTS = {"type": "object", "properties": {}}


class ToolChoiceMode(Enum):
    NONE = "none"            # tools are not offered; the reply is text
    AUTO = "auto"            # the model decides; calls are parsed from its text
    REQUIRED = "required"    # at least one call, enforced by a grammar
    NAMED = "function"       # exactly the named function, enforced by a grammar


@dataclass(frozen=True, slots=True)
class FunctionSpec:
    """One function the model may call; ``parameters`` is a private copy of its JSON schema."""

    name: str
    description: str | None
    parameters: dict
    strict: bool = False

    def to_openai(self) -> dict:
        """The ``{"type": "function", "function": {...}}`` shape chat templates expect."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = copy.deepcopy(self.parameters)
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class ToolRequest:
    """What one chat request allows. ``functions`` are all the tools (rendered in the prompt);
    ``callable`` are those the reply may call (only the named one for a named choice)."""

    functions: tuple[FunctionSpec, ...]
    mode: ToolChoiceMode
    forced_name: str | None = None
    parallel: bool = True

    @property
    def parses_calls(self) -> bool:
        return self.mode is not ToolChoiceMode.NONE

    @property
    def constrained(self) -> bool:
        return self.mode in (ToolChoiceMode.REQUIRED, ToolChoiceMode.NAMED)

    @property
    def callable(self) -> tuple[FunctionSpec, ...]:
        if self.mode is ToolChoiceMode.NAMED:
            return tuple(f for f in self.functions if f.name == self.forced_name)
        return self.functions if self.parses_calls else ()

    @property
    def max_calls(self) -> int | None:
        """At most this many calls are returned (None: no limit): one without parallel calls,
        and one for a named choice (OpenAI's "call this function")."""
        return None if self.parallel and self.mode is not ToolChoiceMode.NAMED else 1


def tool_request(tools: list[dict] | None, tool_choice: Any,
                 parallel_tool_calls: bool | None) -> ToolRequest | None:
    """Check a request's tool fields (already shaped by the HTTP models: ``tools`` is a list of
    ``{"type": "function", "function": {...}}``); None when it offers no tools and chooses none."""
    functions = tuple(_function(i, t["function"]) for i, t in enumerate(tools or ()))
    names = [f.name for f in functions]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidRequestError(
            f"tools: function names must be unique; {', '.join(dupes)} appear more than once",
            "tools")
    mode, forced = _choice(tool_choice, functions)
    if not functions:
        return None
    return ToolRequest(functions, mode, forced, parallel_tool_calls is not False)


def _function(index: int, function: dict) -> FunctionSpec:
    param = f"tools[{index}].function"
    name = function["name"]
    if not _NAME.fullmatch(name):
        raise InvalidRequestError(
            f"{param}.name {name!r} must be 1-64 letters, digits, '_' or '-'", f"{param}.name")
    parameters = function.get("parameters")
    if parameters is None:
        parameters = _NO_ARGUMENTS
    if parameters.get("type", "object") != "object":
        raise InvalidRequestError(
            f"{param}.parameters must be a JSON schema of type 'object' (a function's arguments "
            f"are a JSON object), got type {parameters.get('type')!r}", f"{param}.parameters")
    try:
        parameters = json.loads(json.dumps(parameters, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"{param}.parameters is not valid JSON: {exc}",
                                  f"{param}.parameters") from None
    return FunctionSpec(name, function.get("description"), parameters,
                        bool(function.get("strict")))


def _choice(tool_choice: Any,
            functions: tuple[FunctionSpec, ...]) -> tuple[ToolChoiceMode, str | None]:
    if tool_choice is None:
        return (ToolChoiceMode.AUTO if functions else ToolChoiceMode.NONE), None
    if isinstance(tool_choice, str):
        try:
            mode = ToolChoiceMode(tool_choice)
        except ValueError:
            mode = ToolChoiceMode.NAMED       # "function" is not a valid string choice either
        if mode is ToolChoiceMode.NAMED:
            raise InvalidRequestError(
                f"tool_choice must be 'none', 'auto', 'required' or "
                f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {tool_choice!r}",
                "tool_choice")
        forced = None
    else:
        mode, forced = ToolChoiceMode.NAMED, tool_choice["function"]["name"]
    if mode is not ToolChoiceMode.NONE and not functions:
        raise InvalidRequestError(
            f"tool_choice {tool_choice!r} needs tools; send the functions in 'tools' or drop "
            "tool_choice", "tool_choice")
    if forced is not None and forced not in {f.name for f in functions}:
        raise InvalidRequestError(
            f"tool_choice names function {forced!r}, which is not in tools; send it in 'tools' "
            "or name one of " + ", ".join(repr(f.name) for f in functions), "tool_choice")
    return mode, forced
