"""The engine: requests in, ``RequestOutput`` objects out, with no HTTP anywhere.

- ``builder``: composes the model, KV cache, runner and swap cost model of an ``EngineConfig``.
- ``llm_engine``: ``LLMEngine`` (synchronous; validates every request once, at ``add_request``).
- ``output_processor`` / ``outputs``: the core's data-only deltas -> ``RequestOutput``.
- ``llm``: ``LLM``, the offline API.
- ``async_engine`` / ``engine_thread`` / ``request_stream``: ``AsyncEngine``, the asyncio front
  of an ``LLMEngine`` stepping on its own thread.
- ``LLMEngine.stats()`` is ``core.stats.EngineStats``, the typed snapshot of scheduler and
  KV-cache occupancy; outputs of ``EngineCore`` are data only (``core.outputs``).

Never imports fastapi, starlette, uvicorn or httpx (``conveyor.server`` does).
"""
