"""Cheap checks that refuse a prompt before the front end spends work on it (tokenization).

Owns the character bound: a prompt longer than ``max_prompt_chars`` characters cannot fit the
context under any tokenization, because no token stands for more than ``max_token_chars``
characters of input. Invariant: the bound never refuses a prompt that would fit (it is an upper
bound on the characters ``max_model_len - 1`` tokens can cover); prompts under it are tokenized
and checked exactly afterwards.
"""

from __future__ import annotations

from typing import Any

from conveyor.server.http_errors import ApiError

# A normalizer (NFC, NFKC...) may merge several input characters into one before the tokenizer
# sees them; this much slack keeps the bound an upper bound for such tokenizers.
_NORMALIZER_SLACK = 4


def max_token_chars(tokenizer: Any) -> int:
    """Most input characters one token of ``tokenizer`` can stand for.

    A vocabulary entry's own spelling is at least as long as the text it matches: byte-level BPE
    spells each byte as one character (a character is at least one byte), SentencePiece spells
    the text itself with "▁" for a space, WordPiece adds "##". Added (special) tokens are in the
    vocabulary with their literal text.
    """
    hf = tokenizer.hf
    longest = max(map(len, hf.get_vocab()), default=1)
    normalizer = getattr(getattr(hf, "backend_tokenizer", None), "normalizer", None)
    return max(1, longest) * (_NORMALIZER_SLACK if normalizer is not None else 1)


def message_chars(messages: list[dict[str, Any]]) -> int:
    """Characters of chat message content (strings, or the text of content parts); the rendered
    prompt holds at least these."""
    total = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            for part in content:
                text = part.get("text") if isinstance(part, dict) else part
                if isinstance(text, str):
                    total += len(text)
    return total


def check_prompt_chars(num_chars: int, max_prompt_chars: int, max_model_len: int) -> None:
    """400 for a prompt that has more characters than the context could hold."""
    if max_prompt_chars and num_chars > max_prompt_chars:
        raise ApiError(400, f"the prompt has {num_chars} characters, more than a context of "
                            f"{max_model_len} tokens can hold under this tokenizer (at most "
                            f"{max_prompt_chars}); shorten the prompt", param="prompt",
                       code="context_length_exceeded")
