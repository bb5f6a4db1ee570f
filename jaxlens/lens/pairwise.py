"""Pairwise statistics between two lenses at the same rows (KL both ways, JS, L1), token-set helpers
(gathered logits, set masses, top-k Jaccard) and the logit-space cosine through the Gram matrix.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from jaxlens.lens.stream import _F32, _LN2, _compute_dtype, _default_sizes, _dot, _row_blocked, _softcap, stream_stats

# ----------------------------------------------------------------------------------------------
# pairwise statistics between two lenses at the same rows


def pair_stats(
    hA,
    hB,
    W,
    bias=None,
    softcap: Optional[float] = None,
    lseA=None,
    lseB=None,
    *,
    chunk: Optional[int] = None,
    block_elems: Optional[int] = None,
    precision=None,
    unroll: int = 1,
) -> dict:
    """KL(A||B), KL(B||A), JS divergence (bits) and L1 distance sum|pA - pB| per row.

    hA, hB: [M, d] (any leading shape, identical for both) rows of two lenses at the same
    positions (e.g. raw vs norm lens), decoded with the same head (W, bias, softcap).
    lseA / lseB: their log-partitions (from :func:`stream_stats`; computed with an extra pass
    each when None). One streaming pass over vocab chunks, rows blocked as in stream_stats.
    Returns dict of fp32 arrays shaped like the leading shape: ``kl_ab_bits``, ``kl_ba_bits``,
    ``js_bits`` (in [0, 1]), ``l1`` (in [0, 2]).
    """
    hA = jnp.asarray(hA)
    hB = jnp.asarray(hB)
    W = jnp.asarray(W)
    if hA.shape != hB.shape:
        raise ValueError(f"hA {hA.shape} and hB {hB.shape} must have the same shape")
    lead = hA.shape[:-1]
    d = hA.shape[-1]
    if W.ndim != 2 or W.shape[0] != d:
        raise ValueError(f"W must be [d, V] with d={d}; got shape {W.shape}")
    hA2 = hA.reshape(-1, d)
    hB2 = hB.reshape(-1, d)
    dchunk, dblock = _default_sizes(None)
    chunk = dchunk if chunk is None else int(chunk)
    block_elems = dblock if block_elems is None else int(block_elems)
    kw = dict(bias=bias, softcap=softcap, chunk=chunk, block_elems=block_elems,
              precision=precision, unroll=unroll)
    if lseA is None:
        lseA = stream_stats(hA2, W, **kw)["lse"]
    if lseB is None:
        lseB = stream_stats(hB2, W, **kw)["lse"]
    cdt = _compute_dtype(hA2, W)
    C = min(chunk, W.shape[1])
    out = _pair_jit(
        hA2.astype(cdt),
        hB2.astype(cdt),
        W,
        None if bias is None else jnp.asarray(bias),
        jnp.asarray(lseA, _F32).reshape(-1),
        jnp.asarray(lseB, _F32).reshape(-1),
        softcap=None if softcap is None else float(softcap),
        chunk=C,
        rows_block=max(1, block_elems // C),
        precision=precision,
        unroll=int(unroll),
    )
    return {k: v.reshape(lead) for k, v in out.items()}


@functools.partial(
    jax.jit, static_argnames=("softcap", "chunk", "rows_block", "precision", "unroll")
)
def _pair_jit(hA, hB, W, bias, lseA, lseB, softcap, chunk, rows_block, precision, unroll):
    V = W.shape[1]
    C = chunk
    n_chunks = -(-V // C)
    cdt = hA.dtype
    iota = jnp.arange(C, dtype=jnp.int32)

    def block(xs):
        hA, hB, lseA, lseB = xs
        M = hA.shape[0]

        def step(acc, i):
            lo = i * C
            start = jnp.minimum(lo, V - C)
            wc = lax.dynamic_slice_in_dim(W, start, C, axis=1).astype(cdt)
            valid = (start + iota) >= lo  # the clamped last chunk re-reads seen columns
            zA = _dot(hA, wc, precision)
            zB = _dot(hB, wc, precision)
            if bias is not None:
                bc = lax.dynamic_slice_in_dim(bias, start, C).astype(_F32)
                zA = zA + bc
                zB = zB + bc
            lpA = _softcap(zA, softcap) - lseA[:, None]
            lpB = _softcap(zB, softcap) - lseB[:, None]
            pA = jnp.exp(lpA)
            pB = jnp.exp(lpB)
            x = lpB - lpA
            sp = jax.nn.softplus(x)  # log(1 + pB/pA)
            # mid = (pA+pB)/2: pA log(pA/mid) = pA (ln2 - sp), pB log(pB/mid) = pB (ln2 - sp + x)
            js = 0.5 * (pA * (_LN2 - sp) + pB * (_LN2 - sp + x))
            zero = jnp.zeros_like(pA)
            terms = (pA * (-x), pB * x, js, jnp.abs(pA - pB))
            new = tuple(a + jnp.sum(jnp.where(valid, t, zero), -1) for a, t in zip(acc, terms))
            return new, None

        z = jnp.zeros((M,), _F32)
        acc, _ = lax.scan(step, (z, z, z, z), jnp.arange(n_chunks, dtype=jnp.int32), unroll=unroll)
        return acc

    kab, kba, js, l1 = _row_blocked(block, (hA, hB, lseA, lseB), rows_block)
    return {
        "kl_ab_bits": jnp.maximum(kab, 0.0) / _LN2,
        "kl_ba_bits": jnp.maximum(kba, 0.0) / _LN2,
        "js_bits": jnp.maximum(js, 0.0) / _LN2,
        "l1": l1,
    }


# ----------------------------------------------------------------------------------------------
# token-set helpers


def _expand_ids(ids, lead_h):
    """ids [*lead_ids, S] with lead_ids a prefix of lead_h -> broadcastable to [*lead_h, S]."""
    extra = len(lead_h) - (ids.ndim - 1)
    if extra < 0 or tuple(ids.shape[:-1]) != tuple(lead_h[: ids.ndim - 1]):
        raise ValueError(
            f"ids of shape {ids.shape} do not match the rows' leading shape {tuple(lead_h)} "
            "(their leading dims must be a prefix of it)"
        )
    return ids.reshape(ids.shape[:-1] + (1,) * extra + ids.shape[-1:])


def gather_logits(h, W, ids, bias=None, softcap=None, temperature=None, precision=None):
    """Lens logits at given ids, without a vocab pass.

    h: [..., d]; ids: int [*lead, S] where ``lead`` is a prefix of h's leading shape (e.g. h
    [T, R, d] with ids [T, S] shared by the R rows, or ids [S] shared by all rows: pass
    ids[None] ... or any prefix). Negative / out-of-range ids give -inf. Same head transform as
    :func:`stream_stats` (bias, softcap, then / temperature; temperature broadcastable to
    h.shape[:-1]). Returns fp32 [..., S].
    """
    h = jnp.asarray(h)
    W = jnp.asarray(W)
    ids = jnp.asarray(ids)
    lead = h.shape[:-1]
    V = W.shape[1]
    if ids.ndim == 1:
        ids = ids.reshape((1,) * len(lead) + ids.shape)
        ids_e = ids
    else:
        ids_e = _expand_ids(ids, lead)
    cdt = _compute_dtype(h, W)
    valid = (ids_e >= 0) & (ids_e < V)
    idc = jnp.clip(ids_e, 0, V - 1)
    wg = jnp.moveaxis(jnp.take(W, idc, axis=1), 0, -1).astype(cdt)  # [*ids_lead, S, d]
    z = jnp.einsum("...d,...sd->...s", h.astype(cdt), wg, precision=precision,
                   preferred_element_type=_F32)
    if bias is not None:
        z = z + jnp.take(jnp.asarray(bias), idc).astype(_F32)
    z = _softcap(z, softcap)
    if temperature is not None:
        z = z / jnp.asarray(temperature, _F32)[..., None]
    return jnp.where(valid, z, -jnp.inf)


def set_mass(h, W, set_ids, lse, bias=None, softcap=None, temperature=None, precision=None):
    """Probability mass of a token set per row: sum_{s in set} exp(z_s - lse).

    h [..., d]; set_ids int [*lead, S] padded with -1 (lead a prefix of h's leading shape);
    lse [...] from :func:`stream_stats` with the same head settings. Duplicate ids count once.
    Returns fp32 [...].
    """
    set_ids = jnp.asarray(set_ids)
    z = gather_logits(h, W, _dedupe(set_ids), bias, softcap, temperature, precision)
    return jnp.sum(jnp.exp(z - jnp.asarray(lse, _F32)[..., None]), axis=-1)


def _dedupe(ids):
    """Replace repeated ids (after their first occurrence) by -1. ids [..., S]."""
    S = ids.shape[-1]
    eq = ids[..., :, None] == ids[..., None, :]  # [..., S, S]
    earlier = jnp.tril(jnp.ones((S, S), bool), k=-1)
    dup = jnp.any(eq & earlier, axis=-1)
    return jnp.where(dup, -1, ids)


def set_mass_in_topk(top_ids, top_probs, set_ids):
    """Mass of the top-k entries that belong to a set: sum_j top_probs[j] * [top_ids[j] in set].

    top_ids / top_probs [..., k]; set_ids int [*lead, S] padded with -1, lead a prefix of the
    leading shape. Returns fp32 [...].
    """
    top_ids = jnp.asarray(top_ids)
    set_ids = jnp.asarray(set_ids)
    se = _expand_ids(set_ids, top_ids.shape[:-1])
    member = jnp.any(
        (top_ids[..., :, None] == se[..., None, :]) & (se[..., None, :] >= 0), axis=-1
    )
    return jnp.sum(jnp.where(member, jnp.asarray(top_probs, _F32), 0.0), axis=-1)


def topk_jaccard(idsA, idsB):
    """Jaccard overlap |A ∩ B| / |A ∪ B| of two id sets per row ([..., k]; ids < 0 ignored).

    The ids within one row are assumed distinct (as top-k ids are). Returns fp32 [...]
    (1.0 where both sets are empty).
    """
    a = jnp.asarray(idsA)
    b = jnp.asarray(idsB)
    va = a >= 0
    vb = b >= 0
    inter = jnp.sum(
        jnp.any((a[..., :, None] == b[..., None, :]) & vb[..., None, :], axis=-1) & va, axis=-1
    )
    union = jnp.sum(va, -1) + jnp.sum(vb, -1) - inter
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0).astype(_F32)


# ----------------------------------------------------------------------------------------------
# logit-space cosine through the Gram matrix


def gram(W, precision=lax.Precision.HIGHEST):
    """G = W W^T [d, d] in fp32 (cache it: it is reused for every gram_cosine call)."""
    W = jnp.asarray(W)
    return lax.dot_general(
        W, W, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=_F32
    )


def gram_cosine(hA, hB, W=None, *, G=None, precision=lax.Precision.HIGHEST):
    """Cosine between bias-free logit vectors W^T hA and W^T hB, computed in d-space.

    cos = hA G hB / sqrt(hA G hA * hB G hB) with G = W W^T; no vocabulary pass. hA, hB:
    [..., d] (broadcastable). Pass ``G=gram(W)`` to reuse the Gram matrix. Returns fp32 [...].
    """
    if G is None:
        if W is None:
            raise ValueError("gram_cosine needs W or G")
        G = gram(W, precision)
    a = jnp.asarray(hA, _F32)
    b = jnp.asarray(hB, _F32)
    Gb = jnp.einsum("de,...e->...d", G, b, precision=precision)
    Ga = jnp.einsum("de,...e->...d", G, a, precision=precision)
    ab = jnp.sum(a * Gb, -1)
    aa = jnp.sum(a * Ga, -1)
    bb = jnp.sum(b * Gb, -1)
    return ab / jnp.sqrt(jnp.maximum(aa * bb, jnp.finfo(jnp.float32).tiny))
