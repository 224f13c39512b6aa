"""Shared fixtures: the default model path, HF reference generation, engine stepping helpers."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from conveyor.weights.loader import default_model_path
    return default_model_path()


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_token_id) -> list[int]:
    """transformers' greedy generate for one prompt alone: the correctness reference."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id,
                             pad_token_id=eos_token_id, temperature=None, top_p=None, top_k=None)
    return out[0, len(prompt_ids):].tolist()


class StepRecorder:
    """Wraps an engine's scheduler to keep every SchedulerOutput and the running set before it."""

    def __init__(self, engine):
        self.outputs = []
        self.running_before = []
        sched = engine.core.scheduler
        original = sched.schedule

        def schedule():
            self.running_before.append({r.request_id for r in sched.running})
            out = original()
            self.outputs.append(out)
            return out
        sched.schedule = schedule

    def joined_mid_flight(self) -> bool:
        """Some request was first scheduled in a step where others were already running."""
        return any(out.new_requests and before and not out.preempted_request_ids
                   for out, before in zip(self.outputs, self.running_before))

    def chunked_prefill_happened(self, engine_prompts: dict[str, int]) -> bool:
        for out in self.outputs:
            for new in out.new_requests:
                if new.num_computed_tokens == 0 and out.num_scheduled_tokens[new.request_id] < engine_prompts[new.request_id]:
                    return True
        return False

    def num_preemptions(self) -> int:
        return sum(len(o.preempted_request_ids) for o in self.outputs)


def differs_from_hf(engine, hf_model, prompts, max_tokens) -> bool:
    """Whether greedy ``engine`` output differs from transformers' on any prompt (each run for
    its ``max_tokens``, EOS ignored): a test's evidence that what it compares matters."""
    from conveyor.sampling_params import SamplingParams
    ids = [engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True))
           for p, m in zip(prompts, max_tokens)]
    finals = run_engine(engine)
    engine.check_invariants()
    return any(finals[rid].outputs[0].token_ids != hf_greedy(hf_model, p, m, None)
               for rid, p, m in zip(ids, prompts, max_tokens))


def save_tiny_llama(path, smollm2_path: str, seed: int = 0, **config) -> str:
    """A tiny random-weight Llama checkpoint (safetensors) with SmolLM2's tokenizer at ``path``;
    ``config`` overrides the LlamaConfig fields below."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    fields = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  initializer_range=0.3, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**{**fields, **config})).save_pretrained(
        path, safe_serialization=True)
    d, f = os.path.split(smollm2_path)
    AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(path)
    return str(path)


def run_engine(engine, max_steps: int = 100_000) -> dict:
    finals = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert not engine.has_unfinished_requests()
    return finals


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_path) -> str:
    """A tiny random-weight Llama checkpoint (safetensors) with SmolLM2's tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), smollm2_path)


def _vocab32(tmp_path_factory, smollm2_path, seed: int) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    path = tmp_path_factory.mktemp(f"vocab32_{seed}")
    cfg = LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      initializer_range=0.3, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    d, f = os.path.split(smollm2_path)
    AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def vocab32_dir(tmp_path_factory, smollm2_path) -> str:
    return _vocab32(tmp_path_factory, smollm2_path, 0)


@pytest.fixture(scope="session")
def vocab32_draft_dir(tmp_path_factory, smollm2_path) -> str:
    """Another random model (its drafts are sometimes right) with the same vocabulary."""
    return _vocab32(tmp_path_factory, smollm2_path, 1)
