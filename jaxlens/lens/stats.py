"""Lenses and the fused all-layer decode, ``jaxlens.lens_stats``.

A lens maps the raw residual stream of layer l to rows that go through the model's own head:

* ``"norm"``  the reference probe's normaliser: layer 0 through block 0's input norm, layer l (1..n-1)
  through block l's input norm (the *next* block's), layer n through the final norm. A family without
  input norms (OLMo-2) passes layers 0..n-1 through unchanged, as the reference does for a missing module.
* ``"logit"`` the final norm at every layer.
* ``"raw"``   no normalisation.
* an :class:`AffineLens` (tuned lens, Prism): a per-layer affine translator applied to the normalised
  residual, and an optional per-layer temperature.

Every lens goes through the model's head (bias, Gemma-2's final softcap), so the last layer of the norm /
logit lens reproduces the model's logits and its KL to final is 0.

``lens_stats`` folds every (layer, batch, position) row into one streaming pass over vocabulary chunks
(:mod:`jaxlens.lens.stream`); no [layers x tokens x vocab] array is ever built. ``lens_logits`` is the dense
oracle for tests and debugging.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.lens import stream
from jaxlens.models.decoder import apply_norm, head, unembedding, unembedding_stored
from jaxlens.errors import JaxlensError
from jaxlens.lens import pairwise as PW

BUILTIN = ("norm", "logit", "raw")
F32 = jnp.float32


@dataclasses.dataclass
class AffineLens:
    """Per-layer affine translator on a normalised residual: rows_l = h_l @ A_l + c_l, logits / tau_l.

    ``A`` [n+1, d, d] (full matrix, identity included), ``c`` [n+1, d], ``temperature`` [n+1] or None.
    ``base`` is the normaliser applied first ("norm" or "logit"). Layers a lens does not train (e.g. the
    tuned lens at layer 0) carry the identity. Tuned-lens and Prism readers build this object.
    """

    A: Any
    c: Any
    temperature: Any = None
    base: str = "norm"
    name: str = "affine"

    def translate(self, rows: jax.Array, layers: np.ndarray) -> jax.Array:
        """rows [R, ..., d] for the given layer indices -> translated rows (same shape, rows' dtype)."""
        A = jnp.asarray(self.A, F32)[layers]
        c = jnp.asarray(self.c, F32)[layers]
        out = jnp.einsum("r...d,rde->r...e", rows.astype(F32), A) + c.reshape(
            (len(layers),) + (1,) * (rows.ndim - 2) + (-1,))
        return out.astype(rows.dtype)

    def temperatures(self, layers: np.ndarray):
        if self.temperature is None:
            return None
        return jnp.asarray(self.temperature, F32)[layers]


def _layers(model, layers) -> np.ndarray:
    n = model.spec.n_layers
    if layers is None:
        return np.arange(n + 1)
    idx = np.asarray(layers, np.int64).reshape(-1)
    if idx.size == 0 or idx.min() < -(n + 1) or idx.max() > n:
        raise JaxlensError(f"layers must lie in 0..{n}; got {list(idx)}")
    return np.where(idx < 0, idx + n + 1, idx)


def _norm_table(model, lens: str) -> tuple[dict, np.ndarray]:
    """Stacked normaliser params [n+1, d] for the lens, and which layers apply one."""
    spec, params = model.spec, model.params
    n = spec.n_layers
    final = params["final_norm"]
    if lens == "logit" or not spec.pre_attn_norm:
        table = jax.tree.map(lambda a: jnp.broadcast_to(a, (n + 1,) + a.shape), final)
        applies = np.ones(n + 1, bool) if lens == "logit" else np.arange(n + 1) == n
        return table, applies
    table = jax.tree.map(lambda blk, fin: jnp.concatenate([blk, fin[None]], 0), params["blocks"]["ln1"], final)
    return table, np.ones(n + 1, bool)


def normalise(model, residuals: jax.Array, lens="norm", layers=None) -> jax.Array:
    """Apply the lens's normaliser (and translator) to residuals [R, ..., d] of the given layers."""
    layers = _layers(model, layers)
    if residuals.shape[0] != len(layers):
        raise JaxlensError(f"got {residuals.shape[0]} residual layers for {len(layers)} layer indices")
    if isinstance(lens, str) and lens not in BUILTIN:
        raise JaxlensError(f"unknown lens {lens!r} (use one of {', '.join(BUILTIN)} or a lens object)")
    base = lens if isinstance(lens, str) else getattr(lens, "base", "norm")
    base0 = base if isinstance(lens, str) else getattr(lens, "base_layer0", base)   # layer 0 may differ
    if base == "raw":
        rows = residuals
    else:
        table, applies = _norm_table(model, base)
        if base0 != base and base0 != "raw":
            t0, a0 = _norm_table(model, base0)
            table = jax.tree.map(lambda a, b: a.at[0].set(b[0]), table, t0)
            applies = applies.copy()
            applies[0] = a0[0]
        sel = jax.tree.map(lambda a: a[layers], table)
        normed = jax.vmap(lambda p, h: apply_norm(model.spec, p, h))(sel, residuals)
        keep = jnp.asarray(applies[layers]).reshape((-1,) + (1,) * (residuals.ndim - 1))
        rows = jnp.where(keep, normed, residuals)
    if not isinstance(lens, str):
        if getattr(lens, "bound", True) is False and hasattr(lens, "bind"):
            lens = lens.bind(model)       # tuned-lens-format lenses take the model's final norm
        rows = lens.translate(rows, layers)
    return rows


def _temperature(lens, layers):
    return None if isinstance(lens, str) else lens.temperatures(layers)


def lens_logits(model, fw, lens="norm", layers=None) -> jax.Array:
    """Dense lens logits [R, B, T, V] float32 (R = selected layers, default all n+1).

    A test oracle and debugging aid only: it materialises every logit, which the streaming path never does.
    """
    layers = _layers(model, layers)
    rows = normalise(model, fw.residuals[layers], lens, layers)
    z = head(model.spec, model.params, rows)
    temp = _temperature(lens, layers)
    if temp is not None:
        z = z / temp.reshape((-1,) + (1,) * (z.ndim - 1))
    return z


@dataclasses.dataclass
class LensStats:
    """Per-row lens statistics with leading shape [R, B, P] (layers, batch, selected positions)."""

    layers: np.ndarray
    positions: np.ndarray            # [B, P] the position index of each selected column
    valid: np.ndarray                # [B, P] whether that position is a real (unpadded) token
    entropy_bits: Any
    kl_to_final_bits: Any
    kl_final_to_layer_bits: Any
    lse: Any
    teacher_entropy_bits: Any        # [B, P]
    gold_rank: Any = None
    gold_prob: Any = None
    gold_logit: Any = None
    top_ids: Any = None
    top_probs: Any = None
    cos_to_final: Any = None
    gathered_logits: Any = None      # [R, B, P, S] lens logits at gather_ids (-inf where the id is -1)
    rows: Any = None                 # [R, B, P, d] the vectors the lens decodes (return_rows=True)

    def numpy(self) -> "LensStats":
        return dataclasses.replace(self, **{f.name: (None if getattr(self, f.name) is None
                                                     else np.asarray(getattr(self, f.name)))
                                            for f in dataclasses.fields(self)})


def _select_positions(fw, positions):
    mask = np.asarray(fw.attention_mask).astype(bool)
    B, T = mask.shape
    if isinstance(positions, str):
        if positions == "all":
            pos = np.broadcast_to(np.arange(T), (B, T))
        elif positions == "last":
            lengths = mask.sum(1)
            if (lengths == 0).any():
                raise JaxlensError("a sequence in the batch has no real tokens")
            pos = (lengths - 1)[:, None]
        else:
            raise JaxlensError(f"positions must be 'all', 'last' or an index array; got {positions!r}")
    else:
        pos = np.asarray(positions, np.int64)
        pos = np.broadcast_to(pos if pos.ndim == 2 else pos[None], (B, pos.shape[-1]))
        if pos.size and (pos.min() < 0 or pos.max() >= T):
            raise JaxlensError(f"positions must lie in 0..{T - 1}")
    pos = np.ascontiguousarray(pos)
    return pos, np.take_along_axis(mask, pos, 1)


def _gold_rows(gold_ids, pos, B):
    if gold_ids is None:
        return None
    g = np.asarray(gold_ids)
    if g.ndim == 1:
        if g.shape[0] != B:
            raise JaxlensError(f"gold_ids has {g.shape[0]} entries for a batch of {B}")
        g = np.broadcast_to(g[:, None], pos.shape)
    elif g.ndim == 2:
        g = np.take_along_axis(g, pos, 1)
    else:
        raise JaxlensError("gold_ids must be [B] or [B, T]")
    return np.ascontiguousarray(g).reshape(-1).astype(np.int32)


def lens_stats(model, fw, lens="norm", gold_ids=None, top_k: int = 20, *, positions="all", layers=None,
               cosine: bool = True, dense: bool = False, chunk: int = stream.DEFAULT_CHUNK, mesh=None,
               row_axis: str | None = None, vocab_axis: str | None = None, unembed_dtype=None,
               gather_ids=None, return_rows: bool = False) -> LensStats:
    """Decode every selected (layer, batch, position) row through ``lens`` in one streaming pass.

    Args:
      model, fw: a loaded model and its ``forward`` output.
      lens: "norm", "logit", "raw", or an :class:`AffineLens` (tuned / Prism).
      gold_ids: optional int [B] (one gold per sequence, scored at every position) or [B, T].
      top_k: top tokens per row (0..64); ties by lower id.
      positions: "all", "last" (each sequence's last real token), or an int array [P] / [B, P].
      layers: optional subset of 0..n (default all n+1 layers).
      cosine: also compute cos_to_final (bias-free lens logits vs the final logits, spec §2.2) in d-space.
      dense: use the dense oracle (materialises logits; for tests and debugging).
      mesh, row_axis, vocab_axis: multi-device decode (rows sharded with the unembedding replicated, or
        the unembedding sharded over the vocabulary), see :func:`jaxlens.lens.stream.stream_stats`.
      unembed_dtype: cast the unembedding (e.g. "float32" for an fp32 unembed over a bf16 model).
      gather_ids: optional int [B, S] (-1 = padding): also return the lens logits at these ids
        (answer / control / prompt tokens) as ``gathered_logits`` [R, B, P, S], no vocab pass needed.
      return_rows: also return the decoded vectors (normalised / translated rows) [R, B, P, d].
    """
    spec = model.spec
    if not 0 <= int(top_k) <= 64:
        raise JaxlensError(f"top_k must be between 0 and 64; got {top_k}")
    layers = _layers(model, layers)
    pos, valid = _select_positions(fw, positions)
    B, P = pos.shape
    R = len(layers)
    # pick positions first (P is often 1), then layers: never copies the full [n+1, B, T, d] stack
    res = jnp.take_along_axis(fw.residuals, jnp.asarray(pos)[None, :, :, None], axis=2)[layers]  # [R, B, P, d]
    rows = normalise(model, res, lens, layers)
    h = jnp.transpose(rows, (1, 2, 0, 3)).reshape(B * P, R, -1)                 # token-major [B*P, R, d]
    last = jnp.take_along_axis(fw.residuals[spec.n_layers], jnp.asarray(pos)[:, :, None], axis=1)
    teacher = apply_norm(spec, model.params["final_norm"], last).reshape(B * P, -1)
    # the head as stored (a tied embedding stays [V, d]: no transposed copy of it per call)
    Ws, bias, vocab_major = unembedding_stored(spec, model.params)
    if unembed_dtype is not None:
        Ws = Ws.astype(unembed_dtype)
        bias = None if bias is None else bias.astype(unembed_dtype)
    # [d, V], built only for the paths that need it (dense oracle, gathers, cosine)
    W = (Ws.T if vocab_major else Ws) if (dense or gather_ids is not None or cosine) else None
    temp = _temperature(lens, layers)
    # norm / logit lens: the last selected row already is the teacher (final norm of layer n), so the
    # kernel reuses it instead of decoding an extra row (and that row's KL is exactly 0)
    own = isinstance(lens, str) and lens in ("norm", "logit") and layers[-1] == spec.n_layers and not dense
    teach = dict(teacher_row=-1) if own else dict(teacher_h=teacher)
    kw = dict(bias=bias, softcap=spec.final_softcap, temperature=temp, **teach,
              gold=_gold_rows(gold_ids, pos, B), top_k=int(top_k))
    if dense:
        out = stream.dense_stats(h, W, **kw)
    else:
        out = stream.stream_stats(h, Ws, chunk=chunk, mesh=mesh, row_axis=row_axis, vocab_axis=vocab_axis,
                                  vocab_major=vocab_major, **kw)

    def back(x):  # [B*P, R, ...] -> [R, B, P, ...]
        x = x.reshape((B, P, R) + x.shape[2:])
        return jnp.moveaxis(x, 2, 0)

    gathered = None
    if gather_ids is not None:
        gid = np.asarray(gather_ids, np.int32)
        if gid.ndim != 2 or gid.shape[0] != B:
            raise JaxlensError(f"gather_ids must be [B={B}, S]; got shape {gid.shape}")
        gid = np.repeat(gid, P, axis=0)                                          # [B*P, S]
        gathered = back(PW.gather_logits(h, W, gid, bias, spec.final_softcap, temp))
    cos = None
    if cosine:
        logits = jnp.take_along_axis(fw.logits, jnp.asarray(pos)[:, :, None], axis=1)   # [B, P, V]
        cos = cosine_to_final(model, rows, logits, W, bias)
    return LensStats(
        layers=layers, positions=pos, valid=valid,
        entropy_bits=back(out["entropy_bits"]), kl_to_final_bits=back(out["kl_to_final_bits"]),
        kl_final_to_layer_bits=back(out["kl_final_to_layer_bits"]), lse=back(out["lse"]),
        teacher_entropy_bits=out["teacher_entropy_bits"].reshape(B, P),
        gold_rank=back(out["gold_rank"]) if "gold_rank" in out else None,
        gold_prob=back(out["gold_prob"]) if "gold_prob" in out else None,
        gold_logit=back(out["gold_logit"]) if "gold_logit" in out else None,
        top_ids=back(out["top_ids"]) if "top_ids" in out else None,
        top_probs=back(out["top_probs"]) if "top_probs" in out else None,
        cos_to_final=cos, gathered_logits=gathered, rows=rows if return_rows else None,
    )


@jax.jit
def _cosine(rows, logits, W, bias, G):
    zf = logits - (0.0 if bias is None else bias.astype(F32))
    u = jnp.einsum("bpv,dv->bpd", zf, W.astype(F32), precision=jax.lax.Precision.HIGHEST)
    r = rows.astype(F32)
    num = jnp.einsum("rbpd,bpd->rbp", r, u, precision=jax.lax.Precision.HIGHEST)
    vv = jnp.einsum("rbpd,de,rbpe->rbp", r, G, r, precision=jax.lax.Precision.HIGHEST)
    vnorm = jnp.sqrt(jnp.maximum(vv, 0.0))
    fnorm = jnp.linalg.norm(zf, axis=-1)
    return num / ((vnorm + 1e-12) * (fnorm[None] + 1e-12))


def cosine_to_final(model, rows, final_logits, W=None, bias=None) -> jax.Array:
    """cos(bias-free lens logits, final logits - b) per row (spec §2.2), without any vocab-sized lens array.

    ``rows`` [R, B, P, d] (the vectors the lens decodes, before temperature), ``final_logits`` [B, P, V].
    Uses <W^T h, z_f> = h . (W z_f) and |W^T h|^2 = h^T (W W^T) h, so softcapped heads are handled exactly.
    """
    if W is None:
        W, bias = unembedding(model.spec, model.params)
    G = _gram(model, W)
    return _cosine(rows, final_logits, W, bias, G)


def _gram(model, W):
    cache = model.__dict__.setdefault("_gram_cache", {})
    key = (W.shape, str(W.dtype))
    if key not in cache:
        cache[key] = PW.gram(W.astype(F32))
    return cache[key]
