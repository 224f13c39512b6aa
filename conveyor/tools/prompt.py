"""Chat messages with tool calls and tool results, made ready for a model's chat template.

Owns the checks OpenAI makes on tool messages and the two ways to render them:

- a template that reads ``tools`` gets the tool definitions as ``tools=`` and the messages as
  they are, except that ``content: null`` becomes ``""`` and each call's ``arguments`` JSON
  string becomes an object (as Hugging Face templates expect);
- any other template gets plain messages: the format's default tools prompt as (or appended to)
  the system message, each assistant call written in the format's markup after its content,
  and each run of ``tool`` results as one ``user`` message of
  ``<tool_response>\\n...\\n</tool_response>`` blocks (Qwen2.5's layout; templates that know no
  tools often know no ``tool`` role either).

Invariants: the caller's messages are never mutated; a ``tool`` message must answer a call of
the closest assistant message with ``tool_calls`` before it; with ``tool_choice: none`` the
tools are not offered in the prompt (a model shown tools tends to call them, and such a call
would come back as text), though earlier calls and results still render.
"""

from __future__ import annotations

import json
from typing import Any

from conveyor.errors import InvalidRequestError
from conveyor.tokenizer.chat_template import validate_messages
from conveyor.tools.formats import ToolCallFormat
from conveyor.tools.spec import ToolRequest


def template_inputs(messages: Any, request: ToolRequest | None, fmt: ToolCallFormat,
                    template_knows_tools: bool) -> tuple[list[dict], dict]:
    """(messages, extra template variables) to render for this request."""
    checked = validate_messages([_fill_content(m) for m in messages]
                                if isinstance(messages, list) else messages)
    _check_tool_messages(checked)
    offered = request.functions if request is not None and request.parses_calls else ()
    if template_knows_tools:
        extra = {"tools": [f.to_openai() for f in offered]} if offered else {}
        return [_arguments_as_objects(m) for m in checked], extra
    plain = _plain_messages(checked, fmt)
    if offered:
        plain = _with_system(plain, fmt.system_prompt(offered))
    return plain, {}


def has_tool_messages(messages: Any) -> bool:
    """Whether any message is a tool result or carries tool calls (then the tool path renders)."""
    return isinstance(messages, list) and any(
        isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls"))
        for m in messages)


def _fill_content(message: Any) -> Any:
    # OpenAI lets an assistant message that calls tools have null (or no) content.
    if isinstance(message, dict) and message.get("tool_calls") and message.get("content") is None:
        return {**message, "content": ""}
    return message


def _check_tool_messages(messages: list[dict]) -> None:
    open_ids: set[str] = set()
    for i, m in enumerate(messages):
        if m.get("tool_calls") is not None:
            open_ids = {c["id"] for c in _checked_calls(m, i)}
        elif m["role"] == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str):
                raise InvalidRequestError(
                    f"messages[{i}] (role 'tool') needs a string 'tool_call_id': the id of "
                    "the call it answers", "messages")
            if call_id not in open_ids:
                raise InvalidRequestError(
                    f"messages[{i}].tool_call_id {call_id!r} answers no call of the preceding "
                    "assistant message with 'tool_calls'; send that message first", "messages")


def _checked_calls(message: dict, index: int) -> list[dict]:
    calls = message["tool_calls"]
    where = f"messages[{index}].tool_calls"
    if message["role"] != "assistant" or not isinstance(calls, list):
        raise InvalidRequestError(f"{where} must be a list, on an assistant message", "messages")
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(call.get("id"), str)
                and call.get("type", "function") == "function"
                and isinstance(function.get("name"), str)
                and isinstance(function.get("arguments"), str)):
            raise InvalidRequestError(
                f'{where}[{j}] must be {{"id": str, "type": "function", "function": '
                '{"name": str, "arguments": <JSON text>}}', "messages")
    return calls


def _arguments_as_objects(message: dict) -> dict:
    calls = message.get("tool_calls")
    if not calls:
        return message
    out = []
    for call in calls:
        try:
            args = json.loads(call["function"]["arguments"])
        except ValueError:
            args = call["function"]["arguments"]
        out.append({**call, "function": {**call["function"], "arguments": args}})
    return {**message, "tool_calls": out}


def _plain_messages(messages: list[dict], fmt: ToolCallFormat) -> list[dict]:
    plain: list[dict] = []
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if plain and plain[-1].get("_tool_results"):
                plain[-1]["content"] += "\n" + block
            else:
                plain.append({"role": "user", "content": block, "_tool_results": True})
        elif m.get("tool_calls"):
            calls = fmt.render_calls([(c["function"]["name"], c["function"]["arguments"])
                                      for c in m["tool_calls"]])
            text = f"{m['content']}\n{calls}" if m["content"] else calls
            plain.append({"role": m["role"], "content": text})
        else:
            plain.append({k: v for k, v in m.items() if k != "tool_calls"})
    return [{k: v for k, v in m.items() if k != "_tool_results"} for m in plain]


def _with_system(messages: list[dict], block: str) -> list[dict]:
    if messages and messages[0]["role"] in ("system", "developer"):
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{block}"}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]
