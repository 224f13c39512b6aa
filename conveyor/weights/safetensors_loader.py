"""Read an HF model directory: config.json plus one or many safetensors shards.

Pickled ``*.bin`` checkpoints are refused on purpose: loading them would execute code from the
file. Shards are found through ``model.safetensors.index.json`` or by globbing ``*.safetensors``.
"""

from __future__ import annotations

import json
import os
from glob import glob

import torch

from conveyor.errors import ModelLoadError
from conveyor.models.config import ArchConfig, arch_config_from_hf


def read_hf_config(model_dir: str) -> ArchConfig:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ModelLoadError(f"{model_dir} has no config.json; pass an HF model directory or a .gguf file")
    with open(path) as f:
        return arch_config_from_hf(json.load(f))


def shard_paths(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, name) for name in files]
    paths = sorted(glob(os.path.join(model_dir, "*.safetensors")))
    if not paths:
        hint = " (only pickled .bin weights found; convert them to safetensors)" if glob(
            os.path.join(model_dir, "*.bin")) else ""
        raise ModelLoadError(f"no *.safetensors weights in {model_dir}{hint}")
    return paths


def load_hf_dir(model_dir: str) -> tuple[ArchConfig, dict[str, torch.Tensor]]:
    """Config and state dict (HF names, dtype as stored) from an HF model directory."""
    from safetensors.torch import load_file
    cfg = read_hf_config(model_dir)
    state: dict[str, torch.Tensor] = {}
    for path in shard_paths(model_dir):
        state.update(load_file(path))
    return cfg, state
