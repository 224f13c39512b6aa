"""Chat request fields beyond sampling: tools, and the OpenAI fields clients send by default.

Owns three lists (docs/serving.md repeats them, with why):

- tool fields: ``tools`` (functions only), ``tool_choice``, ``parallel_tool_calls``; checked
  further by ``conveyor.tools.spec``;
- accepted with no effect here: ``metadata``, ``store``, ``service_tier``, ``safety_identifier``,
  ``prompt_cache_key``, ``prompt_cache_retention``, ``prompt_cache_options``, ``prediction``,
  ``modalities: ["text"]`` (nothing is stored, there is one service tier, prefix caching is
  automatic, and a prediction does not change a reply);
- refused unless null (``REFUSED_FIELDS``): fields that would change generation in a way this
  server does not implement; the 400 names the field and what to send instead.

Invariant: types are strict and unknown fields are refused, as in ``protocol.py``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

REFUSED_FIELDS = {
    "functions": "it is deprecated; send the functions in 'tools'",
    "function_call": "it is deprecated; send 'tool_choice'",
    "audio": "conveyor generates text only; remove it",
    "modalities": "conveyor generates text only; send [\"text\"] or omit it",
    "web_search_options": "conveyor has no web search; remove it",
    "reasoning_effort": "the served model has no reasoning mode to set; remove it",
    "verbosity": "conveyor has no verbosity control; bound the reply with "
                 "'max_completion_tokens'",
    "moderation": "conveyor runs no moderation model; remove it",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FunctionDefinition(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionTool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class _FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: _FunctionName


class Prediction(_Strict):
    type: Literal["content"]
    content: str | list[dict[str, Any]]


class ChatClientFields(_Strict):
    """Mixed into ``ChatCompletionRequest``."""

    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prediction: Prediction | None = None
    modalities: list[Literal["text"]] | None = None

    functions: None = Field(None, description=REFUSED_FIELDS["functions"])
    function_call: None = Field(None, description=REFUSED_FIELDS["function_call"])
    audio: None = Field(None, description=REFUSED_FIELDS["audio"])
    web_search_options: None = Field(None, description=REFUSED_FIELDS["web_search_options"])
    reasoning_effort: None = Field(None, description=REFUSED_FIELDS["reasoning_effort"])
    verbosity: None = Field(None, description=REFUSED_FIELDS["verbosity"])
    moderation: None = Field(None, description=REFUSED_FIELDS["moderation"])

    def tool_dicts(self) -> tuple[list[dict] | None, Any]:
        """(tools, tool_choice) as plain JSON values for ``conveyor.tools.spec.tool_request``."""
        tools = None if self.tools is None else \
            [t.model_dump(exclude_none=True) for t in self.tools]
        choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, NamedToolChoice) \
            else self.tool_choice
        return tools, choice


def refused_field_message(field: str | None) -> str | None:
    """The 400 message for a refused field, or None for any other field."""
    hint = REFUSED_FIELDS.get(field or "")
    return None if hint is None else f"{field!r} is not supported: {hint}"
