"""The OpenAI-compatible HTTP server around an ``AsyncEngine`` (``conveyor.engine``).

- ``app``: the FastAPI app factory, model loading and ``serve``; ``lifecycle``: signals, drain.
- ``openai_routes`` / ``utility_routes``: the routes; ``protocol`` / ``chat_fields`` /
  ``structured_protocol``: request bodies; ``responses``: response bodies and stream chunks;
  ``tool_calls``: tool calling over the chat route; ``api_docs``: /openapi.json and /docs.
- ``http_errors``: conveyor's exceptions -> OpenAI-shaped JSON errors (the only place that maps
  them); ``admission``: the cheap character bound checked before tokenizing.
- ``auth`` / ``tenant_limits`` / ``app_state``: API keys, identities, per-tenant limits.
- ``connection_guard`` / ``tokenizer_pool``: bounded connections and tokenizer work.

Never imports ``conveyor.cli``.
"""
