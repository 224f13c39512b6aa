"""Tokenization for conveyor: loading tokenizers, chat templates, and streaming detokenization.

Owns the boundary between text and token ids. ``Tokenizer`` (and ``load_tokenizer``) wrap an HF fast
tokenizer loaded from an HF directory or a GGUF file; ``render_chat_template`` runs chat templates in
a Jinja sandbox; ``IncrementalDetokenizer`` turns generated ids into never-retracted text deltas with
stop-string handling. Nothing here holds module-level mutable state.
"""

from conveyor.tokenizer.chat_template import ChatTemplateRenderer, render_chat_template
from conveyor.tokenizer.detokenizer import IncrementalDetokenizer
from conveyor.tokenizer.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "ChatTemplateRenderer", "IncrementalDetokenizer", "Tokenizer", "load_tokenizer", "render_chat_template",
]
