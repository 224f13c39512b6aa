"""Loading a model's tokenizer and the encode / decode / chat-template surface the engine uses.

Owns: finding a tokenizer (an HF model directory or a GGUF file), loading it through transformers'
fast-tokenizer machinery, and exposing one small API over it. Invariants:

- A ``Tokenizer`` does not change after construction; derived sets (special ids, eos ids) are frozen
  at load time.
- ``decode`` never applies ``clean_up_tokenization_spaces``, so decoding a whole sequence equals the
  concatenation of incremental decodes: streamed and non-streamed outputs agree.
- Load problems raise ``ModelLoadError`` naming the missing or broken file; bad user input raises
  ``InvalidRequestError``: text that is not valid Unicode (a lone surrogate) is refused before it
  reaches the tokenizer or a chat template's output is encoded. Loading never touches the network
  (``local_files_only``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

from conveyor.errors import InvalidRequestError, ModelLoadError, check_text
from conveyor.tokenizer.chat_template import ChatTemplateRenderer
from conveyor.tokenizer.gguf_meta import end_of_generation_ids, read_gguf_tokenizer_meta

_CACHE_VERSION = "2"   # bump when what _save_converted writes changes (2: generation_config.json)
_NO_TEMPLATE_MESSAGE = ("this model has no chat template (base models' files often carry none); "
                        "send a plain prompt to /v1/completions, or start the server with "
                        "--chat-template PATH (a Jinja template file)")


@dataclass(slots=True, eq=False)
class Tokenizer:
    """A loaded tokenizer plus its chat template.

    ``hf`` is the underlying transformers fast tokenizer; ``chat_template`` is the Jinja source or
    None. ``extra_eos_token_ids`` are ids besides ``eos_token_id`` that also end generation (e.g. from
    ``generation_config.json``). Build instances with ``from_hf_dir``, ``from_gguf`` or
    ``load_tokenizer`` rather than directly.
    """

    hf: Any
    chat_template: str | None = None
    extra_eos_token_ids: frozenset[int] = frozenset()
    _all_special_ids: frozenset[int] = field(init=False, repr=False)
    _eos_token_ids: frozenset[int] = field(init=False, repr=False)
    _renderer: ChatTemplateRenderer = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # transformers' GGUF loader marks <repo_name>, <file_sep>... as special in added_tokens_decoder
        # (so decode(skip_special_tokens=True) drops them) but leaves them out of all_special_ids;
        # take the union so callers see exactly the ids that skipping removes.
        flagged = {i for i, tok in self.hf.added_tokens_decoder.items() if tok.special}
        self._all_special_ids = frozenset(flagged | set(self.hf.all_special_ids))
        eos = {self.hf.eos_token_id} if self.hf.eos_token_id is not None else set()
        self._eos_token_ids = frozenset(eos | set(self.extra_eos_token_ids))
        self._renderer = ChatTemplateRenderer()

    @classmethod
    def from_hf_dir(cls, path: str, chat_template: str | None = None) -> Tokenizer:
        """Load from an HF model directory holding ``tokenizer.json`` and/or ``tokenizer_config.json``.

        The chat template comes from ``chat_template`` if given, else ``chat_template.jinja``, else
        ``tokenizer_config.json``'s ``chat_template``. Raises ModelLoadError when files are missing.
        """
        if not os.path.isdir(path):
            raise ModelLoadError(
                f"model directory {path!r} does not exist; pass an HF model directory or a .gguf file")
        if not _has_hf_tokenizer_files(path):
            raise ModelLoadError(
                f"{path!r} has no tokenizer.json or tokenizer_config.json; copy the model's tokenizer files "
                "into it or point at a .gguf file")
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # transformers raises OSError/ValueError/KeyError... for broken files
            raise ModelLoadError(f"could not load the tokenizer in {path!r}: {exc}") from exc
        _require_fast(hf, path)
        template = chat_template if chat_template is not None else _read_hf_chat_template(path)
        return cls(hf, template, _read_generation_eos_ids(path))

    @classmethod
    def from_gguf(cls, path: str, chat_template: str | None = None) -> Tokenizer:
        """Load from a GGUF file's ``tokenizer.ggml.*`` metadata via transformers' GGUF support.

        The chat template comes from ``chat_template`` if given, else the file's
        ``tokenizer.chat_template`` key. Generation also ends on the ids ``gguf_meta`` finds
        (``eot_token_id`` / ``eom_token_id`` keys, turn-end tokens such as ``<end_of_turn>``).
        Raises ModelLoadError if the file is missing or unreadable.
        """
        if not os.path.isfile(path):
            raise ModelLoadError(f"GGUF file {path!r} does not exist; check the model path")
        from transformers import AutoTokenizer

        folder, name = os.path.split(os.path.abspath(path))
        cached = _converted_cache_dir(path)
        if cached is not None and os.path.isfile(os.path.join(cached, "tokenizer.json")):
            try:
                return cls.from_hf_dir(cached, chat_template)
            except Exception:  # noqa: BLE001 - a broken cache entry is rebuilt below
                pass
        try:
            hf = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(
                f"could not read a tokenizer from GGUF file {path!r} "
                f"(it needs tokenizer.ggml.* metadata): {exc}") from exc
        _require_fast(hf, path)
        meta = read_gguf_tokenizer_meta(path)
        if chat_template is None:
            chat_template = hf.chat_template if isinstance(hf.chat_template, str) else meta.chat_template
        end_ids = end_of_generation_ids(meta, hf)
        _save_converted(hf, chat_template, end_ids, cached)
        return cls(hf, chat_template, end_ids - {hf.eos_token_id})

    def with_chat_template(self, chat_template: str | None) -> Tokenizer:
        """A copy of this tokenizer using ``chat_template`` (e.g. from ``--chat-template``)."""
        return replace(self, chat_template=chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for ``text``; ``add_special_tokens`` adds BOS etc. only where the model's config asks.

        A conversation goes through ``encode_chat`` (templates already emit BOS).
        """
        if not isinstance(text, str):
            raise InvalidRequestError(f"prompt must be a string, got {type(text).__name__}", "prompt")
        check_text(text, "prompt")        # the Rust tokenizer raises TypeError on lone surrogates
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text for ``ids``; with ``skip_special_tokens`` special tokens contribute nothing."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens,
                              clean_up_tokenization_spaces=False)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        """The vocabulary pieces (e.g. ``'Ġworld'``) for ``ids``."""
        return list(self.hf.convert_ids_to_tokens(list(ids)))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render ``messages`` with this model's chat template (see ``chat_template.validate_messages``).

        Raises InvalidRequestError if the model has no template or the messages/template are invalid.
        """
        if not self.chat_template:
            raise InvalidRequestError(_NO_TEMPLATE_MESSAGE, "messages")
        return self._renderer.render(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.hf.bos_token or "", eos_token=self.hf.eos_token or "", **kwargs)

    def encode_chat(self, messages: list[dict], *, add_generation_prompt: bool = True,
                    tools: list[dict] | None = None, add_special_tokens: bool = False) -> list[int]:
        """Prompt token ids for a conversation: ``messages`` rendered with the chat template, then
        encoded. The one place a chat becomes tokens.

        tools: OpenAI function definitions handed to the template as ``tools`` (None: the
          variable is left undefined, as templates expect when no tools are offered).
        add_special_tokens: False (the default) because templates already emit BOS and friends.
        Raises InvalidRequestError as ``apply_chat_template`` does.
        """
        extra = {} if tools is None else {"tools": tools}
        text = self.apply_chat_template(messages, add_generation_prompt, **extra)
        return self.encode(text, add_special_tokens=add_special_tokens)

    def chat_template_variables(self) -> frozenset[str]:
        """Names the chat template reads (``tools`` if it renders tool definitions); empty
        without a template."""
        return self._renderer.variables(self.chat_template) if self.chat_template else frozenset()

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce, added tokens included."""
        return len(self.hf)

    @property
    def all_special_ids(self) -> frozenset[int]:
        return self._all_special_ids

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation: ``eos_token_id`` plus ``extra_eos_token_ids``."""
        return self._eos_token_ids


def load_tokenizer(model_path: str, chat_template: str | None = None) -> Tokenizer:
    """Load the tokenizer for ``model_path``: a ``.gguf`` file, or a directory.

    A directory with tokenizer files loads as HF; one without them but holding exactly one ``.gguf``
    file loads that file. ``chat_template`` (template text or a path to a template file) overrides
    the model's own template.
    """
    override = resolve_chat_template(chat_template) if chat_template is not None else None
    if os.path.isfile(model_path):
        if not model_path.lower().endswith(".gguf"):
            raise ModelLoadError(
                f"{model_path!r} is a file but not a .gguf file; pass a .gguf file or a model directory")
        return Tokenizer.from_gguf(model_path, override)
    if not os.path.isdir(model_path):
        raise ModelLoadError(
            f"model path {model_path!r} does not exist; pass a .gguf file or an HF model directory")
    has_hf = _has_hf_tokenizer_files(model_path)
    ggufs = sorted(f for f in os.listdir(model_path) if f.lower().endswith(".gguf"))
    if not has_hf and len(ggufs) == 1:
        return Tokenizer.from_gguf(os.path.join(model_path, ggufs[0]), override)
    if not has_hf and len(ggufs) > 1:
        raise ModelLoadError(
            f"{model_path!r} holds several .gguf files ({', '.join(ggufs)}); pass the path of one")
    return Tokenizer.from_hf_dir(model_path, override)


def resolve_chat_template(value: str) -> str:
    """``--chat-template`` value to template text: read it if it names a file, else use it verbatim.

    A value that is neither an existing file nor looks like Jinja (no ``{``) is almost certainly a
    mistyped path, so it raises ModelLoadError instead of becoming a template that prints the path.
    """
    if os.path.isfile(value):
        try:
            with open(value, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"could not read chat template file {value!r}: {exc}") from exc
    if "{" not in value:
        raise ModelLoadError(f"--chat-template {value!r} is neither an existing file nor a Jinja template; "
                             "pass a path to a template file or the template text")
    return value


def read_gguf_chat_template(path: str) -> str | None:
    """The ``tokenizer.chat_template`` string stored in a GGUF file, or None if it has none."""
    return read_gguf_tokenizer_meta(path).chat_template


def _require_fast(hf: Any, path: str) -> None:
    # Incremental detokenization and offsets rely on the Rust tokenizers backend.
    if not getattr(hf, "is_fast", False):
        raise ModelLoadError(
            f"the tokenizer in {path!r} is not a fast (tokenizers) tokenizer; add a tokenizer.json")


def _has_hf_tokenizer_files(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"{path!r} is not valid JSON ({exc}); restore the file from the model's source") from exc
    return data if isinstance(data, dict) else None


def _read_hf_chat_template(path: str) -> str | None:
    """Chat template of an HF directory: ``chat_template.jinja`` wins over tokenizer_config.json."""
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    config = _read_json(os.path.join(path, "tokenizer_config.json")) or {}
    template = config.get("chat_template")
    if isinstance(template, list):
        # Named templates: [{"name": "default", "template": ...}, {"name": "tool_use", ...}].
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def _read_generation_eos_ids(path: str) -> frozenset[int]:
    """Extra stop ids from generation_config.json (Llama 3 lists <|eot_id|> there, for example)."""
    config = _read_json(os.path.join(path, "generation_config.json")) or {}
    eos = config.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos]
    return frozenset(i for i in ids if isinstance(i, int) and not isinstance(i, bool))


def _converted_cache_dir(path: str) -> str | None:
    """Where the HF conversion of a GGUF tokenizer is kept: converting takes seconds, loading the
    saved tokenizer.json a fraction of one. Keyed by the file's absolute path, size and mtime."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    import hashlib
    key = hashlib.sha256(f"{_CACHE_VERSION}|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    root = os.environ.get("CONVEYOR_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "conveyor")
    return os.path.join(root, "tokenizers", key)


def _save_converted(hf, chat_template: str | None, end_ids: frozenset[int],
                    cache_dir: str | None) -> None:
    if cache_dir is None:
        return
    try:
        tmp = f"{cache_dir}.tmp{os.getpid()}"
        hf.save_pretrained(tmp)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": sorted(end_ids)}, f)
        if chat_template is not None:
            with open(os.path.join(tmp, "chat_template.jinja"), "w") as f:
                f.write(chat_template)
        os.makedirs(os.path.dirname(cache_dir), exist_ok=True)
        os.replace(tmp, cache_dir)            # atomic: concurrent loaders see all or nothing
    except OSError:
        pass                                  # caching is an optimisation only
