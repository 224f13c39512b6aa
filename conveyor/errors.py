"""Typed errors a user can cause.

Every error a caller can trigger by what they send is one of these; the HTTP layer maps them to
OpenAI-shaped JSON errors (``InvalidRequestError`` -> 400, ``ModelNotFoundError`` -> 404 / CLI exit 2)
and the CLI prints their one-line message (``ConfigError``: a start-up option's). The message
always says what to change.
"""


class ConveyorError(Exception):
    """Base class for errors conveyor raises on purpose."""


class InvalidRequestError(ConveyorError, ValueError):
    """A request or parameter is invalid; the message names the field and the accepted range."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """The prompt alone fills the model's context (HTTP 400, code ``context_length_exceeded``)."""


class ConfigError(ConveyorError, ValueError):
    """A start-up option is invalid, or cannot work on this machine or with the other options
    (e.g. a CPU feature it needs is missing): the operator's mistake, never a client's (so not an
    ``InvalidRequestError``). The message names the option and what to change; ``param`` is the
    config field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def check_text(text: str, param: str, what: str | None = None) -> None:
    """Raise ``InvalidRequestError`` for field ``param`` if ``text`` is not valid Unicode (a lone
    surrogate such as JSON's ``"\\ud800"`` cannot be encoded, tokenized or sent back); ``what``
    names the value in the message (default: ``param``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"{what or param} is not valid Unicode text (a lone surrogate "
            f"U+{ord(text[exc.start]):04X} at character {exc.start}); send UTF-8 text",
            param) from None


class ModelLoadError(ConveyorError):
    """A model could not be found or loaded; the message says what to do about it."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint's architecture is not one conveyor implements."""


class CapacityError(ConveyorError):
    """A request can never fit in the KV cache as configured (it would be retried forever)."""


class TensorParallelError(ConveyorError):
    """A tensor-parallel worker process failed (died, or raised while loading or stepping): the
    engine cannot step any more; the message names the rank and how it ended."""
