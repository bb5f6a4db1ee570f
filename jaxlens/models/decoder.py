"""The one decoder: a Flax NNX module whose math is configured by an :class:`~jaxlens.models.spec.ArchSpec`.

Layers are stacked (leading axis L) and run with ``jax.lax.scan``; per-layer differences (sliding window,
RoPE frequencies and cos/sin scaling) are scanned *data*, so compile time is flat in depth and one body
serves Gemma-2/3's local/global mix. The scan emits every block output, which gives the raw residual
streams ``[n_layers + 1, B, T, d]`` for free.

Parameter layout (HF weight names are mapped onto it by :mod:`jaxlens.models.convert`)::

    embed [V, d]    pos_embed [P, d] (learned positions)    lm_head [d, V] (absent if tied)
    final_norm {scale [d], bias [d]}
    blocks: ln1, ln2, post_attn_norm, post_mlp_norm, q_norm, k_norm -> {scale [L, n], bias [L, n]}
            wq [L, d, H, hd]  wk/wv [L, d, K, hd]  wo [L, H, hd, d]   bq [L, H, hd]  bk/bv [L, K, hd]  bo [L, d]
            w_gate/w_up [L, d, F]  w_down [L, F, d]  b_up [L, F]  b_down [L, d]

Numerics follow transformers' eager path: norms in fp32 (with each family's cast order), softmax in fp32,
RoPE tables in fp32 cast to the activation dtype, attention scores accumulated in fp32.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlens.models.sharding import lookup_shardings
from jaxlens.models.spec import ArchSpec

F32 = jnp.float32
_NEG = float(np.finfo(np.float32).min)


class ForwardOutput(NamedTuple):
    residuals: jax.Array        # [n_layers + 1, B, T, d], raw (no final norm), compute dtype
    logits: jax.Array           # [B, T, V] float32, the model's own output
    attention_mask: jax.Array   # [B, T] bool: which positions are real tokens


# --------------------------------------------------------------------------------------------------
# Parameter shapes and logical axes (the sharding rules in jaxlens.models.sharding map these names to a mesh)


def param_layout(spec: ArchSpec) -> dict:
    """Nested dict: name -> (shape, logical axis names). The single source of truth for the param tree."""
    L, d, H, K, hd, F, V = (spec.n_layers, spec.d_model, spec.n_heads, spec.n_kv_heads, spec.head_dim,
                            spec.d_ff, spec.vocab_size)

    def norm(n, stacked=True, bias=None):
        lead, ax = ((L,), ("layers",)) if stacked else ((), ())
        out = {"scale": (lead + (n,), ax + ("norm",))}
        if spec.norm == "layer" if bias is None else bias:
            out["bias"] = (lead + (n,), ax + ("norm",))
        return out

    blocks = {
        "wq": ((L, d, H, hd), ("layers", "embed", "heads", "head_dim")),
        "wk": ((L, d, K, hd), ("layers", "embed", "kv_heads", "head_dim")),
        "wv": ((L, d, K, hd), ("layers", "embed", "kv_heads", "head_dim")),
        "wo": ((L, H, hd, d), ("layers", "heads", "head_dim", "embed")),
        "w_up": ((L, d, F), ("layers", "embed", "mlp")),
        "w_down": ((L, F, d), ("layers", "mlp", "embed")),
    }
    if spec.gated_mlp:
        blocks["w_gate"] = ((L, d, F), ("layers", "embed", "mlp"))
    if spec.mlp_bias:
        blocks["b_up"] = ((L, F), ("layers", "mlp"))
        blocks["b_down"] = ((L, d), ("layers", "norm"))
        if spec.gated_mlp:
            blocks["b_gate"] = ((L, F), ("layers", "mlp"))
    if spec.qkv_bias:
        blocks["bq"] = ((L, H, hd), ("layers", "heads", "head_dim"))
        blocks["bk"] = ((L, K, hd), ("layers", "kv_heads", "head_dim"))
        blocks["bv"] = ((L, K, hd), ("layers", "kv_heads", "head_dim"))
    if spec.o_bias:
        blocks["bo"] = ((L, d), ("layers", "norm"))
    if spec.pre_attn_norm:
        blocks["ln1"] = norm(d)
    if spec.pre_mlp_norm:
        blocks["ln2"] = norm(d)
    if spec.post_attn_norm:
        blocks["post_attn_norm"] = norm(d)
    if spec.post_mlp_norm:
        blocks["post_mlp_norm"] = norm(d)
    if spec.qk_norm == "head":
        blocks["q_norm"] = norm(hd, bias=False)
        blocks["k_norm"] = norm(hd, bias=False)
    elif spec.qk_norm == "full":
        blocks["q_norm"] = norm(H * hd, bias=False)
        blocks["k_norm"] = norm(K * hd, bias=False)
    out = {"embed": ((V, d), ("vocab", "embed")), "blocks": blocks, "final_norm": norm(d, stacked=False)}
    if spec.positional == "learned":
        out["pos_embed"] = ((spec.max_positions, d), (None, "embed"))
    if not spec.tie_embeddings:
        out["lm_head"] = ((d, V), ("embed", "vocab"))
    if spec.lm_head_bias:
        out["lm_head_bias"] = ((V,), ("vocab",))
    return out


def _is_layout_leaf(x) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)


def param_shapes(spec: ArchSpec, dtype) -> dict:
    """Abstract parameter tree (jax.ShapeDtypeStruct leaves)."""
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf[0], jnp.dtype(dtype)), param_layout(spec),
                        is_leaf=_is_layout_leaf)


def param_axes(spec: ArchSpec) -> dict:
    """Parameter tree of logical axis-name tuples."""
    return jax.tree.map(lambda leaf: leaf[1], param_layout(spec), is_leaf=_is_layout_leaf)


def init_params(spec: ArchSpec, key: jax.Array, dtype="float32", std: float = 0.02) -> dict:
    """Random parameters (normal(0, std) weights, unit norm gains, zero biases): benchmarks and training."""
    layout = param_layout(spec)
    leaves, treedef = jax.tree.flatten(layout, is_leaf=_is_layout_leaf)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        layout, is_leaf=_is_layout_leaf)[0]]
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, path, (shape, _) in zip(keys, paths, leaves):
        name = path.split("'")[-2]
        if name == "scale":
            val = jnp.full(shape, 1.0 - spec.norm_offset, F32)
        elif name in ("bias", "bq", "bk", "bv", "bo", "lm_head_bias") or name.startswith("b_"):
            val = jnp.zeros(shape, F32)
        else:
            val = std * jax.random.normal(k, shape, F32)
        out.append(val.astype(dtype))
    return jax.tree.unflatten(treedef, out)


# --------------------------------------------------------------------------------------------------
# Building blocks (pure functions)


def apply_norm(spec: ArchSpec, p: dict, x: jax.Array) -> jax.Array:
    """The family's norm (RMSNorm or LayerNorm), statistics in fp32, result in x's dtype."""
    dtype = x.dtype
    xf = x.astype(F32)
    if spec.norm == "layer":
        mu = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mu).mean(-1, keepdims=True)
        y = (xf - mu) * jax.lax.rsqrt(var + spec.norm_eps) * p["scale"].astype(F32)
        if "bias" in p:
            y = y + p["bias"].astype(F32)
        return y.astype(dtype)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + spec.norm_eps)
    if spec.norm_scale_in_fp32:
        return (y * (spec.norm_offset + p["scale"].astype(F32))).astype(dtype)
    return p["scale"].astype(dtype) * y.astype(dtype)


def _act(spec: ArchSpec, x):
    if spec.act == "silu":
        return jax.nn.silu(x)
    return jax.nn.gelu(x, approximate=spec.act == "gelu_tanh")


def _rope(x, cos, sin, rotary_dim):
    """HF rotate_half convention on the first rotary_dim features. x [B, T, N, hd]; cos/sin [B, T, r]."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = rot * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


def _attention(spec: ArchSpec, p: dict, x, key_valid, window, inv_freq, rope_scale, positions):
    B, T, _ = x.shape
    dtype = x.dtype
    q = jnp.einsum("btd,dnh->btnh", x, p["wq"])
    k = jnp.einsum("btd,dnh->btnh", x, p["wk"])
    v = jnp.einsum("btd,dnh->btnh", x, p["wv"])
    if spec.qkv_bias:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    if spec.qk_norm == "full":
        q = apply_norm(spec, p["q_norm"], q.reshape(B, T, -1)).reshape(q.shape)
        k = apply_norm(spec, p["k_norm"], k.reshape(B, T, -1)).reshape(k.shape)
    elif spec.qk_norm == "head":
        q = apply_norm(spec, p["q_norm"], q)
        k = apply_norm(spec, p["k_norm"], k)
    if spec.positional == "rope":
        freqs = positions.astype(F32)[None, :, None] * inv_freq[:, None, :]      # [B, T, r/2]
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        cos = (jnp.cos(emb) * rope_scale).astype(dtype)
        sin = (jnp.sin(emb) * rope_scale).astype(dtype)
        q = _rope(q, cos, sin, spec.rotary_dim)
        k = _rope(k, cos, sin, spec.rotary_dim)
    G = spec.kv_groups
    qg = q.reshape(B, T, spec.n_kv_heads, G, spec.head_dim)
    s = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=F32) * spec.query_scale
    if spec.attn_softcap is not None:
        s = jnp.tanh(s / spec.attn_softcap) * spec.attn_softcap
    qi = positions[:, None]
    ki = positions[None, :]
    allowed = (ki <= qi) & ((window <= 0) | (ki > qi - window))
    allowed = allowed[None, None, None] & key_valid[:, None, None, None, :]
    s = jnp.where(allowed, s, _NEG)
    w = jax.nn.softmax(s, axis=-1).astype(dtype)
    o = jnp.einsum("bkgts,bskh->btkgh", w, v, preferred_element_type=F32).astype(dtype)
    o = o.reshape(B, T, spec.n_heads, spec.head_dim)
    out = jnp.einsum("btnh,nhd->btd", o, p["wo"])
    if spec.o_bias:
        out = out + p["bo"]
    return out


def _mlp(spec: ArchSpec, p: dict, x):
    up = jnp.einsum("btd,df->btf", x, p["w_up"])
    if spec.mlp_bias:
        up = up + p["b_up"]
    if spec.gated_mlp:
        gate = jnp.einsum("btd,df->btf", x, p["w_gate"])
        if spec.mlp_bias:
            gate = gate + p["b_gate"]
        h = _act(spec, gate) * up
    else:
        h = _act(spec, up)
    out = jnp.einsum("btf,fd->btd", h, p["w_down"])
    if spec.mlp_bias:
        out = out + p["b_down"]
    return out


def block(spec: ArchSpec, p: dict, x, key_valid, window, inv_freq, rope_scale, positions):
    """One transformer block (per-layer params p without the leading L axis)."""
    a_in = apply_norm(spec, p["ln1"], x) if spec.pre_attn_norm else x
    a = _attention(spec, p, a_in, key_valid, window, inv_freq, rope_scale, positions)
    if spec.post_attn_norm:
        a = apply_norm(spec, p["post_attn_norm"], a)
    if spec.parallel_residual:
        m = _mlp(spec, p, apply_norm(spec, p["ln2"], x))
        return m + a + x
    x = x + a
    m_in = apply_norm(spec, p["ln2"], x) if spec.pre_mlp_norm else x
    m = _mlp(spec, p, m_in)
    if spec.post_mlp_norm:
        m = apply_norm(spec, p["post_mlp_norm"], m)
    return x + m


def embed(spec: ArchSpec, params: dict, input_ids, dtype):
    """Residual stream entering block 0: token embedding, Gemma's sqrt(d) scale, learned positions."""
    x = jnp.take(params["embed"], input_ids, axis=0).astype(dtype)
    if spec.embed_scale is not None:
        x = x * jnp.asarray(spec.embed_scale, dtype)
    if spec.positional == "learned":
        x = x + params["pos_embed"][: input_ids.shape[1]][None].astype(dtype)
    return x


def unembedding_stored(spec: ArchSpec, params: dict) -> tuple[jax.Array, jax.Array | None, bool]:
    """(W, bias, vocab_major): the output head as stored, without a transposed copy.

    vocab_major is True for a tied embedding (W [V, d]), False for an lm_head (W [d, V]); the
    streaming decode takes either (``stream_stats(..., vocab_major=)``).
    """
    if spec.tie_embeddings:
        return params["embed"], params.get("lm_head_bias"), True
    return params["lm_head"], params.get("lm_head_bias"), False


def unembedding(spec: ArchSpec, params: dict) -> tuple[jax.Array, jax.Array | None]:
    """(W [d, V], bias [V] or None): the model's output head."""
    W, bias, vocab_major = unembedding_stored(spec, params)
    return (W.T if vocab_major else W), bias


def head(spec: ArchSpec, params: dict, h_normed, W=None, bias=None) -> jax.Array:
    """Model head on final-normed residuals: unembed, bias, final softcap; float32 logits."""
    if W is None:
        W, bias = unembedding(spec, params)
    z = jnp.einsum("...d,dv->...v", h_normed, W.astype(h_normed.dtype), preferred_element_type=F32)
    if bias is not None:
        z = z + bias.astype(F32)
    if spec.final_softcap is not None:
        z = jnp.tanh(z / spec.final_softcap) * spec.final_softcap
    return z


def _dynamic_rope(spec: ArchSpec, inv_freq, dyn, key_valid):
    """Dynamic-NTK layers: transformers recomputes the RoPE base from the sequence length once it exceeds
    max_position_embeddings. We use each sequence's own (unpadded) length, so a right-padded batch gives
    the unpadded result; inv_freq is [L, B, r/2]."""
    if not dyn.any():
        return inv_freq
    dim = spec.rotary_dim
    mp = float(spec.max_positions)
    seq = jnp.maximum(key_valid.sum(1).astype(F32), mp)                                  # [B]
    factor = jnp.asarray(dyn)[:, None]                                                   # [L, 1]
    base = jnp.asarray(spec.rope_thetas())[:, None] * (
        (factor * seq[None] / mp) - (factor - 1)) ** (dim / (dim - 2))                   # [L, B]
    ar = jnp.arange(0, dim, 2, dtype=F32) / dim
    dyn_inv = 1.0 / (base[..., None] ** ar)                                              # [L, B, r/2]
    use = (factor > 0) & (seq[None] > mp)
    return jnp.where(use[..., None], dyn_inv, inv_freq)


def apply(spec: ArchSpec, params: dict, input_ids, attention_mask=None, *, unroll: int = 1,
          act_sharding=None) -> ForwardOutput:
    """Pure forward pass: every raw residual stream and the model's float32 logits.

    ``act_sharding``: optional sharding of the [B, T, d] residual stream (e.g. batch over (data, fsdp)),
    imposed after the embedding and every block, so that parameters sharded on ``embed`` are gathered per
    use instead of the activations taking the parameters' layout (FSDP under jit)."""
    dtype = params["embed"].dtype
    B, T = input_ids.shape
    pin = (lambda v: v) if act_sharding is None else (
        lambda v: jax.lax.with_sharding_constraint(v, act_sharding))
    key_valid = (jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool))
    positions = jnp.arange(T, dtype=jnp.int32)
    look = None if act_sharding is None else lookup_shardings(act_sharding, spec.d_model)
    if look is not None:                     # gather with d on fsdp, then one all-to-all to the batch layout
        x0 = pin(jax.lax.with_sharding_constraint(
            embed(spec, params, jax.lax.with_sharding_constraint(input_ids, look[0]), dtype), look[1]))
    else:
        x0 = pin(embed(spec, params, input_ids, dtype))
    if spec.positional == "rope":
        inv, scales, dyn = spec.rope_tables()
        inv_freq = jnp.broadcast_to(jnp.asarray(inv)[:, None], (spec.n_layers, B, spec.rotary_dim // 2))
        inv_freq = _dynamic_rope(spec, inv_freq, dyn, key_valid)
    else:
        inv_freq = jnp.zeros((spec.n_layers, B, 1), F32)
        scales = np.ones((spec.n_layers,), np.float32)
    windows = np.asarray(spec.windows, np.int32)

    def body(x, layer):
        p, win, inv, sc = layer
        y = pin(block(spec, p, x, key_valid, win, inv, sc, positions))
        return y, y

    xL, ys = jax.lax.scan(body, x0, (params["blocks"], jnp.asarray(windows), jnp.asarray(inv_freq),
                                     jnp.asarray(scales)), unroll=unroll)
    residuals = jnp.concatenate([x0[None], ys], axis=0)
    logits = head(spec, params, apply_norm(spec, params["final_norm"], xL))
    return ForwardOutput(residuals, logits, key_valid)


# --------------------------------------------------------------------------------------------------
# The NNX module


def _values(tree):
    return jax.tree.map(lambda v: v[...], tree, is_leaf=lambda v: isinstance(v, nnx.Variable))


class Decoder(nnx.Module):
    """Flax NNX decoder. ``Decoder(spec, params)(input_ids, attention_mask)`` -> :class:`ForwardOutput`."""

    def __init__(self, spec: ArchSpec, params: dict):
        self.spec = spec
        self.params = nnx.data(jax.tree.map(nnx.Param, params))

    def __call__(self, input_ids, attention_mask=None) -> ForwardOutput:
        return apply(self.spec, _values(self.params), input_ids, attention_mask)

    def values(self) -> dict:
        return _values(self.params)


@functools.lru_cache(maxsize=None)
def jitted_apply(spec: ArchSpec, unroll: int = 1):
    """One jitted forward per spec (params, ids, mask) -> ForwardOutput."""
    return jax.jit(functools.partial(apply, spec, unroll=unroll))
