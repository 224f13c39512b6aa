"""The architecture description our model modules are built from (HF config.json or GGUF metadata).

One frozen dataclass for every family (``conveyor/models/registry.py`` lists them): the Llama
family (Llama 2/3 with rope scaling or GGUF ``rope_freqs``, SmolLM2, Mistral with its sliding
window, Qwen2 with q/k/v bias), Qwen3 (q/k RMSNorm) and Gemma 3 (interleaved sliding-window and
global layers). Keys only one family has are read by that family's module
(``hf_config_extras``); this file reads what they share.
"""

from __future__ import annotations

from dataclasses import dataclass

SLIDING = "sliding_attention"      # HF's layer_types names
FULL = "full_attention"


@dataclass(frozen=True, slots=True)
class ArchConfig:
    architecture: str                 # a family name of registry.FAMILIES
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
    qk_norm: bool = False             # RMSNorm over each q and k head before RoPE (Qwen3, Gemma 3)
    sliding_window: int | None = None   # keys a sliding layer's query sees, its own included
    layer_types: tuple[str, ...] = ()   # SLIDING or FULL per layer; () = every layer FULL
    rope_local_theta: float | None = None   # RoPE base of sliding layers, unscaled (Gemma 3)
    attention_scale: float | None = None    # softmax scale; None = head_dim ** -0.5
    hidden_act: str = "silu"          # gated MLP activation: "silu" or "gelu_pytorch_tanh"
    final_logit_softcapping: float | None = None
    rope_freq_factors: tuple[float, ...] = ()   # GGUF rope_freqs: inv_freq[i] / factor[i]

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

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (None: it attends to the whole context)."""
        if self.sliding_window and self.layer_types and self.layer_types[layer] == SLIDING:
            return self.sliding_window
        return None

    def kv_bytes_per_token(self, dtype_size: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_size


def arch_config_from_hf(cfg: dict) -> ArchConfig:
    """Build from a parsed config.json; raises UnsupportedModelError for other architectures."""
    from conveyor.models import registry   # lazy: family modules import this one
    arch = registry.hf_family(cfg)
    heads = cfg["num_attention_heads"]
    rope = dict(cfg.get("rope_scaling") or {})
    params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    if not rope and params.get("rope_type", "default") != "default":
        rope = {k: v for k, v in params.items() if k != "rope_theta"}
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", arch == "mistral") else None
    n = cfg["num_hidden_layers"]
    base = dict(
        architecture=arch, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], num_layers=n,
        num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
        rope_scaling=rope_pairs(rope), sliding_window=window or None,
        layer_types=tuple(cfg.get("layer_types") or [SLIDING] * n) if window else (),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=_hashable(cfg.get("eos_token_id")))
    base.update(registry.family(arch).hf_config_extras(cfg))
    return ArchConfig(**base)


def rope_pairs(rope: dict) -> tuple:
    """HF's rope_scaling dict as ArchConfig stores it (hashable, sorted)."""
    return tuple(sorted((k, _hashable(v)) for k, v in rope.items()))


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v
