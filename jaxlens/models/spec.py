"""Architecture spec: one dataclass, built from a Hugging Face ``config.json``, that drives the decoder.

Every family difference the decoder honours is a field here (norm kind and placement, activation, rope
variant, per-layer window and rope tables, softcaps, biases, fused projections). Both config spellings
are read: v5 ``rope_parameters`` / ``dtype`` and older ``rope_theta`` + ``rope_scaling`` / ``torch_dtype``.

Strictness: a config key that is neither handled nor known to be harmless metadata raises
:class:`JaxlensError` naming it, and so do known keys set to values we do not implement (penzai's
lesson: silently ignoring ``rope_theta`` broke Llama-3).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from jaxlens.errors import JaxlensError

FAMILIES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
            "gemma3_text", "phi3", "olmo2")

# Keys that never change the forward math (training, generation, bookkeeping).
_HARMLESS = {
    "architectures", "model_type", "transformers_version", "_name_or_path", "name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "cls_token_id", "unk_token_id",
    "decoder_start_token_id", "initializer_range", "use_cache", "dtype", "torch_dtype",
    "attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "classifier_dropout",
    "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
    "summary_first_dropout", "task_specific_params", "is_decoder", "add_cross_attention", "tokenizer_class",
    "max_position_embeddings", "n_ctx", "pretraining_tp", "output_attentions", "output_hidden_states",
    "return_dict", "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "tie_encoder_decoder",
    "is_encoder_decoder", "prefix", "finetuning_task", "auto_map", "cache_implementation",
    "max_window_layers", "use_sliding_window", "_sliding_window_pattern", "sliding_window_pattern",
    "reorder_and_upcast_attn", "use_bidirectional_attention", "initializer_factor", "layer_norm_eps_",
    "bos_token", "eos_token", "pad_token", "torchscript", "use_return_dict", "_attn_implementation",
    "attn_implementation", "_attn_implementation_autoset", "keys_to_ignore_at_inference", "num_labels",
    "original_max_position_embeddings", "rope_scaling", "rope_theta", "rope_parameters", "rope_type",
    "rope_local_base_freq", "rotary_pct", "rotary_emb_base", "partial_rotary_factor", "head_dim",
    "layer_types", "sliding_window", "query_pre_attn_scalar", "attn_logit_softcapping",
    "final_logit_softcapping", "tie_word_embeddings", "attention_bias", "mlp_bias", "hidden_act",
    "hidden_activation", "activation_function", "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon",
    "use_parallel_residual", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer",
    "num_attention_heads", "n_head", "num_key_value_heads", "intermediate_size", "n_inner", "n_positions",
    "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "qkv_bias", "bias",
    "is_llama_config",                    # nanotron export marker (SmolLM2)
}

# Known keys that change the math: accepted only at the listed harmless values.
_MUST_BE = {
    "scale_attn_by_inverse_layer_idx": (False, None),
    "use_bidirectional_attention": (False, None),
    "add_cross_attention": (False, None),
    "is_encoder_decoder": (False, None),
    "quantization_config": (None,),
    "use_mrope": (False, None),           # Qwen2-VL's multimodal rope; text Qwen2 configs write it as false
    "rope_interleaved": (False, None),    # nanotron's interleaved rotary (SmolLM2 configs write it as false)
}

# Leading-underscore keys are loader metadata, except these, which jaxlens reads.
_READ_PRIVATE = {"_sliding_window_pattern"}

# Keys whose non-trivial value means a mixture-of-experts model.
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")

_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """What the decoder needs to know about one checkpoint. Per-layer tables are numpy arrays."""

    arch: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    # normalisation
    norm: str                    # "rms" | "layer"
    norm_eps: float
    norm_offset: float           # 1.0 for Gemma's (1 + w) gains
    norm_scale_in_fp32: bool     # (x * w).to(dtype) [Gemma, OLMo-2] vs w * x.to(dtype) [Llama]
    pre_attn_norm: bool          # block has an input norm (all but OLMo-2)
    pre_mlp_norm: bool           # block has a norm before the MLP (all but OLMo-2)
    post_attn_norm: bool         # Gemma-2/3, OLMo-2: norm on the attention output before the add
    post_mlp_norm: bool
    qk_norm: str                 # "none" | "head" (Qwen3, Gemma-3) | "full" (OLMo-2, over all heads)
    parallel_residual: bool      # GPT-NeoX
    # MLP
    act: str                     # "silu" | "gelu" | "gelu_tanh"
    gated_mlp: bool
    mlp_bias: bool
    # attention
    qkv_bias: bool
    o_bias: bool
    query_scale: float
    attn_softcap: float | None
    windows: tuple               # per layer: 0 = global, w > 0 = sliding window (kv > q - w)
    # positions
    positional: str              # "rope" | "learned"
    max_positions: int
    rotary_dim: int
    rope: tuple                  # per layer: dict(rope_type, theta, factor, ...) as plain tuples
    # embeddings / head
    embed_scale: float | None    # Gemma: sqrt(d), cast to the activation dtype
    tie_embeddings: bool
    lm_head_bias: bool
    final_softcap: float | None
    torch_dtype: str | None = None

    @property
    def kv_groups(self) -> int:
        return self.n_heads // self.n_kv_heads

    def rope_tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-layer RoPE data for sequences within max_position_embeddings.

        Returns (inv_freq [L, rotary_dim/2] float32, cos/sin scaling [L] float32, dynamic factor [L] float32
        (0 = not dynamic; for "dynamic" layers the decoder recomputes inv_freq from each sequence's own
        length once it exceeds max_position_embeddings, see :func:`dynamic_inv_freq`)).
        """
        invs, scales, dyn = [], [], []
        for params in self.rope:
            p = dict(params)
            inv, s = rope_inv_freq(p, self.rotary_dim, self.max_positions, self.max_positions)
            invs.append(inv)
            scales.append(s)
            dyn.append(float(p["factor"]) if p["rope_type"] == "dynamic" else 0.0)
        return (np.stack(invs).astype(np.float32), np.asarray(scales, np.float32),
                np.asarray(dyn, np.float32))

    def rope_thetas(self) -> np.ndarray:
        return np.asarray([dict(p)["theta"] for p in self.rope], np.float32)

    def flops_per_token(self, seq_len: int = 0) -> float:
        """Approximate forward FLOPs per token (matmuls only), for throughput reports."""
        d, hd = self.d_model, self.head_dim
        attn = 2 * d * hd * (2 * self.n_heads + 2 * self.n_kv_heads) + 4 * self.n_heads * hd * seq_len
        mlp = 2 * d * self.d_ff * (3 if self.gated_mlp else 2)
        return self.n_layers * (attn + mlp) + 2 * d * self.vocab_size


def rope_inv_freq(p: dict, dim: int, max_pos: int, seq_len: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies and cos/sin scaling, following transformers' ROPE_INIT_FUNCTIONS (fp32)."""
    kind, base = p["rope_type"], float(p["theta"])
    ar = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv = (1.0 / (np.float32(base) ** ar)).astype(np.float32)
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return (inv / np.float32(p["factor"])).astype(np.float32), 1.0
    if kind == "dynamic":
        # transformers recomputes the base once the sequence outgrows max_position_embeddings.
        if seq_len <= max_pos:
            return inv, 1.0
        factor = float(p["factor"])
        b = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return (1.0 / (np.float32(b) ** ar)).astype(np.float32), 1.0
    if kind == "llama3":
        factor, lo, hi = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old = float(p["original_max_position_embeddings"])
        lo_wav, hi_wav = old / lo, old / hi
        wav = (2 * math.pi / inv).astype(np.float32)
        inv_l = np.where(wav > lo_wav, inv / np.float32(factor), inv).astype(np.float32)
        smooth = ((old / wav - lo) / (hi - lo)).astype(np.float32)
        smoothed = ((1 - smooth) * inv_l / np.float32(factor) + smooth * inv_l).astype(np.float32)
        medium = ~(wav < hi_wav) & ~(wav > lo_wav)
        return np.where(medium, smoothed, inv_l).astype(np.float32), 1.0
    if kind == "yarn":
        factor = p.get("factor")
        orig = float(p["original_max_position_embeddings"])
        if factor is None:
            factor = max_pos / orig
        factor = float(factor)

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        att = p.get("attention_factor")
        if att is None:
            if p.get("mscale") and p.get("mscale_all_dim"):
                att = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
            else:
                att = mscale(factor)
        beta_fast = p.get("beta_fast") or 32
        beta_slow = p.get("beta_slow") or 1

        def corr_dim(rot):
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

        low, high = corr_dim(beta_fast), corr_dim(beta_slow)
        if p.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        pos_freqs = (np.float32(base) ** ar).astype(np.float32)
        extra = (1.0 / pos_freqs).astype(np.float32)
        inter = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
        ef = (1 - ramp).astype(np.float32)
        return (inter * (1 - ef) + extra * ef).astype(np.float32), float(att)
    raise JaxlensError(f"config.json: rope type {kind!r} is not supported (supported: {', '.join(_ROPE_TYPES)})")


# --------------------------------------------------------------------------------------------------
# Parsing


def _first(cfg: dict, *keys, default=None):
    for k in keys:
        if k in cfg and cfg[k] is not None:
            return cfg[k]
    return default


def _rope_params(raw: dict | None, theta_default: float, where: str) -> dict:
    """Normalise one rope dict (v5 ``rope_parameters`` entry or legacy ``rope_scaling``) to our form."""
    raw = dict(raw or {})
    kind = raw.pop("rope_type", None) or raw.pop("type", None) or "default"
    raw.pop("type", None)
    if kind == "su":  # legacy name of longrope
        kind = "longrope"
    if kind not in _ROPE_TYPES:
        raise JaxlensError(f"config.json: {where} rope type {kind!r} is not supported "
                           f"(supported: {', '.join(_ROPE_TYPES)})")
    theta = raw.pop("rope_theta", None)
    raw.pop("partial_rotary_factor", None)
    out = {"rope_type": kind, "theta": float(theta if theta is not None else theta_default)}
    needed = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("original_max_position_embeddings",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    for k in needed.get(kind, ()):
        if raw.get(k) is None:
            raise JaxlensError(f"config.json: {where} rope type {kind!r} needs field {k!r}")
    allowed = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
               "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}
    for k, v in raw.items():
        if k not in allowed:
            raise JaxlensError(f"config.json: {where} rope field {k!r} is not handled by jaxlens")
        out[k] = v
    if kind == "default":
        out = {"rope_type": "default", "theta": out["theta"]}
    return out


def _freeze(d: dict) -> tuple:
    return tuple(sorted(d.items()))


def spec_from_config(cfg: dict, where: str | None = None) -> ArchSpec:
    """Build the :class:`ArchSpec` for a raw ``config.json`` dict; raise JaxlensError on anything unhandled.

    ``where`` names the config's origin in error messages when it is not a ``config.json`` (a GGUF file)."""
    try:
        return _spec_from_config(cfg)
    except JaxlensError as e:
        if where and str(e).startswith("config.json: "):
            raise JaxlensError(f"{where} (its model config): {str(e)[len('config.json: '):]}") from None
        raise


def _is_moe(cfg: dict) -> bool:
    mt = str(cfg.get("model_type") or "")
    return mt.endswith("_moe") or mt in ("mixtral", "dbrx", "deepseek_v2", "deepseek_v3", "jamba", "olmoe") \
        or any(cfg.get(k) not in (None, 0, 1) for k in _MOE_KEYS)


def _spec_from_config(cfg: dict) -> ArchSpec:
    mt = cfg.get("model_type")
    if _is_moe(cfg):
        raise JaxlensError(f"config.json: model_type {mt!r} is a mixture-of-experts model; jaxlens supports "
                           "dense decoders only (MoE is not supported)")
    if mt == "gemma3" and isinstance(cfg.get("text_config"), dict):
        raise JaxlensError("config.json: model_type 'gemma3' is the multimodal wrapper; "
                           "jaxlens supports its text model ('gemma3_text') only")
    if mt not in FAMILIES:
        raise JaxlensError(f"config.json: model_type {mt!r} is not supported "
                           f"(supported: {', '.join(FAMILIES)})")
    for k, v in cfg.items():
        if k in _MUST_BE:
            if v not in _MUST_BE[k]:
                raise JaxlensError(f"config.json: {k}={v!r} changes the model and is not handled by jaxlens")
        elif k.startswith("_") and k not in _READ_PRIVATE:
            continue   # loader metadata (transformers writes e.g. _name_or_path, _commit_hash)
        elif k not in _HARMLESS:
            raise JaxlensError(f"config.json: attribute {k!r} is not handled by jaxlens "
                               f"(it may change the model's math; refusing to ignore it)")

    is_gpt2 = mt == "gpt2"
    d = int(_first(cfg, "hidden_size", "n_embd"))
    n_layers = int(_first(cfg, "num_hidden_layers", "n_layer"))
    n_heads = int(_first(cfg, "num_attention_heads", "n_head"))
    n_kv = int(_first(cfg, "num_key_value_heads", default=n_heads)) if mt != "gpt_neox" and not is_gpt2 else n_heads
    head_dim = int(_first(cfg, "head_dim", default=d // n_heads)) if mt not in ("gpt2", "gpt_neox", "phi3") \
        else d // n_heads
    if mt == "phi3" and cfg.get("head_dim") not in (None, d // n_heads):
        raise JaxlensError("config.json: head_dim differs from hidden_size/num_attention_heads, "
                           "which transformers' Phi-3 ignores; refusing an ambiguous checkpoint")
    d_ff = int(_first(cfg, "intermediate_size", "n_inner", default=4 * d))
    vocab = int(cfg["vocab_size"])
    if n_heads % n_kv:
        raise JaxlensError(f"config.json: num_attention_heads={n_heads} is not a multiple of "
                           f"num_key_value_heads={n_kv}")

    gemma = mt in ("gemma", "gemma2", "gemma3_text")
    act_name = _first(cfg, "hidden_activation", "hidden_act", "activation_function", default="silu")
    if gemma and mt == "gemma":
        act_name = _first(cfg, "hidden_act", "hidden_activation", default="gelu_pytorch_tanh")
    acts = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
            "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
    if act_name not in acts:
        raise JaxlensError(f"config.json: activation {act_name!r} is not supported")
    act = acts[act_name]

    # ---- positions
    max_pos = int(_first(cfg, "max_position_embeddings", "n_positions", default=2048))
    if is_gpt2:
        positional, rotary_dim, rope = "learned", 0, tuple(() for _ in range(n_layers))
    else:
        positional = "rope"
        rp = cfg.get("rope_parameters")
        partial = None
        if isinstance(rp, dict) and rp:
            if mt == "gemma3_text" and ("full_attention" in rp or "sliding_attention" in rp):
                per_type = {k: _rope_params(v, 1e6 if k == "full_attention" else 1e4, f"rope_parameters[{k}]")
                            for k, v in rp.items()}
                partial = rp.get("full_attention", {}).get("partial_rotary_factor")
            else:
                partial = rp.get("partial_rotary_factor")
                one = _rope_params(rp, 10000.0, "rope_parameters")
                per_type = {"full_attention": one, "sliding_attention": one}
        else:
            theta = _first(cfg, "rope_theta", "rotary_emb_base",
                           default=1e6 if mt == "gemma3_text" else 10000.0)
            scaling = cfg.get("rope_scaling")
            glob = _rope_params(dict(scaling or {}, rope_theta=theta), 10000.0, "rope_scaling")
            if mt == "gemma3_text":
                local = _rope_params({"rope_theta": _first(cfg, "rope_local_base_freq", default=10000.0)},
                                     1e4, "rope_local_base_freq")
            else:
                local = glob
            per_type = {"full_attention": glob, "sliding_attention": local}
        if partial is None:
            partial = _first(cfg, "partial_rotary_factor", "rotary_pct", default=1.0)
        rotary_dim = int(head_dim * float(partial))
        if rotary_dim % 2:
            raise JaxlensError(f"config.json: rotary dimension {rotary_dim} is odd")
        rope = None  # filled after layer types

    # ---- attention windows / layer types
    layer_types = cfg.get("layer_types")
    sw = cfg.get("sliding_window")
    if mt in ("qwen2", "qwen3"):
        if not cfg.get("use_sliding_window", False):
            sw = None
        if layer_types is None:
            mwl = int(cfg.get("max_window_layers", n_layers))
            layer_types = ["sliding_attention" if sw is not None and i >= mwl else "full_attention"
                           for i in range(n_layers)]
    elif mt in ("mistral", "phi3"):
        if layer_types is not None:
            raise JaxlensError(f"config.json: layer_types on {mt} is not handled by jaxlens")
        layer_types = ["sliding_attention" if sw is not None else "full_attention"] * n_layers
    elif mt == "gemma2":
        if layer_types is None:
            layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]
    elif mt == "gemma3_text":
        if layer_types is None:
            pat = int(_first(cfg, "sliding_window_pattern", "_sliding_window_pattern", default=6))
            layer_types = ["sliding_attention" if (i + 1) % pat else "full_attention" for i in range(n_layers)]
    else:
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            raise JaxlensError(f"config.json: layer_types with sliding layers on {mt} is not handled")
        layer_types = ["full_attention"] * n_layers
    if len(layer_types) != n_layers:
        raise JaxlensError(f"config.json: layer_types has {len(layer_types)} entries for {n_layers} layers")
    for t in layer_types:
        if t not in ("full_attention", "sliding_attention"):
            raise JaxlensError(f"config.json: layer type {t!r} is not handled by jaxlens")
    if any(t == "sliding_attention" for t in layer_types) and not sw:
        raise JaxlensError("config.json: sliding layers requested but sliding_window is not set")
    windows = tuple(int(sw) if t == "sliding_attention" else 0 for t in layer_types)
    if positional == "rope":
        rope = tuple(_freeze(per_type[t]) for t in layer_types)

    # ---- scaling / softcaps
    if gemma and mt != "gemma":
        qpa = cfg.get("query_pre_attn_scalar", head_dim)
        query_scale = float(qpa) ** -0.5
    elif is_gpt2:
        query_scale = head_dim ** -0.5 if cfg.get("scale_attn_weights", True) else 1.0
    else:
        query_scale = head_dim ** -0.5
    attn_softcap = cfg.get("attn_logit_softcapping") if mt == "gemma2" else None  # gemma3 ignores it in HF
    final_softcap = cfg.get("final_logit_softcapping") if mt in ("gemma2", "gemma3_text") else None

    norm_eps = float(_first(cfg, "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", default=1e-5))
    tie_default = mt in ("gpt2", "gemma", "gemma2", "gemma3_text")
    tie = bool(cfg.get("tie_word_embeddings", tie_default))
    attention_bias = bool(cfg.get("attention_bias", False))

    common = dict(arch=mt, n_layers=n_layers, d_model=d, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
                  d_ff=d_ff, vocab_size=vocab, norm_eps=norm_eps, act=act, windows=windows,
                  positional=positional, max_positions=max_pos, rotary_dim=rotary_dim, rope=rope,
                  tie_embeddings=tie, lm_head_bias=False, torch_dtype=_first(cfg, "dtype", "torch_dtype"),
                  attn_softcap=None if attn_softcap is None else float(attn_softcap),
                  final_softcap=None if final_softcap is None else float(final_softcap),
                  query_scale=query_scale)
    rms_llama = dict(norm="rms", norm_offset=0.0, norm_scale_in_fp32=False, pre_attn_norm=True,
                     pre_mlp_norm=True, post_attn_norm=False, post_mlp_norm=False, qk_norm="none",
                     parallel_residual=False, gated_mlp=True, embed_scale=None)
    if mt == "gpt2":
        fam = dict(rms_llama, norm="layer", gated_mlp=False, mlp_bias=True, qkv_bias=True, o_bias=True)
    elif mt == "gpt_neox":
        fam = dict(rms_llama, norm="layer", gated_mlp=False, mlp_bias=True, qkv_bias=attention_bias,
                   o_bias=attention_bias, parallel_residual=bool(cfg.get("use_parallel_residual", True)))
    elif mt in ("llama", "mistral", "qwen2", "qwen3", "phi3"):
        qkv_bias = {"qwen2": True, "mistral": False, "phi3": False}.get(mt, attention_bias)
        o_bias = attention_bias if mt in ("llama", "qwen3") else False
        fam = dict(rms_llama, mlp_bias=bool(cfg.get("mlp_bias", False)) if mt == "llama" else False,
                   qkv_bias=qkv_bias, o_bias=o_bias, qk_norm="head" if mt == "qwen3" else "none")
    elif gemma:
        fam = dict(rms_llama, norm_offset=1.0, norm_scale_in_fp32=True, mlp_bias=False,
                   qkv_bias=attention_bias, o_bias=attention_bias, embed_scale=float(d) ** 0.5,
                   post_attn_norm=mt != "gemma", post_mlp_norm=mt != "gemma",
                   qk_norm="head" if mt == "gemma3_text" else "none")
    elif mt == "olmo2":
        fam = dict(rms_llama, norm_scale_in_fp32=True, pre_attn_norm=False, pre_mlp_norm=False,
                   post_attn_norm=True, post_mlp_norm=True, qk_norm="full", mlp_bias=False,
                   qkv_bias=attention_bias, o_bias=attention_bias)
    else:  # pragma: no cover - guarded above
        raise JaxlensError(f"config.json: model_type {mt!r} is not supported")
    return ArchSpec(**common, **fam)
