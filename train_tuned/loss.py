"""Streaming (vocab-chunked) distillation loss with a custom VJP: no [tokens x rows x vocab] logits.

For student rows x [T, R, d] (R lens layers per token), an optional inverse temperature it [T, R], and the
teacher's final-normed rows t [T, d], with the head ``head(y) = softcap(y @ W + b)`` (jaxlens.lens.stream's
definitions and helpers):

    z   = head(x) * it          q   = softmax(z)          (student, per row)
    z_f = head(t)               p_f = softmax(z_f)        (teacher, per token; never differentiated)

    ce  = -sum_v p_f,v log q_v = lse(z) - E_pf[z]         (nats, [T, R])
    H_f = -sum_v p_f,v log p_f,v                          (nats, [T])
    KL(p_f || q) = ce - H_f                               (the tuned-lens objective; same gradient as ce)

Forward: one pass over vocabulary chunks of W with online max / sum rescaling (the math of
jaxlens.lens.stream, notes §4.2): running (m, S) for the student, (m_f, S_f, Z_f) for the teacher and
B = sum e^{z_f - m_f} z, so E_pf[z] = B / S_f and H_f = log S_f - Z_f / S_f. Saved for the backward: the
two log-partitions only.

Gradient (custom VJP), two exact variants:

* fused (default, ``fused_grad=True``): when the loss is differentiated, the forward pass also accumulates,
  with the same online rescaling as flash attention's output, A1 = sum_v e^{z_v - m} c'(a_v) W_v and
  A2 = sum_v e^{z_f,v - m_f} c'(a_v) W_v (c' = softcap derivative), so that
  d ce / dx = it (A1 / S - A2 / S_f) and d ce / d it = sum (q - p_f) head(x) come out of the one pass;
  the backward only multiplies them by the cotangent. Cost: 4 d V flops per row (logits + A1) plus
  4 d V per token for the teacher (logits + A2) -- the same as the package's unfused PyTorch loop, and no
  logits are ever stored or recomputed.
* two-pass (``fused_grad=False``): the forward saves only the log-partitions; a second chunked pass
  recomputes each chunk's logits, forms g_z = g (q - p_f) exactly and accumulates
  dx = sum_chunks (g_z it c'(a)) @ W_c^T and dit = sum_v g_z,v head(x)_v (6 d V flops per row).

W, the bias and the teacher get no gradient (the base model is frozen). Token rows are processed in
blocks of ``token_block`` tokens (lax.map) so the live working set is [token_block, R, chunk].
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from jaxlens.lens.stream import NEG, _dot, _softcap

F32 = jnp.float32
DEFAULT_CHUNK = 2048
DEFAULT_BLOCK_ELEMS = 1 << 21


class _Cfg(NamedTuple):
    vocab: int
    chunk: int
    token_block: int
    softcap: Optional[float]
    has_bias: bool
    has_temp: bool
    precision: object
    fused_grad: bool
    cdt: str            # GEMM operand dtype (rows, teacher and W chunks are cast to it inside the kernel)


def _chunk_cols(W, bias, i, cfg, cdt, nvalid=None):
    """Chunk i: W columns [start, start + C) (clamped inside W), the mask add, and the bias slice.
    ``nvalid``: columns at or past it are masked too (a vocabulary shard's padding; None: all are real)."""
    C = cfg.chunk
    V = cfg.vocab
    lo = i * C
    start = jnp.minimum(lo, V - C)
    wc = lax.dynamic_slice_in_dim(W, start, C, axis=1).astype(cdt)
    col = start + jnp.arange(C, dtype=jnp.int32)
    valid = col >= lo
    if nvalid is not None:
        valid = valid & (col < nvalid)
    madd = jnp.where(valid, 0.0, NEG).astype(F32)
    bc = lax.dynamic_slice_in_dim(bias, start, C).astype(F32) if cfg.has_bias else None
    return wc, madd, bc


def _pre(y, wc, bc, cfg):
    a = _dot(y, wc, cfg.precision)
    return a if bc is None else a + bc


def _chunk_logits(x, it, t, W, bias, i, cfg, cdt, nvalid=None):
    """Chunk i of the lens logits (pre-softcap a, softcapped hz, final z) and the teacher's zf."""
    wc, madd, bc = _chunk_cols(W, bias, i, cfg, cdt, nvalid)
    a = _pre(x, wc, bc, cfg)                                                  # [Tb, R, C]
    hz = _softcap(a, cfg.softcap)
    z = (hz * it[..., None] if cfg.has_temp else hz) + madd
    zf = _softcap(_pre(t, wc, bc, cfg), cfg.softcap) + madd                   # [Tb, C]
    return wc, a, hz, z, zf


def _teacher_update(mf, Sf, Zf, B, zf, z):
    """Online update of the teacher's (max, sum, entropy sum) and of B = sum e^{zf - mf} z."""
    mf_new = jnp.maximum(mf, jnp.max(zf, axis=-1))
    af = jnp.exp(mf - mf_new)
    zfc = zf - mf_new[:, None]
    ef = jnp.exp(zfc)
    Zf = af * (Zf + (mf - mf_new) * Sf) + jnp.sum(ef * zfc, axis=-1)
    Sf = af * Sf + jnp.sum(ef, axis=-1)
    B = af[:, None] * B + jnp.einsum("tc,trc->tr", ef, z, precision=lax.Precision.HIGHEST)
    return mf_new, af, ef, Sf, Zf, B


def _fwd_block(x, it, t, W, bias, cfg):
    """One token block: x [Tb, R, d], it [Tb, R], t [Tb, d] -> (ce [Tb,R], lse [Tb,R], lse_f [Tb], H_f [Tb])."""
    Tb, R, _ = x.shape
    cdt = jnp.dtype(cfg.cdt)
    x, t = x.astype(cdt), t.astype(cdt)
    n_chunks = -(-cfg.vocab // cfg.chunk)

    def step(acc, i):
        m, S, mf, Sf, Zf, B = acc
        _, _, _, z, zf = _chunk_logits(x, it, t, W, bias, i, cfg, cdt)
        m_new = jnp.maximum(m, jnp.max(z, axis=-1))
        S = jnp.exp(m - m_new) * S + jnp.sum(jnp.exp(z - m_new[..., None]), axis=-1)
        mf_new, _, _, Sf, Zf, B = _teacher_update(mf, Sf, Zf, B, zf, z)
        return (m_new, S, mf_new, Sf, Zf, B), None

    acc0 = (jnp.full((Tb, R), NEG, F32), jnp.zeros((Tb, R), F32), jnp.full((Tb,), NEG, F32),
            jnp.zeros((Tb,), F32), jnp.zeros((Tb,), F32), jnp.zeros((Tb, R), F32))
    (m, S, mf, Sf, Zf, B), _ = lax.scan(step, acc0, jnp.arange(n_chunks, dtype=jnp.int32))
    lse = m + jnp.log(S)
    lse_f = mf + jnp.log(Sf)
    ce = lse - B / Sf[:, None]
    H_f = jnp.log(Sf) - Zf / Sf
    return ce, lse, lse_f, H_f


class _Acc(NamedTuple):
    """The online accumulators of one vocabulary pass (module docstring), rescaled to the running maxima."""
    m: jax.Array        # [T, R] student running max
    S: jax.Array        # [T, R] sum e^{z - m}
    mf: jax.Array       # [T] teacher running max
    Sf: jax.Array       # [T] sum e^{zf - mf}
    Zf: jax.Array       # [T] sum e^{zf - mf} (zf - mf)
    B: jax.Array        # [T, R] sum e^{zf - mf} z
    A1: jax.Array       # [T, R, d] sum e^{z - m} c'(a) W_v
    A2: jax.Array       # [T, d] (or [T, R, d] with a softcap) sum e^{zf - mf} c'(a) W_v
    D1: jax.Array       # [T, R] sum e^{z - m} hz      (temperature only)
    D2: jax.Array       # [T, R] sum e^{zf - mf} hz    (temperature only)


def _grad_acc_block(x, it, t, W, bias, cfg, nvalid=None) -> _Acc:
    """One token block's accumulators for the loss *and* its Jacobian rows, in a single vocabulary pass.

    Besides the statistics of :func:`_fwd_block` it accumulates, with the same online rescaling,
    A1 = sum e^{z-m} c'(a) W_v  and  A2 = sum e^{z_f-m_f} c'(a) W_v  (c' = softcap derivative, 1 without
    softcap, where A2 is per token), and for the temperature D1 = sum e^{z-m} hz, D2 = sum e^{z_f-m_f} hz.
    :func:`_finish` turns them into the loss and d ce / dx = it (A1 / S - A2 / S_f), d ce / d it =
    D1 / S - D2 / S_f, so the backward only scales these by the cotangent (4 d V flops per row, not 6).
    """
    Tb, R, d = x.shape
    cdt = jnp.dtype(cfg.cdt)
    x, t = x.astype(cdt), t.astype(cdt)
    n_chunks = -(-cfg.vocab // cfg.chunk)
    per_row_a2 = cfg.softcap is not None
    dims = (((2,), (1,)), ((), ()))

    def step(acc, i):
        m, S, mf, Sf, Zf, B, A1, A2, D1, D2 = acc
        wc, a, hz, z, zf = _chunk_logits(x, it, t, W, bias, i, cfg, cdt, nvalid)
        m_new = jnp.maximum(m, jnp.max(z, axis=-1))
        al = jnp.exp(m - m_new)
        e = jnp.exp(z - m_new[..., None])
        S = al * S + jnp.sum(e, axis=-1)
        mf_new, af, ef, Sf, Zf, B = _teacher_update(mf, Sf, Zf, B, zf, z)
        if cfg.softcap is not None:
            th = jnp.tanh(a * (1.0 / cfg.softcap))
            cp = 1.0 - th * th
            w1 = e * cp
            w2 = ef[:, None, :] * cp
            A2 = af[:, None, None] * A2 + lax.dot_general(w2.astype(cdt), wc, dims, precision=cfg.precision,
                                                          preferred_element_type=F32)
        else:
            w1 = e
            A2 = af[:, None] * A2 + lax.dot_general(ef.astype(cdt), wc, (((1,), (1,)), ((), ())),
                                                    precision=cfg.precision, preferred_element_type=F32)
        A1 = al[..., None] * A1 + lax.dot_general(w1.astype(cdt), wc, dims, precision=cfg.precision,
                                                  preferred_element_type=F32)
        if cfg.has_temp:
            D1 = al * D1 + jnp.sum(e * hz, axis=-1)
            D2 = af[:, None] * D2 + jnp.einsum("tc,trc->tr", ef, hz, precision=lax.Precision.HIGHEST)
        return (m_new, S, mf_new, Sf, Zf, B, A1, A2, D1, D2), None

    z2 = jnp.zeros((Tb, R), F32)
    acc0 = (jnp.full((Tb, R), NEG, F32), z2, jnp.full((Tb,), NEG, F32), jnp.zeros((Tb,), F32),
            jnp.zeros((Tb,), F32), z2, jnp.zeros((Tb, R, d), F32),
            jnp.zeros((Tb, R, d) if per_row_a2 else (Tb, d), F32), z2, z2)
    acc, _ = lax.scan(step, acc0, jnp.arange(n_chunks, dtype=jnp.int32))
    return _Acc(*acc)


def _combine(acc: _Acc, axis_name: str) -> _Acc:
    """The accumulators of every vocabulary shard on mesh axis ``axis_name``, merged (the online-softmax merge:
    rescale each shard's sums to the global maxima, then psum). Identical on every shard afterwards."""
    m = lax.pmax(acc.m, axis_name)
    al = jnp.exp(acc.m - m)                           # 0 for a shard of padding only (m = NEG)
    mf = lax.pmax(acc.mf, axis_name)
    af = jnp.exp(acc.mf - mf)
    ps = lambda v: lax.psum(v, axis_name)             # noqa: E731
    A2s = af[:, None, None] if acc.A2.ndim == 3 else af[:, None]
    return _Acc(m=m, S=ps(al * acc.S), mf=mf, Sf=ps(af * acc.Sf), Zf=ps(af * (acc.Zf + (acc.mf - mf) * acc.Sf)),
                B=ps(af[:, None] * acc.B), A1=ps(al[..., None] * acc.A1), A2=ps(A2s * acc.A2),
                D1=ps(al * acc.D1), D2=ps(af[:, None] * acc.D2))


def _finish(acc: _Acc, it, cfg):
    """(ce, H_f, jx [T, R, d], jit [T, R]) from (merged) accumulators."""
    m, S, mf, Sf, Zf, B, A1, A2, D1, D2 = acc
    ce = m + jnp.log(S) - B / Sf[:, None]
    H_f = jnp.log(Sf) - Zf / Sf
    A2n = A2 / Sf[:, None, None] if A2.ndim == 3 else (A2 / Sf[:, None])[:, None, :]
    jx = A1 / S[..., None] - A2n
    if cfg.has_temp:
        jx = jx * it[..., None]
        jit = D1 / S - D2 / Sf[:, None]
    else:
        jit = jnp.zeros_like(S)
    return ce, H_f, jx, jit


def _fwd_grad_block(x, it, t, W, bias, cfg):
    """One token block, loss and Jacobian rows in one vocabulary pass: (ce, H_f, jx fp32, jit fp32)."""
    return _finish(_grad_acc_block(x, it, t, W, bias, cfg), it, cfg)


def _bwd_block(x, it, t, W, bias, lse, lse_f, g, cfg):
    """Gradients of sum(g * ce) for one token block: (dx [Tb, R, d] fp32, dit [Tb, R] fp32)."""
    Tb, R, d = x.shape
    cdt = jnp.dtype(cfg.cdt)
    x, t = x.astype(cdt), t.astype(cdt)
    n_chunks = -(-cfg.vocab // cfg.chunk)

    def step(acc, i):
        dx, dit = acc
        wc, a, hz, z, zf = _chunk_logits(x, it, t, W, bias, i, cfg, cdt)
        q = jnp.exp(z - lse[..., None])
        pf = jnp.exp(zf - lse_f[:, None])
        gz = g[..., None] * (q - pf[:, None, :])                              # 0 on masked columns
        if cfg.has_temp:
            dit = dit + jnp.sum(gz * hz, axis=-1)
            gz = gz * it[..., None]
        if cfg.softcap is not None:
            th = jnp.tanh(a * (1.0 / cfg.softcap))
            gz = gz * (1.0 - th * th)
        dx = dx + lax.dot_general(gz.astype(cdt), wc, (((2,), (1,)), ((), ())), precision=cfg.precision,
                                  preferred_element_type=F32)
        return (dx, dit), None

    acc0 = (jnp.zeros((Tb, R, d), F32), jnp.zeros((Tb, R), F32))
    (dx, dit), _ = lax.scan(step, acc0, jnp.arange(n_chunks, dtype=jnp.int32))
    return dx, dit


def _blocked(fn, cfg, T, *arrays):
    """Apply fn to token blocks of every array (leading axis T, padded to a multiple of the block)."""
    Tb = cfg.token_block
    nb = -(-T // Tb)
    pad = nb * Tb - T

    def split(a):
        if pad:
            a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape((nb, Tb) + a.shape[1:])

    outs = lax.map(lambda blk: fn(*blk), tuple(split(a) for a in arrays))
    return tuple(o.reshape((nb * Tb,) + o.shape[2:])[:T] for o in outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ce(x, it, t, W, bias, cfg):
    ce, H_f = _blocked(lambda xb, ib, tb: _fwd_block(xb, ib, tb, W, bias, cfg)[0::3], cfg, x.shape[0],
                       x, it, t)
    return ce, H_f


def _ce_fwd(x, it, t, W, bias, cfg):
    if cfg.fused_grad:
        ce, H_f, jx, jit = _blocked(lambda xb, ib, tb: _fwd_grad_block(xb, ib, tb, W, bias, cfg), cfg, x.shape[0],
                                    x, it, t)
        return (ce, H_f), (jx, jit, jnp.zeros((0,), x.dtype))   # the last: carries x's dtype (fp32 grads)
    ce, lse, lse_f, H_f = _blocked(lambda xb, ib, tb: _fwd_block(xb, ib, tb, W, bias, cfg), cfg, x.shape[0],
                                   x, it, t)
    return (ce, H_f), (x, it, t, W, bias, lse, lse_f)


def _fused_bwd(cfg, res, cts):
    """Cotangents (x, it, t, W, bias) from the Jacobian rows saved by a fused forward."""
    g = cts[0].astype(F32)                                                    # H_f has no dependence on x / it
    jx, jit, xdt = res
    dx = (g[..., None] * jx).astype(xdt.dtype)
    return dx, ((g * jit) if cfg.has_temp else None), None, None, None


def _ce_bwd(cfg, res, cts):
    g = cts[0].astype(F32)
    if cfg.fused_grad:
        return _fused_bwd(cfg, res, cts)
    x, it, t, W, bias, lse, lse_f = res
    dx, dit = _blocked(lambda xb, ib, tb, lb, lfb, gb: _bwd_block(xb, ib, tb, W, bias, lb, lfb, gb, cfg),
                       cfg, x.shape[0], x, it, t, lse, lse_f, g)
    return dx.astype(x.dtype), (dit.astype(it.dtype) if cfg.has_temp else None), None, None, None


_ce.defvjp(_ce_fwd, _ce_bwd)


def auto_token_block(T: int, R: int, chunk: int, block_elems: int = DEFAULT_BLOCK_ELEMS) -> int:
    return max(1, min(T, block_elems // max(1, R * chunk)))


def stream_ce(x, t, W, bias=None, inv_temp=None, *, softcap=None, chunk: int = DEFAULT_CHUNK,
              token_block: Optional[int] = None, block_elems: int = DEFAULT_BLOCK_ELEMS, precision=None,
              compute_dtype=None, fused_grad: bool = True):
    """Cross-entropy of the teacher distribution against every student row, streamed over the vocabulary.

    Args:
      x: [T, R, d] student rows (already translated / normalised), differentiable.
      t: [T, d] teacher rows (final-normed last residual), not differentiated.
      W: [d, V] unembedding, bias: optional [V] (frozen).
      inv_temp: optional [T, R] or [R] inverse temperature multiplying the student logits, differentiable.
      softcap: optional final-logit softcap c (applied to student and teacher, before the temperature).
      chunk: vocabulary chunk; token_block: tokens per block (default from ``block_elems``).
      compute_dtype: GEMM operand dtype (default: W's dtype if it is 16-bit, else float32); the GEMMs
        accumulate in float32, every statistic is float32, and the gradient w.r.t. x is returned in x's
        dtype (the cast happens inside the custom VJP, so a bf16 GEMM does not round the gradient).
      fused_grad: under differentiation, accumulate the Jacobian rows during the forward pass (one
        vocabulary pass, 4 d V flops per row; the default) instead of recomputing the logits in a second
        pass (6 d V flops per row, the classic CCE-style backward). Both are exact.

    Returns:
      (ce [T, R], teacher_entropy [T]) in nats; KL(p_f || q) = ce - teacher_entropy[:, None].
    """
    T, R, d = x.shape
    V = W.shape[1]
    if compute_dtype is None:
        compute_dtype = W.dtype if jnp.dtype(W.dtype).itemsize == 2 else F32
    C = min(int(chunk), V)
    tb = auto_token_block(T, R, C, block_elems) if token_block is None else max(1, min(int(token_block), T))
    cfg = _Cfg(vocab=V, chunk=C, token_block=tb, softcap=None if softcap is None else float(softcap),
               has_bias=bias is not None, has_temp=inv_temp is not None, precision=precision,
               fused_grad=bool(fused_grad), cdt="float32")
    cfg = cfg._replace(cdt=jnp.dtype(compute_dtype).name)
    tc = jax.lax.stop_gradient(t)
    if inv_temp is None:
        it = jnp.ones((T, R), F32)
    else:
        it = jnp.asarray(inv_temp, F32)
        it = jnp.broadcast_to(it[None, :] if it.ndim == 1 else it, (T, R))
    b = jnp.zeros((1,), F32) if bias is None else jax.lax.stop_gradient(bias)
    ce, H = _ce(x, it, tc, jax.lax.stop_gradient(W), b, cfg)
    return ce, H


def dense_ce(x, t, W, bias=None, inv_temp=None, *, softcap=None, precision=None):
    """Dense oracle of :func:`stream_ce` (materialises [T, R, V] logits; tests only)."""
    def head(y):
        z = jnp.einsum("...d,dv->...v", y.astype(F32), W.astype(F32), precision=precision)
        if bias is not None:
            z = z + bias.astype(F32)
        return _softcap(z, softcap)

    z = head(x)
    if inv_temp is not None:
        it = jnp.asarray(inv_temp, F32)
        z = z * (it[None, :, None] if it.ndim == 1 else it[..., None])
    zf = head(jax.lax.stop_gradient(t))
    logpf = jax.nn.log_softmax(zf, axis=-1)
    pf = jnp.exp(logpf)
    logq = jax.nn.log_softmax(z, axis=-1)
    ce = -jnp.sum(pf[:, None, :] * logq, axis=-1)
    H = -jnp.sum(pf * logpf, axis=-1)
    return ce, H


# --------------------------------------------------------------------------------------------------
# Vocabulary-parallel: W split over a mesh axis, token rows over others (tuned-lens training at scale)


class _Shards(NamedTuple):
    mesh: object
    vocab_axis: str
    token_axes: tuple
    vocab: int            # the real (unpadded) vocabulary size


def _vp_pass(x, it, t, W, bias, cfg, sh):
    """The fused pass of every device on its (token rows, vocabulary shard), merged over the vocabulary axis."""
    from jax.sharding import PartitionSpec as P

    Vl = cfg.vocab
    tp = sh.mesh.shape[sh.vocab_axis]
    tok = sh.token_axes

    def local(xl, il, tl, Wl, bl):
        nvalid = None
        if tp * Vl != sh.vocab:                       # the last shards hold padding columns
            nvalid = jnp.clip(sh.vocab - lax.axis_index(sh.vocab_axis) * Vl, 0, Vl)
        acc = _blocked(lambda xb, ib, tb: _grad_acc_block(xb, ib, tb, Wl, bl, cfg, nvalid), cfg, xl.shape[0],
                       xl, il, tl)
        acc = _Acc(*acc)
        if tp > 1:
            acc = _combine(acc, sh.vocab_axis)
        return _finish(acc, il, cfg)

    in_specs = (P(tok, None, None), P(tok, None), P(tok, None), P(None, sh.vocab_axis),
                P(sh.vocab_axis) if cfg.has_bias else P())
    out_specs = (P(tok, None), P(tok), P(tok, None, None), P(tok, None))
    return jax.shard_map(local, mesh=sh.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(
        x, it, t, W, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _vp_ce(x, it, t, W, bias, cfg, sh):
    ce, H_f, _, _ = _vp_pass(x, it, t, W, bias, cfg, sh)
    return ce, H_f


def _vp_ce_fwd(x, it, t, W, bias, cfg, sh):
    ce, H_f, jx, jit = _vp_pass(x, it, t, W, bias, cfg, sh)
    return (ce, H_f), (jx, jit, jnp.zeros((0,), x.dtype))


def _vp_ce_bwd(cfg, sh, res, cts):
    return _fused_bwd(cfg, res, cts)


_vp_ce.defvjp(_vp_ce_fwd, _vp_ce_bwd)


def vocab_parallel_ce(x, t, W, bias=None, inv_temp=None, *, mesh, vocab_axis: str = "tensor",
                      token_axes: tuple = ("data", "fsdp"), softcap=None, chunk: int = DEFAULT_CHUNK,
                      token_block: Optional[int] = None, block_elems: int = DEFAULT_BLOCK_ELEMS, precision=None,
                      compute_dtype=None):
    """:func:`stream_ce` with the vocabulary split over mesh axis ``vocab_axis`` and the token rows over
    ``token_axes``: each device streams over its shard of W's columns for its rows only, and the online
    statistics (max, partition sums, the teacher's entropy sum, and the fused gradient's accumulators A1 / A2
    / D1 / D2) are merged across the vocabulary shards by pmax / psum (the online-softmax merge). No device
    holds W whole or any [tokens x V] logits; the loss and the gradient are those of the dense computation.
    A vocabulary that the axis does not divide is padded with masked columns. Same arguments and returns as
    :func:`stream_ce` (fused gradient); the token count must divide over ``token_axes``.
    """
    from jaxlens.errors import JaxlensError

    T, R, d = x.shape
    V = W.shape[1]
    tp = int(mesh.shape[vocab_axis])
    token_axes = tuple(a for a in token_axes if a in mesh.shape)
    ntok = 1
    for a in token_axes:
        ntok *= int(mesh.shape[a])
    if T % ntok:
        raise JaxlensError(f"{T} token rows do not split over the {ntok} devices of mesh axes {token_axes}")
    Vl = -(-V // tp)
    if compute_dtype is None:
        compute_dtype = W.dtype if jnp.dtype(W.dtype).itemsize == 2 else F32
    C = min(int(chunk), Vl)
    Tl = T // ntok
    tb = auto_token_block(Tl, R, C, block_elems) if token_block is None else max(1, min(int(token_block), Tl))
    cfg = _Cfg(vocab=Vl, chunk=C, token_block=tb, softcap=None if softcap is None else float(softcap),
               has_bias=bias is not None, has_temp=inv_temp is not None, precision=precision, fused_grad=True,
               cdt=jnp.dtype(compute_dtype).name)
    W = jax.lax.stop_gradient(W)
    if tp * Vl != V:
        W = jnp.pad(W, ((0, 0), (0, tp * Vl - V)))
    if bias is None:
        b = jnp.zeros((1,), F32)
    else:
        b = jax.lax.stop_gradient(bias)
        if tp * Vl != V:
            b = jnp.pad(b, (0, tp * Vl - V))
    if inv_temp is None:
        it = jnp.ones((T, R), F32)
    else:
        it = jnp.asarray(inv_temp, F32)
        it = jnp.broadcast_to(it[None, :] if it.ndim == 1 else it, (T, R))
    return _vp_ce(x, it, jax.lax.stop_gradient(t), W, b, cfg, _Shards(mesh, vocab_axis, token_axes, int(V)))
