"""``conveyor bench``: workloads, arrival processes, load generators, reports and plots.

- ``workloads`` / ``datasets`` / ``arrivals``: what is sent and when (seeded).
- ``offline`` (in-process engine) and ``http_client`` (any OpenAI-compatible server): load generators
  producing ``records``.
- ``metrics``: the arithmetic (per run and per tenant / priority group); ``report`` / ``console`` /
  ``plots``: JSON, table, PNGs; ``suite``: policy matrices.
- ``scenarios/`` (``plan``, ``params``, ``workloads``, ``findings``): seeded experiments
  (fairness, priority, prefix, preemption), each a few runs side by side.

Drives only public APIs (``LLMEngine``: ``add_request``, ``step``, ``step_log`` and the typed
``stats()``; or HTTP); never reads engine internals nor changes engine state beyond submitting
requests.
"""
