"""The architecture description our model modules are built from (HF config.json or GGUF metadata).

One frozen dataclass for the whole Llama family: Llama 2/3 (rope scaling), SmolLM2 (tied
embeddings), Mistral (no sliding window), Qwen2 (q/k/v bias).
"""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.errors import UnsupportedModelError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True, slots=True)
class ArchConfig:
    architecture: str                 # one of SUPPORTED_ARCHITECTURES' values
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    rope_scaling: tuple = ()          # sorted (key, value) pairs of HF's rope_scaling dict
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        if self.eos_token_id is None:
            return frozenset()
        if isinstance(self.eos_token_id, int):
            return frozenset([self.eos_token_id])
        return frozenset(self.eos_token_id)

    def kv_bytes_per_token(self, dtype_size: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_size


def arch_config_from_hf(cfg: dict) -> ArchConfig:
    """Build from a parsed config.json; raises UnsupportedModelError for other architectures."""
    archs = cfg.get("architectures") or []
    arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedModelError(
            f"architecture {archs or cfg.get('model_type')!r} is not supported; conveyor runs "
            f"{sorted(SUPPORTED_ARCHITECTURES)}")
    heads = cfg["num_attention_heads"]
    rope = dict(cfg.get("rope_scaling") or {})
    params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    if not rope and params.get("rope_type", "default") != "default":
        rope = {k: v for k, v in params.items() if k != "rope_theta"}
    max_pos = cfg.get("max_position_embeddings", 2048)
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", arch == "mistral") else None
    if window:
        # Full attention equals sliding-window attention while the context fits in the window.
        max_pos = min(max_pos, window)
    return ArchConfig(
        architecture=arch, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
        num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
        rope_scaling=tuple(sorted((k, _hashable(v)) for k, v in rope.items())),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=_hashable(cfg.get("eos_token_id")))


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v
