"""Which module builds which model family: HF architecture names and GGUF architectures -> family.

A family module (``llama.py``, ``qwen3.py``, ``gemma3.py``) defines ``MODEL_CLASS``
(an ``nn.Module`` taking ``(ArchConfig, attention_backend, fused_ops)``), ``hf_config_extras(cfg)``
(ArchConfig fields from config.json keys only it has), ``gguf_config_extras(field)`` (the same
from GGUF metadata), ``GGUF_LAYER_NAMES`` (GGUF tensor -> HF parameter names inside a layer,
beyond the shared ones) and ``convert_hf_state(state, cfg)`` (HF-named weights -> its module
tree). Adding a family is one such file plus its entries here. Modules are imported on first use.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from conveyor.errors import UnsupportedModelError

# family name -> module
FAMILIES = {
    "llama": "conveyor.models.llama",
    "mistral": "conveyor.models.llama",
    "qwen2": "conveyor.models.llama",
    "qwen3": "conveyor.models.qwen3",
    "gemma3": "conveyor.models.gemma3",
}
# HF config.json "architectures" entry -> family
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
}
# GGUF general.architecture -> family
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                      "gemma3": "gemma3"}


def family(name: str) -> ModuleType:
    """The module of family ``name`` (a value of HF_ARCHITECTURES / GGUF_ARCHITECTURES)."""
    return importlib.import_module(FAMILIES[name])


def hf_family(cfg: dict) -> str:
    """The family of a parsed config.json; UnsupportedModelError names the supported ones."""
    archs = cfg.get("architectures") or []
    name = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
    if name is None:
        raise UnsupportedModelError(
            f"architecture {archs or cfg.get('model_type')!r} is not supported; conveyor runs "
            f"{sorted(HF_ARCHITECTURES)}")
    return name


def gguf_family(arch: str | None) -> str:
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported; conveyor runs {sorted(GGUF_ARCHITECTURES)}")
    return GGUF_ARCHITECTURES[arch]
