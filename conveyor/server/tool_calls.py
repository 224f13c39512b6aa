"""Tool calling for one chat request at the HTTP edge: prompt, constraint, and reply shapes.

``ChatTools.from_request`` checks the request's tool fields; then ``render_prompt`` (on the
tokenizer thread) renders the messages through ``conveyor.tools.prompt``, ``sampling_params``
adds the grammar that makes ``required`` and named choices valid calls, and the reply is
rewritten into OpenAI's shape: ``message.tool_calls`` / ``delta.tool_calls`` with
``finish_reason: "tool_calls"``. Invariants:

- A request without tools and without tool messages renders and answers exactly as before.
- Streamed and whole replies go through the same ``ToolCallParser``: the stream's content and
  arguments concatenate to the whole reply's (ids aside, which are random per reply).
- ``required`` / named: the grammar admits only calls to the callable functions with
  arguments matching their schemas; a schema that does not compile is a 400 naming the tool.
  ``auto`` is constrained (by a structural tag) only when some function is ``strict``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from conveyor.errors import InvalidRequestError
from conveyor.sampling_params import SamplingParams
from conveyor.tools.formats import ToolCallFormat, choose_format
from conveyor.tools.parser import ArgumentsDelta, CallStart, ContentDelta, Event, ToolCallParser
from conveyor.tools.prompt import has_tool_messages, template_inputs
from conveyor.tools.spec import ToolChoiceMode, ToolRequest, tool_request


@dataclass(slots=True)
class ChatTools:
    """One chat request's tool handling; ``request`` is None when it offers no tools."""

    request: ToolRequest | None
    format: ToolCallFormat

    @classmethod
    def from_request(cls, req: Any, parser_name: str | None,
                     chat_template: str | None) -> ChatTools:
        tools, choice = req.tool_dicts()
        return cls(tool_request(tools, choice, req.parallel_tool_calls),
                   choose_format(parser_name, chat_template))

    @property
    def parses_calls(self) -> bool:
        return self.request is not None and self.request.parses_calls

    def render_prompt(self, tokenizer: Any, messages: list[dict]) -> list[int]:
        """Prompt token ids (run on the tokenizer thread: it uses ``tokenizer``)."""
        if self.request is None and not has_tool_messages(messages):
            return tokenizer.encode_chat(messages)
        knows_tools = "tools" in tokenizer.chat_template_variables()
        msgs, extra = template_inputs(messages, self.request, self.format, knows_tools)
        return tokenizer.encode_chat(msgs, tools=extra.get("tools"))

    def sampling_params(self, params: SamplingParams) -> SamplingParams:
        """``params`` plus the constraint this tool choice needs (if any)."""
        spec = self._constraint()
        if spec is None:
            return params
        if getattr(params, "structured_outputs", None) is not None:
            if not self.request.constrained:
                return params        # the client's own constraint wins over a strict tool's
            raise InvalidRequestError(
                f"tool_choice {self.request.mode.value!r} constrains the reply to tool calls; "
                "it cannot be combined with response_format or structured_outputs", "tool_choice")
        return dataclasses.replace(params, structured_outputs=spec)

    def _constraint(self):
        request = self.request
        if request is None or request.mode is ToolChoiceMode.NONE:
            return None
        from conveyor.structured.params import StructuredOutputsParams
        if request.constrained:
            _check_schemas(request)
            return StructuredOutputsParams(grammar=self.format.grammar(request))
        if any(f.strict for f in request.callable):
            tag = self.format.structural_tag(request)
            if tag is not None:
                _check_schemas(request)
                return StructuredOutputsParams(structural_tag=tag)
        return None

    def rewrite_response(self, body: dict) -> dict:
        """A whole ``chat.completion`` body with each choice's calls moved out of its content."""
        if not self.parses_calls:
            return body
        for choice in body["choices"]:
            parser = self.format.parser(self.request)
            text = choice["message"]["content"]
            events = parser.feed(text) + parser.finish()
            choice["message"] = _message(events)
            choice["finish_reason"] = _finish_reason(choice["finish_reason"], parser)
        return body

    def stream(self) -> ToolStream | None:
        """Per-request stream rewriter, or None when replies are plain text."""
        return ToolStream(self) if self.parses_calls else None


@dataclass(slots=True)
class ToolStream:
    """Rewrites one request's ``chat.completion.chunk`` objects, one parser per choice."""

    tools: ChatTools
    parsers: dict[int, ToolCallParser] = field(default_factory=dict)

    def rewrite(self, chunk: dict | None, delta_text: str, finished: bool) -> list[dict]:
        """The chunks to send for one choice's chunk (``chunk`` as ``delta_chunk`` built it,
        None when it had nothing to say) whose new text is ``delta_text``."""
        if chunk is None:
            return []
        choice = chunk["choices"][0]
        parser = self.parsers.get(choice["index"])
        if parser is None:
            parser = self.parsers[choice["index"]] = self.tools.format.parser(self.tools.request)
        events = parser.feed(delta_text) + (parser.finish() if finished else [])
        deltas = _deltas(events)
        if finished:
            choice = {**choice, "finish_reason": _finish_reason(choice["finish_reason"], parser)}
        if not deltas:
            keep = finished or choice.get("logprobs") is not None
            return [{**chunk, "choices": [{**choice, "delta": {}}]}] if keep else []
        out = []
        for i, delta in enumerate(deltas):
            part = {**choice, "delta": delta}
            if i > 0:
                part["logprobs"] = None
            if i < len(deltas) - 1:
                part["finish_reason"], part["stop_reason"] = None, None
            out.append({**chunk, "choices": [part]})
        return out


def stream_chunks(stream: ToolStream | None, chunk: dict | None, output: Any) -> list[dict]:
    """The chunks to send for one choice's step: as built, or rewritten for tool calls."""
    if stream is None:
        return [] if chunk is None else [chunk]
    return stream.rewrite(chunk, output.delta_text, output.finish_reason is not None)


def _check_schemas(request: ToolRequest) -> None:
    """A 400 naming the tool whose parameters schema the grammar engine cannot compile."""
    from llguidance import LLMatcher
    for i, f in enumerate(request.functions):
        if f not in request.callable:
            continue
        try:
            error = LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(f.parameters))
        except ValueError as exc:
            error = str(exc) or type(exc).__name__
        if error:
            raise InvalidRequestError(
                f"tools[{i}].function.parameters is not a JSON schema conveyor can enforce: "
                f"{error.splitlines()[0][:300]}", f"tools[{i}].function.parameters")


def _finish_reason(reason: str | None, parser: ToolCallParser) -> str | None:
    return "tool_calls" if reason == "stop" and parser.num_calls else reason


def _message(events: list[Event]) -> dict:
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls: list[dict] = []
    for e in events:
        if isinstance(e, CallStart):
            calls.append({"id": e.id, "type": "function",
                          "function": {"name": e.name, "arguments": ""}})
        elif isinstance(e, ArgumentsDelta):
            calls[e.index]["function"]["arguments"] += e.text
    message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    return message


def _deltas(events: list[Event]) -> list[dict]:
    """Stream deltas for events: a content run, or one call's start and/or arguments."""
    out: list[dict] = []
    for e in events:
        if isinstance(e, ContentDelta):
            out.append({"content": e.text})
        elif isinstance(e, CallStart):
            out.append({"tool_calls": [{"index": e.index, "id": e.id, "type": "function",
                                        "function": {"name": e.name, "arguments": ""}}]})
        elif out and "tool_calls" in out[-1] and out[-1]["tool_calls"][0]["index"] == e.index:
            out[-1]["tool_calls"][0]["function"]["arguments"] += e.text
        else:
            out.append({"tool_calls": [{"index": e.index, "function": {"arguments": e.text}}]})
    return out
