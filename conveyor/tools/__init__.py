"""Tool calling (pure Python, no torch): tool specs, per-family call formats, prompts, parsing.

See ``spec`` (what a request offers), ``formats`` (how a model family writes calls), ``prompt``
(tool messages for a chat template) and ``parser`` (calls out of streamed or whole replies).
"""
