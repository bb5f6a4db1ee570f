"""Fused multi-lens decodes: several lenses (stacked / tempered) at the same rows in one streaming
pass, the calibration-grid pass over temperatures, and the few dense target rows the per-target
diagnostics read. Every vocabulary-sized computation is one batched call, never a loop over layers.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlens.errors import JaxlensError
from jaxlens.lens import stream
from jaxlens.lens.stats import lens_stats, normalise
from jaxlens.models.decoder import apply_norm, unembedding

F32 = jnp.float32
LN2 = math.log(2.0)
_HI = lax.Precision.HIGHEST


# ==================================================================================================
# Fused decodes
# ==================================================================================================

class StackedLens:
    """Several lenses decoded in ONE ``lens_stats`` call (one streaming pass over the vocabulary).

    ``lens_stats(model, fw, StackedLens(model, lenses, n_layers), layers=stacked.layers)`` decodes, for
    every token, ``len(lenses)`` blocks of layer rows: block j is ``lenses[j]`` over layers 0..n. The
    object is a lens in the sense of :func:`jaxlens.lens.normalise` (base ``"raw"``, then
    :meth:`translate` applies each block's own normaliser / translator); temperatures are concatenated
    (1 for the built-in lenses). Use :func:`multi_lens_stats`, which also splits the result.
    """

    base = "raw"
    name = "stacked"

    def __init__(self, model, lenses: Sequence, layers: Sequence[int]):
        self.model = model
        self.lenses = tuple(lenses)
        self.block = np.asarray(layers, np.int64)
        self.layers = np.tile(self.block, len(self.lenses))

    def _parts(self, layers):
        k = len(self.block)
        return [(lens, np.asarray(layers)[j * k:(j + 1) * k], slice(j * k, (j + 1) * k))
                for j, lens in enumerate(self.lenses)]

    def translate(self, rows: jax.Array, layers: np.ndarray) -> jax.Array:
        out = [normalise(self.model, rows[sl], lens, lay) for lens, lay, sl in self._parts(layers)]
        return jnp.concatenate(out, axis=0)

    def temperatures(self, layers: np.ndarray):
        temps, any_t = [], False
        for lens, lay, _ in self._parts(layers):
            t = None if isinstance(lens, str) else lens.temperatures(lay)
            any_t |= t is not None
            temps.append(jnp.ones((len(lay),), F32) if t is None else jnp.asarray(t, F32))
        return jnp.concatenate(temps) if any_t else None


@dataclasses.dataclass
class TemperedLens:
    """The norm lens with a per-layer temperature: logits z_l / tau_l (spec §2.13)."""

    temperature: Any                 # [n+1]
    base: str = "norm"
    name: str = "norm_temp"

    def translate(self, rows, layers):
        return rows

    def temperatures(self, layers):
        return jnp.asarray(self.temperature, F32)[np.asarray(layers)]


_R_FIELDS = ("layers", "entropy_bits", "kl_to_final_bits", "kl_final_to_layer_bits", "lse", "gold_rank",
             "gold_prob", "gold_logit", "top_ids", "top_probs", "cos_to_final", "gathered_logits", "rows")


def multi_lens_stats(model, fw, lenses: Sequence, *, layers=None, **kw) -> list:
    """``lens_stats`` of several lenses at the same (layer, batch, position) rows in one streaming pass.

    Returns one :class:`LensStats` per lens (each with leading shape [len(layers), B, P]). Keyword
    arguments are those of :func:`jaxlens.lens_stats` (gold ids, top_k, positions, gather_ids, ...).
    """
    n = model.spec.n_layers
    block = np.arange(n + 1) if layers is None else np.asarray(layers, np.int64).reshape(-1)
    stacked = StackedLens(model, lenses, block)
    st = lens_stats(model, fw, stacked, layers=stacked.layers, **kw)
    k = len(block)
    out = []
    for j in range(len(lenses)):
        sl = slice(j * k, (j + 1) * k)
        out.append(dataclasses.replace(st, **{f: (None if getattr(st, f) is None else getattr(st, f)[sl])
                                              for f in _R_FIELDS}))
    return out


def last_position_stats(model, fw, **kw) -> tuple:
    """The probe's pure next-token decode: the norm and the raw lens at the last position of every
    sequence, in ONE streaming pass (numpy :class:`LensStats` pair). ``kw`` go to ``lens_stats``."""
    kw = dict(kw)
    kw["positions"] = "last"
    norm, raw = multi_lens_stats(model, fw, ("norm", "raw"), **kw)
    return norm.numpy(), raw.numpy()


@functools.partial(jax.jit, static_argnames=("softcap", "chunk"))
def _grid_jit(h, W, bias, lq, row_pass, inv_t, softcap, chunk):
    M_, _ = h.shape
    V = W.shape[1]
    C = min(chunk, V)
    n_chunks = -(-V // C)
    G = inv_t.shape[0]
    iota = jnp.arange(C, dtype=jnp.int32)
    cdt = jnp.promote_types(h.dtype, W.dtype)
    hc = h.astype(cdt)

    def step(acc, i):
        eqz, m, S, A, zmax, zmin, bad, nan = acc
        lo = i * C
        start = jnp.minimum(lo, V - C)
        wc = lax.dynamic_slice_in_dim(W, start, C, axis=1).astype(cdt)
        valid = (start + iota) >= lo                                               # [C]
        z = jnp.dot(hc, wc, precision=_HI, preferred_element_type=F32)             # [M, C]
        if bias is not None:
            z = z + lax.dynamic_slice_in_dim(bias, start, C).astype(F32)
        if softcap is not None:
            z = jnp.tanh(z / softcap) * softcap
        lqc = lax.dynamic_slice_in_dim(lq, start, C, axis=1)[row_pass]             # [M, C]
        eqz = eqz + jnp.sum(jnp.where(valid, jnp.exp(lqc) * z, 0.0), -1)
        zmax = jnp.maximum(zmax, jnp.max(jnp.where(valid, z, -jnp.inf), -1))
        zmin = jnp.minimum(zmin, jnp.min(jnp.where(valid, z, jnp.inf), -1))
        bad = bad + jnp.sum(valid & ~jnp.isfinite(z), -1)
        nan = nan + jnp.sum(valid & jnp.isnan(z), -1)
        y = jnp.where(valid, z[:, None, :] * inv_t[None, :, None], stream.NEG)    # [M, G, C]
        m_new = jnp.maximum(m, jnp.max(y, -1))
        a = jnp.exp(m - m_new)
        e = jnp.exp(y - m_new[..., None])
        diff = jnp.where(e > 0, y - lqc[:, None, :], 0.0)
        S = S * a + jnp.sum(e, -1)
        A = A * a + jnp.sum(e * diff, -1)
        return (eqz, m_new, S, A, zmax, zmin, bad, nan), None

    init = (jnp.zeros((M_,), F32), jnp.full((M_, G), stream.NEG, F32), jnp.zeros((M_, G), F32),
            jnp.zeros((M_, G), F32), jnp.full((M_,), -jnp.inf, F32), jnp.full((M_,), jnp.inf, F32),
            jnp.zeros((M_,), jnp.int32), jnp.zeros((M_,), jnp.int32))
    (eqz, m, S, A, zmax, zmin, bad, nan), _ = lax.scan(step, init, jnp.arange(n_chunks, dtype=jnp.int32))
    lse = m + jnp.log(S)
    return {"ce_bits": (lse - inv_t[None, :] * eqz[:, None]) / LN2,
            "kl_bits": jnp.maximum(A / S - lse, 0.0) / LN2,
            "lse": lse, "max_logit": zmax, "min_logit": zmin, "n_nonfinite": bad, "n_nan": nan}


def calibration_grid_stats(h, W, final_logits, row_pass, temperatures, *, bias=None, softcap=None,
                           chunk: int = 2048) -> dict:
    """Temperature-grid statistics of lens rows in one streaming pass over the vocabulary.

    h [M, d] lens rows (already normalised); ``final_logits`` [P, V] the model's real logits of the P
    prompts; ``row_pass`` int [M] which prompt each row belongs to; ``temperatures`` [G]. Lens logits
    z = softcap(h @ W + bias) as in the lens. Returns numpy arrays: ``ce_bits`` [M, G] =
    CE(P_final, softmax(z/tau)) = lse(z/tau) - E_q[z]/tau, ``kl_bits`` [M, G] = KL(softmax(z/tau) || q)
    with q's log guarded as log(q + 1e-30) (spec §2.1), ``lse`` [M, G], ``max_logit`` / ``min_logit`` (of
    the non-NaN z), ``n_nonfinite`` and ``n_nan`` [M] (counts of non-finite / NaN logits).
    """
    zf = jnp.asarray(final_logits, F32)
    q = jax.nn.softmax(zf, axis=-1)
    lq = jnp.log(q + 1e-30)
    out = _grid_jit(jnp.asarray(h), jnp.asarray(W), None if bias is None else jnp.asarray(bias), lq,
                    jnp.asarray(row_pass, jnp.int32), 1.0 / jnp.asarray(temperatures, F32),
                    softcap=None if softcap is None else float(softcap), chunk=int(chunk))
    return {k: np.asarray(v) for k, v in out.items()}


def dense_target_logits(model, rows) -> tuple:
    """(z_pre, z) [K, V] float32 for a few decoded rows [K, d]: z_pre = rows @ W + b (no softcap),
    z = the model head (softcap applied). One batched matmul; for the handful of per-target rows only."""
    spec = model.spec
    W, b = unembedding(spec, model.params)
    r = jnp.asarray(rows)
    z_pre = jnp.einsum("kd,dv->kv", r.astype(jnp.promote_types(r.dtype, W.dtype)),
                       W.astype(jnp.promote_types(r.dtype, W.dtype)), precision=_HI,
                       preferred_element_type=F32)
    if b is not None:
        z_pre = z_pre + b.astype(F32)
    z = z_pre if spec.final_softcap is None else jnp.tanh(z_pre / spec.final_softcap) * spec.final_softcap
    return np.asarray(z_pre), np.asarray(z)


def target_logits(model, fw, b: int, t: int, *, norm_layers=(), raw_layers=(), post_layers=(), tuned_lens=None,
                  tuned_layers=()) -> dict:
    """Dense logits of a few rows of sequence b at position t, in ONE batched matmul: the norm lens at
    ``norm_layers`` (also before the softcap, ``norm_pre``), the raw lens at ``raw_layers``, the
    post-attention norm of block l-1 (``ln2``, the decoding-point ablation) at ``post_layers`` (l >= 1),
    and a tuned lens (divided by its temperature) at ``tuned_layers``. Returns {kind: {layer: z [V]}}."""
    spec = model.spec
    h = fw.residuals[:, b, t]                                                  # [n+1, d]
    parts, plan = [], []
    if len(norm_layers):
        parts.append(normalise(model, h[np.asarray(norm_layers)], "norm", list(norm_layers)))
        plan += [("norm", x) for x in norm_layers]
    if len(raw_layers):
        parts.append(h[np.asarray(raw_layers)])
        plan += [("raw", x) for x in raw_layers]
    if len(post_layers):
        idx = np.asarray(post_layers)
        if idx.min() < 1 or "ln2" not in model.params["blocks"]:
            raise JaxlensError("the post_ln2 decoding point needs layers >= 1 and blocks with an ln2 norm")
        ln2 = jax.tree.map(lambda a: a[idx - 1], model.params["blocks"]["ln2"])
        parts.append(jax.vmap(lambda p, x: apply_norm(spec, p, x))(ln2, h[idx]))
        plan += [("post_ln2", x) for x in post_layers]
    temps = None
    if len(tuned_layers):
        parts.append(normalise(model, h[np.asarray(tuned_layers)], tuned_lens, list(tuned_layers)))
        plan += [("tuned", x) for x in tuned_layers]
        temps = tuned_lens.temperatures(np.asarray(tuned_layers))
        temps = np.ones(len(tuned_layers)) if temps is None else np.asarray(temps, np.float64)
    out = {"norm": {}, "norm_pre": {}, "raw": {}, "post_ln2": {}, "tuned": {}}
    if not parts:
        return out
    z_pre, z = dense_target_logits(model, jnp.concatenate([jnp.asarray(x) for x in parts], 0))
    j = 0
    for i, (kind, layer) in enumerate(plan):
        if kind == "tuned":
            out[kind][int(layer)] = (z[i] / temps[j]).astype(np.float32)
            j += 1
        else:
            out[kind][int(layer)] = z[i]
        if kind == "norm":
            out["norm_pre"][int(layer)] = z_pre[i]
    return out
