"""Tiny GGUF files written from the tiny HF checkpoints of hf_factory, the way llama.cpp's converter writes them.

``write_gguf(hf_dir, out_path, arch)`` writes llama.cpp's metadata keys and tensor names, applies what its
``convert_hf_to_gguf.py`` applies (the llama-family Q/K row permutation; Gemma's ``+ 1`` on norm gains) and
quantises the matrices with gguf-py's own quantisers (Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1, F16, BF16; norms
stay F32). The tensor-name table here is written from llama.cpp's naming, independently of
``jaxlens.models.gguf``; the oracle the tests compare against is transformers' own GGUF loader.
"""
from __future__ import annotations

import json
import os

import numpy as np

# HF block-tensor suffix -> llama.cpp name
_BLOCK = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LLAMA_NORMS = {"post_attention_layernorm": "ffn_norm"}
_GEMMA_NORMS = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
             "gemma3_text": "gemma3"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF rotate-half rows -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str, model_type: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")
    assert parts[:2] == ["model", "layers"], hf
    i, rest, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
    table = dict(_BLOCK, **(_GEMMA_NORMS if model_type.startswith("gemma") else _LLAMA_NORMS))
    return f"blk.{i}.{table[rest]}.{kind}"


def _tokenizer_lists(hf_dir: str):
    tj = json.load(open(os.path.join(hf_dir, "tokenizer.json"), encoding="utf-8"))
    vocab = tj["model"]["vocab"]
    for t in tj.get("added_tokens", []):
        vocab.setdefault(t["content"], t["id"])
    tokens = [None] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():
        tokens[i] = tok
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    special = {t["content"] for t in tj.get("added_tokens", []) if t.get("special")}
    types = [3 if t in special else 1 for t in tokens]     # 3 = CONTROL, 1 = NORMAL
    return tokens, merges, types


def write_gguf(hf_dir: str, out_path: str, *, qtypes=("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16"),
               name: str = "tiny test model", arch_override: str | None = None) -> str:
    import gguf
    from safetensors.numpy import load_file

    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    mt = cfg["model_type"]
    arch = arch_override or GGUF_ARCH[mt]
    sd = load_file(os.path.join(hf_dir, "model.safetensors"))
    H, K = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // H
    w = gguf.GGUFWriter(out_path, arch)
    w.add_name(name)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(K)
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    rp = cfg.get("rope_parameters") or {}
    theta = rp.get("full_attention", rp).get("rope_theta") if rp else cfg.get("rope_theta", 10000.0)
    w.add_rope_freq_base(float(theta or 10000.0))
    w.add_vocab_size(cfg["vocab_size"])
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    elif arch != "qwen2":                       # llama.cpp's Qwen2 converter states no head width
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch in ("gemma2", "gemma3"):
        w.add_sliding_window(cfg["sliding_window"])
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.get("attn_logit_softcapping") or 50.0)
        w.add_final_logit_softcapping(cfg.get("final_logit_softcapping") or 30.0)
    tokens, merges, types = _tokenizer_lists(hf_dir)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.get("bos_token_id", 0))
    w.add_eos_token_id(cfg.get("eos_token_id", 1))
    w.add_pad_token_id(cfg.get("pad_token_id", 2))
    w.add_add_bos_token(False)
    matrices = 0
    for hf in sorted(sd):
        t = sd[hf].astype(np.float32)
        g = gguf_name(hf, mt)
        if arch == "llama" and g.endswith("attn_q.weight"):
            t = _permute(t, H)
        elif arch == "llama" and g.endswith("attn_k.weight"):
            t = _permute(t, K)
        if arch in ("gemma2", "gemma3") and g.endswith("norm.weight"):
            t = t + 1.0
        if t.ndim == 2 and t.shape[-1] % 32 == 0:
            q = getattr(gguf.GGMLQuantizationType, qtypes[matrices % len(qtypes)])
            matrices += 1
            if q == gguf.GGMLQuantizationType.F16:
                w.add_tensor(g, t.astype(np.float16))
            else:
                w.add_tensor(g, gguf.quants.quantize(t, q), raw_dtype=q)
        else:
            w.add_tensor(g, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path
