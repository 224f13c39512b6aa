"""What a GGUF file says about its tokenizer beyond the vocabulary: chat template and end ids.

Owns reading ``tokenizer.chat_template`` and the ids that end a generation. transformers' GGUF
tokenizer conversion keeps only ``tokenizer.ggml.eos_token_id``; llama.cpp ends a generation on
more, and so do we:

- the metadata keys ``tokenizer.ggml.eos_token_id``, ``eot_token_id`` (end of turn, e.g. Llama
  3's ``<|eot_id|>``) and ``eom_token_id`` (end of message, Llama 3.1's ``<|eom_id|>``);
- tokens llama.cpp recognises by their text as ending a turn (``TURN_END_TOKENS``): many GGUF
  files, Gemma 3's among them, carry no ``eot_token_id`` although their chat turns end in
  ``<end_of_turn>``.

llama.cpp's list also has document-end tokens (``<|endoftext|>``, ``<|end_of_text|>``); we leave
those out unless a key names them: in files where they are not the eos (SmolLM2's
``<|endoftext|>`` is its unknown token) stopping on them would cut plain completions short
where transformers and vLLM go on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from conveyor.errors import ModelLoadError

CHAT_TEMPLATE_KEY = "tokenizer.chat_template"
END_ID_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
               "tokenizer.ggml.eom_token_id")
# Token texts that end a chat turn, from llama.cpp's end-of-generation detection (llama-vocab).
TURN_END_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
                   "<EOT>", "_<EOT>", "<end_of_utterance>")


@dataclass(frozen=True, slots=True)
class GgufTokenizerMeta:
    """``chat_template``: the file's template or None; ``end_token_ids``: ids the metadata keys
    of ``END_ID_KEYS`` name (text-recognised turn ends are added by ``end_of_generation_ids``)."""

    chat_template: str | None
    end_token_ids: frozenset[int]


def _reader(path: str):
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError/struct.error/OSError on truncated or foreign files
        raise ModelLoadError(f"could not read GGUF metadata from {path!r}: {exc}") from exc


def read_gguf_tokenizer_meta(path: str) -> GgufTokenizerMeta:
    """The chat template and end ids stored in the GGUF file at ``path`` (one parse of the file)."""
    fields = _reader(path).fields
    entry = fields.get(CHAT_TEMPLATE_KEY)
    template = None
    if entry is not None and entry.data:
        # parts[data[0]] is the raw UTF-8 bytes of the string value; this works on every gguf
        # version, unlike ReaderField.contents() which newer releases added.
        template = bytes(entry.parts[entry.data[0]]).decode("utf-8")
    ids = set()
    for key in END_ID_KEYS:
        f = fields.get(key)
        if f is not None and f.data:
            value = f.parts[f.data[0]]
            if len(value) == 1:
                ids.add(int(value[0]))
    return GgufTokenizerMeta(template, frozenset(ids))


def turn_end_ids(hf: Any) -> frozenset[int]:
    """Ids of ``TURN_END_TOKENS`` present in the vocabulary of the HF tokenizer ``hf``."""
    vocab = hf.get_vocab()
    return frozenset(vocab[t] for t in TURN_END_TOKENS if t in vocab)


def end_of_generation_ids(meta: GgufTokenizerMeta, hf: Any) -> frozenset[int]:
    """Every id that ends a generation for a GGUF tokenizer: the keyed ids plus turn-end tokens,
    limited to ids the vocabulary has."""
    size = len(hf)
    return frozenset(i for i in meta.end_token_ids | turn_end_ids(hf) if 0 <= i < size)
