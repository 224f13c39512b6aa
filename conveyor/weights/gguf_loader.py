"""Read a GGUF file into an ``ArchConfig`` and an HF-named fp32 state dict.

Quantized tensors (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K, ... whatever the ``gguf`` package can
dequantize) are dequantized at load. GGUF files of the ``llama`` architecture store Q and K
weights with llama.cpp's permuted rotary layout; we undo it so HF's "rotate half" RoPE applies
(other architectures are not permuted). Tensor names and values a family stores its own way go
through that family's ``GGUF_LAYER_NAMES`` and ``gguf_to_hf`` (``models/registry.py``).
``rope_freqs`` (llama.cpp's Llama 3.1/3.2 RoPE scaling) becomes ``ArchConfig.rope_freq_factors``.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

from conveyor.errors import ModelLoadError, UnsupportedModelError
from conveyor.models import registry
from conveyor.models.config import ArchConfig

_NAME_MAP = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_MAP = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_ROPE_FREQS = "rope_freqs.weight"


def _reader(path: str):
    import gguf
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a usable GGUF"
        raise ModelLoadError(f"{path} is not a readable GGUF file ({e})") from e


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _dequantize(t) -> np.ndarray:
    import gguf
    try:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise ModelLoadError(
            f"tensor {t.name} uses GGUF type {t.tensor_type.name}, which cannot be dequantized "
            "here; convert the file to F16/Q8_0/Q4_K") from e
    return np.array(arr, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])


def _rope_freq_factors(r) -> tuple[float, ...]:
    tensor = next((t for t in r.tensors if t.name == _ROPE_FREQS), None)
    return () if tensor is None else tuple(float(x) for x in _dequantize(tensor).reshape(-1))


def _yarn_params(a, factor: float) -> dict:
    """HF's yarn ``rope_scaling`` keys from llama.cpp's: ``original_context_length``, the betas,
    and ``yarn_attn_factor``, which llama.cpp multiplies into ``0.1 ln(factor) + 1`` (HF's
    default attention factor). An ``ext_factor`` other than llama.cpp's default (-1 or 1: the
    full ramp) or a ``yarn_log_multiplier`` has no HF counterpart and is refused."""
    ext, log_mul = a("rope.scaling.yarn_ext_factor"), a("rope.scaling.yarn_log_multiplier")
    if ext not in (None, -1.0, 1.0) or log_mul not in (None, 0.0):
        raise UnsupportedModelError(
            f"yarn rope scaling with yarn_ext_factor={ext} / yarn_log_multiplier={log_mul} is "
            "not supported (llama.cpp's defaults only: -1 or 1, and 0)")
    out = {}
    if a("rope.scaling.original_context_length") is not None:
        out["original_max_position_embeddings"] = int(a("rope.scaling.original_context_length"))
    for key in ("beta_fast", "beta_slow"):
        if a(f"rope.scaling.yarn_{key}") is not None:
            out[key] = float(a(f"rope.scaling.yarn_{key}"))
    attn = a("rope.scaling.yarn_attn_factor")
    if attn is not None and attn != 1.0:
        out["attention_factor"] = float(attn) * (1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0)
    return out


def read_gguf_config(path: str, reader=None) -> ArchConfig:
    """Architecture hyper-parameters from GGUF metadata (and the ``rope_freqs`` tensor)."""
    r = reader or _reader(path)
    arch = _field(r, "general.architecture")
    family = registry.gguf_family(arch)
    a = lambda k, d=None: _field(r, f"{arch}.{k}", d)  # noqa: E731
    heads = a("attention.head_count")
    hidden = a("embedding_length")
    tokens = r.fields.get("tokenizer.ggml.tokens")
    vocab = a("vocab_size") or (len(tokens.data) if tokens is not None else None)
    has_output = any(t.name == "output.weight" for t in r.tensors)
    rope = {}
    if a("rope.scaling.type") not in (None, "none"):
        rope = {"rope_type": a("rope.scaling.type"), "factor": a("rope.scaling.factor", 1.0)}
        if rope["rope_type"] == "yarn":
            rope.update(_yarn_params(a, float(rope["factor"])))
    base = dict(
        architecture=family, vocab_size=vocab, hidden_size=hidden,
        intermediate_size=a("feed_forward_length"), num_layers=a("block_count"), num_heads=heads,
        num_kv_heads=a("attention.head_count_kv", heads),
        head_dim=a("attention.key_length") or hidden // heads,
        rms_norm_eps=a("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=float(a("rope.freq_base", 10000.0)),
        max_position_embeddings=a("context_length", 2048), tie_word_embeddings=not has_output,
        attention_bias=any(t.name == "blk.0.attn_q.bias" for t in r.tensors),
        rope_scaling=tuple(sorted(rope.items())), rope_freq_factors=_rope_freq_factors(r),
        bos_token_id=_field(r, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(r, "tokenizer.ggml.eos_token_id"))
    base.update(registry.family(family).gguf_config_extras(a))
    return ArchConfig(**base)


def hf_name(gguf_name: str, layer_names: dict[str, str] | None = None) -> str | None:
    """HF parameter name for a GGUF tensor name (None for tensors we do not use);
    ``layer_names``: the family's own names inside a layer (``GGUF_LAYER_NAMES``)."""
    base, _, kind = gguf_name.rpartition(".")
    if base in _NAME_MAP:
        return f"{_NAME_MAP[base]}.{kind}"
    m = _LAYER_RE.match(gguf_name)
    names = {**_LAYER_MAP, **(layer_names or {})}
    if m and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's converter permutation of Q/K rows (weights or biases)."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str) -> tuple[ArchConfig, dict[str, torch.Tensor]]:
    """Config and fp32 state dict (HF names and values) from a GGUF file."""
    r = _reader(path)
    cfg = read_gguf_config(path, r)
    family = registry.family(cfg.architecture)
    permuted = _field(r, "general.architecture") == "llama"
    state = {}
    for t in r.tensors:
        name = hf_name(t.name, family.GGUF_LAYER_NAMES)
        if name is None:
            continue
        arr = _dequantize(t)
        if permuted and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            arr = unpermute_rotary(arr, cfg.num_heads)
        elif permuted and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            arr = unpermute_rotary(arr, cfg.num_kv_heads)
        state[name] = torch.from_numpy(np.ascontiguousarray(family.gguf_to_hf(name, arr)))
    return cfg, state
