"""GGUF tokenizer metadata a user relies on, on tiny Llama GGUFs written by ``gguf``
(tests/gguf_files.py): the end-of-turn / end-of-message ids (``tokenizer.ggml.eot_token_id``,
``eom_token_id``, turn-end tokens such as ``<end_of_turn>``) end a generation; a GGUF without a
chat template answers /v1/chat/completions with a 400 naming ``--chat-template``, and
``--chat-template`` makes chat work."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest
import torch

from conftest import hf_greedy, run_engine
from conveyor.engine.llm_engine import LLMEngine
from conveyor.errors import InvalidRequestError, ModelLoadError
from conveyor.sampling_params import SamplingParams
from conveyor.tokenizer import Tokenizer
from gguf_files import write_llama_gguf
from test_equivalence import _tiny_common

PROMPT = [(13 * j) % 40000 + 100 for j in range(12)]
TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"


@pytest.fixture(scope="module")
def tiny_hf():
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    cfg = LlamaConfig(**_tiny_common(tie_word_embeddings=False))
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    # The converted-tokenizer cache is keyed by path, size and mtime; keep these files' out of ~.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONVEYOR_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


def _engine(path: str, **kw) -> LLMEngine:
    return LLMEngine.from_kwargs(model=path, dtype="float32", max_num_seqs=2,
                                 max_num_batched_tokens=32, num_blocks=24, block_size=16, **kw)


def _greedy(engine, max_tokens: int, ignore_eos: bool):
    engine.add_request(PROMPT, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                              ignore_eos=ignore_eos))
    (out,) = run_engine(engine).values()
    engine.check_invariants()
    return out.outputs[0]


def test_eot_eom_keys_and_turn_end_tokens_end_generation(tmp_path, tiny_hf, smollm2_path):
    path = str(tmp_path / "eot.gguf")
    write_llama_gguf(path, tiny_hf, smollm2_path, None,
                     end_ids={"eot_token_id": 5, "eom_token_id": 6}, token_texts={4: "<end_of_turn>"})
    fresh = Tokenizer.from_gguf(path)
    assert fresh.eos_token_id == 2 and fresh.eos_token_ids == frozenset({2, 4, 5, 6})
    cached = Tokenizer.from_gguf(path)                  # the converted tokenizer's cache entry
    assert cached.eos_token_ids == fresh.eos_token_ids
    assert cached.convert_ids_to_tokens([4]) == ["<end_of_turn>"]


def test_engine_stops_at_the_eot_token(tmp_path, tiny_hf, smollm2_path):
    reference = hf_greedy(tiny_hf, PROMPT, 12, eos_token_id=None)
    # The first token that had not appeared before, at least 3 tokens in, becomes the eot id.
    k = next(i for i in range(3, len(reference)) if reference[i] not in reference[:i])
    eot = reference[k]
    path = str(tmp_path / "eot.gguf")
    write_llama_gguf(path, tiny_hf, smollm2_path, None, end_ids={"eot_token_id": eot})
    engine = _engine(path)
    assert eot in engine.eos_token_ids
    out = _greedy(engine, 12, ignore_eos=False)
    assert out.finish_reason == "stop" and out.stop_reason in (eot, None)
    assert list(out.token_ids)[:k] == reference[:k] and len(out.token_ids) in (k, k + 1)
    assert list(_greedy(engine, 12, ignore_eos=True).token_ids) == reference   # ignore_eos runs on


@pytest.fixture(scope="module")
def no_template_gguf(tmp_path_factory, tiny_hf, smollm2_path) -> str:
    path = str(tmp_path_factory.mktemp("base") / "base.gguf")
    write_llama_gguf(path, tiny_hf, smollm2_path, None, drop_keys=("tokenizer.chat_template",))
    return path


def _chat(engine, body: dict) -> httpx.Response:
    from conveyor.server.app import ServerConfig, build_app
    app = build_app(ServerConfig(served_model_name="default"), lambda: engine)

    async def scenario():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                while (await client.get("/health")).status_code != 200:   # loading
                    await asyncio.sleep(0.05)
                return await client.post("/v1/chat/completions", json=body)
    return asyncio.run(scenario())


def test_chat_without_a_template_is_a_400_naming_the_flag(no_template_gguf):
    engine = _engine(no_template_gguf)
    assert engine.tokenizer.chat_template is None
    with pytest.raises(InvalidRequestError, match="--chat-template"):
        engine.tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    r = _chat(engine, {"model": "default", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 2})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "no chat template" in err["message"] and "--chat-template" in err["message"]
    assert err["type"] == "invalid_request_error"


def test_chat_template_flag_renders_and_serves(no_template_gguf, tmp_path):
    template_file = tmp_path / "chat.jinja"
    template_file.write_text(TEMPLATE)
    engine = _engine(no_template_gguf, chat_template=str(template_file))
    messages = [{"role": "user", "content": "hi"}]
    assert engine.tokenizer.apply_chat_template(messages) == "<user>hi<assistant>"
    r = _chat(engine, {"model": "default", "messages": messages, "max_tokens": 3,
                       "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["completion_tokens"] == 3
    assert usage["prompt_tokens"] == len(engine.tokenizer.encode("<user>hi<assistant>", False))
    engine.check_invariants()


def test_chat_template_flag_that_is_neither_file_nor_template_fails_at_load(no_template_gguf):
    with pytest.raises(ModelLoadError, match="--chat-template"):
        _engine(no_template_gguf, chat_template=os.path.join("no", "such", "template.jinja"))
