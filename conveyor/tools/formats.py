"""Tool-call formats per model family: how calls are written, prompted, parsed and constrained.

A ``ToolCallFormat`` (named as vLLM's ``--tool-call-parser`` names them) knows one family's call
markup: it renders a past call for the prompt, writes the default tools prompt for templates
that know no tools, builds the parser for replies, and the grammar that makes a reply one or
more valid calls. Formats: ``hermes`` (``<tool_call>{"name": ..., "arguments": {...}}
</tool_call>``: Hermes, Qwen2/2.5, and the default) and ``llama3_json`` (Llama 3.1+: the reply
is ``{"name": ..., "parameters": {...}}``, several joined by ``; ``). Invariant: the grammar
produces exactly the text ``render_call`` writes (compact JSON with ``", "`` and ``": "``), which
the parser reads back as the same name and arguments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from conveyor.errors import InvalidRequestError
from conveyor.tools.parser import CallSyntax, ToolCallParser
from conveyor.tools.spec import FunctionSpec, ToolRequest

# Calls are generated on one line with fixed separators, so a small model cannot loop on
# whitespace inside a call, and the text matches render_call's.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _tools_json(functions: tuple[FunctionSpec, ...]) -> str:
    return "\n".join(json.dumps(f.to_openai(), ensure_ascii=False) for f in functions)


def _hermes_prompt(functions: tuple[FunctionSpec, ...]) -> str:
    # Qwen2.5's wording, which Hermes-style models (and SmolLM2, in our tests) follow.
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{_tools_json(functions)}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _llama3_prompt(functions: tuple[FunctionSpec, ...]) -> str:
    # Llama 3.1's JSON tool-calling instructions.
    return ("Given the following functions, please respond with a JSON for a function call with "
            "its proper arguments that best answers the given prompt.\n\nRespond in the format "
            '{"name": function name, "parameters": dictionary of argument name and its value}. '
            f"Do not use variables.\n\n{_tools_json(functions)}")


@dataclass(frozen=True, slots=True)
class ToolCallFormat:
    """One family's call markup. ``template_markers``: a chat template containing one of them
    was written for this format (used to pick the default)."""

    name: str
    syntax: CallSyntax
    args_key: str
    prefix: str
    suffix: str
    joiner: str
    instructions: Callable[[tuple[FunctionSpec, ...]], str]
    template_markers: tuple[str, ...] = ()

    def parser(self, request: ToolRequest) -> ToolCallParser:
        """A parser for one reply to ``request``."""
        return ToolCallParser(self.syntax, frozenset(f.name for f in request.callable),
                              request.max_calls)

    def render_call(self, name: str, arguments: str) -> str:
        """One call as the model writes it; ``arguments`` is JSON text (kept as given when it
        is a JSON object, else sent as a JSON string)."""
        try:
            value = json.loads(arguments)
        except ValueError:
            value = None
        args = json.dumps(value if isinstance(value, dict) else arguments, ensure_ascii=False)
        name_part = json.dumps({"name": name}, ensure_ascii=False)[:-1]
        body = f'{name_part}, "{self.args_key}": {args}}}'
        return f"{self.prefix}{body}{self.suffix}"

    def render_calls(self, calls: list[tuple[str, str]]) -> str:
        return self.joiner.join(self.render_call(n, a) for n, a in calls)

    def system_prompt(self, functions: tuple[FunctionSpec, ...]) -> str:
        """The default tools prompt, for chat templates that know no tools."""
        return self.instructions(functions)

    def grammar(self, request: ToolRequest) -> str:
        """Lark (llguidance's dialect, JSON schemas inline) for replies that are only calls to
        the callable functions: one or more, or exactly one (``request.max_calls``)."""
        schemas = [self._call_schema(f, f"#/anyOf/{i}/properties/{self.args_key}")
                   for i, f in enumerate(request.callable)]
        body = {"anyOf": schemas, "x-guidance": _JSON_STYLE}
        call = " ".join([json.dumps(self.prefix)] * bool(self.prefix) + ["body"] +
                        [json.dumps(self.suffix)] * bool(self.suffix))
        repeat = f" ({json.dumps(self.joiner)} call)*" if request.max_calls is None else ""
        return f"start: call{repeat}\ncall: {call}\nbody: %json {json.dumps(body)}\n"

    def structural_tag(self, request: ToolRequest) -> dict | None:
        """vLLM's structural tag that keeps free text free but makes every call this format
        opens valid (for ``auto``); None for formats without an opener."""
        opener = self.syntax.opener
        if opener is None:
            return None
        structures = [{"begin": self.prefix + json.dumps({"name": f.name})[:-1] +
                       f', "{self.args_key}": ', "schema": f.parameters,
                       "end": "}" + self.suffix} for f in request.callable]
        # The trigger stops short of a closing ">": llguidance takes a "<...>" trigger for a
        # special token, and "<tool_call>" is ordinary text in most vocabularies.
        trigger = opener[:-1] if opener.endswith(">") and len(opener) > 2 else opener
        return {"type": "structural_tag", "structures": structures, "triggers": [trigger]}

    def _call_schema(self, function: FunctionSpec, pointer: str) -> dict:
        return {"type": "object",
                "properties": {"name": {"const": function.name},
                               self.args_key: _rebase_refs(function.parameters, pointer)},
                "required": ["name", self.args_key], "additionalProperties": False}


def _rebase_refs(schema, pointer: str):
    """A copy of ``schema`` whose local ``$ref``s ("#/...") point into it at ``pointer``."""
    if isinstance(schema, dict):
        return {k: (pointer + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#")
                    else _rebase_refs(v, pointer)) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_rebase_refs(v, pointer) for v in schema]
    return schema


HERMES = ToolCallFormat(
    "hermes", CallSyntax(("arguments",), opener="<tool_call>", closer="</tool_call>"),
    "arguments", "<tool_call>\n", "\n</tool_call>", "\n", _hermes_prompt, ("<tool_call>",))
LLAMA3_JSON = ToolCallFormat(
    "llama3_json", CallSyntax(("parameters", "arguments"), separator=";",
                              start_marker="<|python_tag|>"),
    "parameters", "", "", "; ", _llama3_prompt, ("<|python_tag|>", "ipython"))
FORMATS = {f.name: f for f in (HERMES, LLAMA3_JSON)}


def choose_format(name: str | None, chat_template: str | None) -> ToolCallFormat:
    """The format named by ``--tool-call-parser``, else the one the chat template was written
    for (by its markers), else ``hermes`` (the default tools prompt's format)."""
    if name is not None:
        if name not in FORMATS:
            raise InvalidRequestError(
                f"--tool-call-parser {name!r} is not known; choose one of {', '.join(FORMATS)}")
        return FORMATS[name]
    for fmt in FORMATS.values():
        if chat_template and any(m in chat_template for m in fmt.template_markers):
            return fmt
    return HERMES
