"""Chat-template rendering inside a Jinja sandbox.

Owns: turning OpenAI-style ``messages`` into the prompt string a model was trained on, by running the
model's Jinja chat template. Invariants:

- Templates run only in ``ImmutableSandboxedEnvironment``: attributes starting with ``_`` are
  unreachable and passed-in objects cannot be mutated, because a template comes from a checkpoint or
  a command line we do not control and must not reach Python internals (``__subclasses__`` etc.).
- Every failure a user can cause (malformed messages, text that is not valid Unicode, a broken
  template, the template's own ``raise_exception``) surfaces as ``InvalidRequestError`` carrying
  the underlying message; a rendered prompt is always valid Unicode.
- Messages are validated and normalised (text-part lists joined into one string) into fresh dicts
  before rendering; the caller's objects are never mutated.
- Compiled templates are cached per ``ChatTemplateRenderer`` instance (bounded), never module-globally.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from conveyor.errors import InvalidRequestError, check_text

# Joining text parts with a newline matches vLLM, so prompts built from part lists tokenize the same.
_PART_SEPARATOR = "\n"


class _GenerationTag(Extension):
    """Accepts HF's ``{% generation %}...{% endgeneration %}`` tag and renders its body unchanged.

    HF uses the tag to track assistant spans for training masks; for inference only the text matters,
    but templates that use it would otherwise fail to parse.
    """

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: Any) -> None:
    raise InvalidRequestError(f"the chat template rejected these messages: {message}", "messages")


def _tojson(value: Any, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    # Jinja's built-in tojson HTML-escapes <, >, & and ', which would corrupt prompts; templates
    # written for HF expect plain JSON with non-ASCII characters kept as they are.
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _content_to_text(content: Any, index: int) -> str:
    """A message's content as one string: a string as is, or a list of text parts joined."""
    if isinstance(content, str):
        check_text(content, "messages", f"messages[{index}].content")
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(
            f"messages[{index}].content must be a string or a list of text parts, got "
            f"{type(content).__name__}", "messages")
    texts = []
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise InvalidRequestError(
                f"messages[{index}].content[{j}] must be {{\"type\": \"text\", \"text\": <string>}}; "
                "only text parts are supported", "messages")
        check_text(part["text"], "messages", f"messages[{index}].content[{j}].text")
        texts.append(part["text"])
    return _PART_SEPARATOR.join(texts)


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check ``messages`` and return normalised copies.

    Contract: ``messages`` must be a non-empty list of objects, each with a string ``role`` and a
    ``content`` that is a string or a list of ``{"type": "text", "text": str}`` parts (joined with a
    newline). Other keys (``name``, ``tool_calls``...) are kept for the template. Anything else raises
    ``InvalidRequestError`` naming the offending message.
    """
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {role, content} objects", "messages")
    normalised = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(
                f"messages[{i}] must be an object with 'role' and 'content', got {type(message).__name__}",
                "messages")
        if not isinstance(message.get("role"), str):
            raise InvalidRequestError(f"messages[{i}].role must be a string", "messages")
        check_text(message["role"], "messages", f"messages[{i}].role")
        if "content" not in message:
            raise InvalidRequestError(f"messages[{i}] has no 'content'; add a string content", "messages")
        normalised.append({**message, "content": _content_to_text(message["content"], i)})
    return normalised


@dataclass(slots=True)
class ChatTemplateRenderer:
    """Renders chat templates in a sandbox, caching up to ``max_cached`` compiled templates.

    One renderer belongs to one owner (normally a ``Tokenizer``); it is safe to reuse across requests
    because rendering keeps no per-call state on the instance apart from the compile cache.
    """

    max_cached: int = 8
    _env: ImmutableSandboxedEnvironment = field(init=False, repr=False)
    _cache: dict[str, jinja2.Template] = field(init=False, repr=False, default_factory=dict)
    _variables: dict[str, frozenset[str]] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._env = _make_environment()

    def render(self, template: str, messages: Any, *, add_generation_prompt: bool = True,
               bos_token: str = "", eos_token: str = "", **kwargs: Any) -> str:
        """Render ``template`` for ``messages``; extra ``kwargs`` (tools, documents...) reach the template.

        Raises ``InvalidRequestError`` for invalid messages, template syntax errors and template
        runtime errors, with Jinja's message included.
        """
        normalised = validate_messages(messages)
        compiled = self._compile(template)
        try:
            text = compiled.render(messages=normalised, add_generation_prompt=add_generation_prompt,
                                   bos_token=bos_token, eos_token=eos_token, **kwargs)
        except InvalidRequestError:
            raise
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"the chat template failed while rendering: {exc}", "messages") from exc
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError,
                RecursionError) as exc:
            # Template code can hit ordinary Python errors (e.g. '+' on a missing field); they are the
            # request's or the template's fault, not the server's.
            raise InvalidRequestError(
                f"the chat template failed while rendering: {type(exc).__name__}: {exc}", "messages") from exc
        check_text(text, "messages", "the rendered chat prompt")      # e.g. from other message keys
        return text

    def variables(self, template: str) -> frozenset[str]:
        """Names ``template`` reads from its context (e.g. ``tools``: it renders tool definitions)."""
        found = self._variables.get(template)
        if found is None:
            self._compile(template)          # raises InvalidRequestError for a broken template
            found = frozenset(meta.find_undeclared_variables(self._env.parse(template)))
            if len(self._variables) >= self.max_cached:
                del self._variables[next(iter(self._variables))]
            self._variables[template] = found
        return found

    def _compile(self, template: str) -> jinja2.Template:
        if not isinstance(template, str) or not template.strip():
            raise InvalidRequestError("the chat template must be a non-empty string", "chat_template")
        cached = self._cache.get(template)
        if cached is not None:
            return cached
        try:
            compiled = self._env.from_string(template)
        except jinja2.TemplateSyntaxError as exc:
            raise InvalidRequestError(
                f"the chat template has a syntax error at line {exc.lineno}: {exc.message}; "
                "fix the template", "chat_template") from exc
        if len(self._cache) >= self.max_cached:
            # Evict the oldest entry (dicts keep insertion order) so per-request templates cannot
            # grow memory without bound.
            del self._cache[next(iter(self._cache))]
        self._cache[template] = compiled
        return compiled


def render_chat_template(template: str, messages: Any, *, add_generation_prompt: bool = True,
                         bos_token: str = "", eos_token: str = "", **kwargs: Any) -> str:
    """One-off render of ``template`` (no caching); see ``ChatTemplateRenderer.render`` for the contract."""
    return ChatTemplateRenderer().render(template, messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token, eos_token=eos_token, **kwargs)
