"""``conveyor bench``: workloads, arrival processes, load generators, reports and plots.

- ``workloads`` / ``datasets`` / ``arrivals``: what is sent and when (seeded).
- ``offline`` (in-process engine) and ``http_client`` (any OpenAI-compatible server): load generators
  producing ``records``.
- ``metrics``: the arithmetic; ``report`` / ``plots``: JSON, table, PNGs; ``suite``: policy matrices.

Drives only public APIs (``LLMEngine`` and its step log, or HTTP); never engine internals.
"""
