"""Write small GGUF files with the ``gguf`` package for tests: an HF Llama model's weights in
llama.cpp's layout (permuted Q/K rows), SmolLM2's tokenizer and chat template copied over, and
optionally a ``rope_freqs`` tensor."""

from __future__ import annotations

import math

import numpy as np

_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def llama3_rope_factors(head_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """``rope_freqs`` as llama.cpp's converter computes it from HF's llama3 rope_scaling."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation of Q/K rows (HF rotate-half -> interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _copy_tokenizer(writer, tokenizer_gguf: str, token_texts: dict[int, str] | None = None,
                    drop_keys: tuple[str, ...] = ()) -> None:
    """Copy the ``tokenizer.*`` keys of ``tokenizer_gguf``; ``token_texts`` renames vocabulary
    entries (id -> new text), ``drop_keys`` leaves keys out."""
    import gguf
    for key, field in gguf.GGUFReader(tokenizer_gguf).fields.items():
        if key.startswith("tokenizer.") and key not in drop_keys:
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            value = field.contents()
            if key == "tokenizer.ggml.tokens" and token_texts:
                value = [token_texts.get(i, t) for i, t in enumerate(value)]
            writer.add_key_value(key, value, field.types[0], sub_type=sub)


def write_llama_gguf(path: str, hf_model, tokenizer_gguf: str, rope_freqs: np.ndarray | None,
                     end_ids: dict[str, int] | None = None, token_texts: dict[int, str] | None = None,
                     drop_keys: tuple[str, ...] = (), arch_keys: dict | None = None) -> None:
    """``hf_model`` (a transformers LlamaForCausalLM) as an fp32 GGUF of architecture "llama".

    end_ids: extra ``tokenizer.ggml.<name>`` id keys, e.g. ``{"eot_token_id": 5}``; token_texts,
    drop_keys: as ``_copy_tokenizer`` takes them; arch_keys: extra ``llama.<name>`` keys (str,
    int as uint32, float as float32), e.g. ``{"rope.scaling.type": "yarn"}``."""
    import gguf
    c = hf_model.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    for name, value in (arch_keys or {}).items():
        add = w.add_string if isinstance(value, str) else \
            w.add_uint32 if isinstance(value, int) else w.add_float32
        add(f"llama.{name}", value)
    _copy_tokenizer(w, tokenizer_gguf, token_texts, drop_keys)
    for name, token_id in (end_ids or {}).items():
        w.add_uint32(f"tokenizer.ggml.{name}", token_id)
    for name, t in hf_model.state_dict().items():
        arr = t.detach().float().numpy()
        if name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", arr)
        elif name == "lm_head.weight":
            w.add_tensor("output.weight", arr)
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", arr)
        elif name.startswith("model.layers."):
            layer, rest = name[len("model.layers."):].split(".", 1)
            module = rest.rsplit(".", 1)[0]
            if module == "self_attn.q_proj":
                arr = _permute(arr, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                arr = _permute(arr, c.num_key_value_heads)
            w.add_tensor(f"blk.{layer}.{_LAYER_NAMES[module]}.weight", arr)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
