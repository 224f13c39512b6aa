"""The request fields of structured outputs and ``logit_bias``, and their translation.

Owns OpenAI's ``response_format`` (``text``, ``json_object``, ``json_schema``), vLLM's
``structured_outputs`` object, OpenAI's ``logit_bias`` (token id strings -> bias), and the 400s
for vLLM's removed ``guided_*`` fields, each naming its replacement. Invariants: strict types and
no unknown fields, like every request model (``protocol``); a request constrains its output
through at most one of ``response_format`` and ``structured_outputs``; ``json_schema.strict`` is
accepted either way because the schema is always enforced (constrained decoding).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from conveyor.errors import InvalidRequestError
from conveyor.structured.params import StructuredOutputsParams

_REPLACEMENTS = {
    "guided_json": 'use structured_outputs: {"json": <schema>} or response_format: '
                   '{"type": "json_schema", ...} instead',
    "guided_regex": 'use structured_outputs: {"regex": <pattern>} instead',
    "guided_choice": 'use structured_outputs: {"choice": [...]} instead',
    "guided_grammar": 'use structured_outputs: {"grammar": <grammar>} instead',
    "guided_decoding_backend": "remove it: the server picks the backend (llguidance)",
    "guided_whitespace_pattern": "remove it: JSON is generated compactly on one line",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class JsonSchemaFormat(_Strict):
    """``response_format.json_schema``: OpenAI's named schema."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's ``response_format``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsBody(_Strict):
    """vLLM's ``structured_outputs``: exactly one field set."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: dict[str, Any] | str | None = None


def structured_params(response_format: ResponseFormat | None,
                      body: StructuredOutputsBody | None) -> StructuredOutputsParams | None:
    """The constraint a request asks for (None for free text); InvalidRequestError naming the
    field when it is malformed or both fields constrain the output."""
    from_format = _from_response_format(response_format)
    if from_format is not None and body is not None:
        raise InvalidRequestError(
            "send either response_format or structured_outputs, not both", "structured_outputs")
    if body is None:
        return from_format
    return StructuredOutputsParams(
        json=body.json_, regex=body.regex, choice=body.choice, grammar=body.grammar,
        json_object=body.json_object, structural_tag=body.structural_tag)


def _from_response_format(fmt: ResponseFormat | None) -> StructuredOutputsParams | None:
    if fmt is None or fmt.type == "text":
        if fmt is not None and fmt.json_schema is not None:
            raise InvalidRequestError(
                'response_format.json_schema needs "type": "json_schema"', "response_format")
        return None
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True, field_name="response_format")
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise InvalidRequestError(
            'response_format of type "json_schema" needs json_schema.schema (a JSON schema)',
            "response_format.json_schema.schema")
    return StructuredOutputsParams(json=fmt.json_schema.schema_,
                                   field_name="response_format.json_schema.schema")


def logit_bias_ids(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's ``{"<token id>": bias}`` -> ``{token_id: bias}`` (ranges: ``SamplingParams``)."""
    if bias is None:
        return None
    out = {}
    for key, value in bias.items():
        if not key.isascii() or not key.isdigit() or len(key) > 12:
            raise InvalidRequestError(
                f"logit_bias keys must be token ids written as decimal strings, got {key!r}",
                "logit_bias")
        out[int(key)] = value
    return out


def removed_field_error(name: str) -> InvalidRequestError | None:
    """The 400 for a removed vLLM ``guided_*`` field, naming what replaced it (else None)."""
    replacement = _REPLACEMENTS.get(name)
    if replacement is None:
        return None
    return InvalidRequestError(
        f"{name!r} was removed (as in vLLM); {replacement}", name)
