"""Structured outputs: constrain a request's tokens to a JSON schema, regex, choice or grammar.

``params`` (the request-side spec, pure Python), ``backend`` (the Backend / Grammar / Matcher
interface), ``llguidance_backend`` (the first backend), ``compile_service`` (compiles off the
engine thread, LRU-cached), ``request_state`` (what the core carries per request, and one step's
token bitmask). The sampler applies that bitmask (``conveyor.sampling.constraints``).
"""

from conveyor.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
