"""Streaming lens statistics: decode many residual rows through an unembedding without logits.

This module is model-independent. The caller hands it rows that are already normalised /
translated (``h`` [T, R, d], token-major: T token rows, R lens rows per token, e.g. the n+1
layers) and the unembedding ``W`` [d, V]; it returns per-row softmax statistics computed in one
streaming pass over vocabulary chunks, never materialising a [T, R, V] array.

Definitions (all statistics in float32 whatever the input dtype; GEMMs accumulate in fp32):

* lens logits      z   = head(h) / temperature        where head(x) = softcap(x @ W + bias)
* teacher logits   z_f = head(teacher_h)              (no temperature)
* softcap(x)       = c * tanh(x / c)                  (applied elementwise per chunk, before stats)
* ``lse`` = logsumexp(z) (nats), ``entropy_bits`` = H(P)/ln 2,
  ``kl_to_final_bits`` = KL(P || P_f), ``kl_final_to_layer_bits`` = KL(P_f || P) (bits),
* ``gold_logit`` g is computed by a gather-dot with the same dtype / precision as the chunk GEMM,
  ``gold_rank`` = 1 + #{v != gold : z_v > g} (strict: ties are in the gold's favour),
  ``gold_prob`` = exp(g - lse); an out-of-range gold id (e.g. -1 for padding) gives rank -1 and
  NaN prob / logit,
* ``top_ids`` / ``top_probs`` [..., k]: probabilities descending, ties broken by the lower id,
* ``teacher_entropy_bits`` / ``teacher_lse`` [T] for the teacher rows.

Streaming math (per row, per vocab chunk c; see notes §4.2): running max m, S = sum e^{z-m},
Zc = sum e^{z-m}(z-m), all rescaled when the max moves. The teacher is co-located: it is
folded in as one more row of each token (row r_f; ``teacher_row`` names an existing row
instead), so its logits come out of the same chunk GEMM, its own (m_f, S_f, Zfc) are just its
row's, and per token only Ac = sum e^{z-m}(z_f-m_f) and Bc = sum e^{z_f-m_f}(z-m) are added
(rescaled when either max moves). Then

    lse = m + log S,          H = log S - Zc/S
    KL(P || P_f) = (Zc - Ac)/S  - log S   + log S_f
    KL(P_f || P) = (Zfc - Bc)/S_f - log S_f + log S

Loops: a lax.scan over vocab chunks (each W chunk is sliced once) around a fori_loop over token
blocks of T_b tokens (T_b*R*C <= block_elems, so the [T_b*R, C] fp32 block stays cache-sized on
CPU); every block is one GEMM with all its rows folded into M. The chunks that hold only real ids
run in a first scan without a mask; the clamped last chunk (and padded vocab shards) in a second,
masked one. On CPU the block loop is unrolled 3 blocks per iteration, so XLA's thunk executor
overlaps one block's top-k loop with the next block's GEMM. W may be given as [d, V] or, with
``vocab_major``, as stored in a tied embedding ([V, d]; each chunk's rows are sliced).

Top-k (exact, ties by the lower id; a sorted running [k] buffer per row, memory independent of V):

* "extract" (default on CPU, :func:`_topk_extract`): one fused reduction gives per-row maxima of
  fixed column groups of the chunk (the chunk max of the logsumexp comes from them for free); a
  while loop then moves, for all rows at once, each row's best remaining chunk entry into the
  buffer while it beats the buffer's k-th value. No sort and no top_k call; the loop runs about
  k for the first chunk and a few for later ones.
* "merge" (default on accelerators, or with ``topk_group``): per chunk a two-stage lax.top_k
  (group maxima -> the k best groups -> their entries) merged into the buffer.

CPU kernel: on CPU, with "extract" (or no top-k), every unmasked chunk of a block goes after its
GEMM to one XLA FFI call (:mod:`jaxlens.lens.cpu_kernel`, ``cpu_stats.cc``) that does the whole
update above -- max, sums, gold count, teacher sums, top-k insertion -- in one cache-resident pass
per row, instead of XLA's eight [rows, C] passes and the extraction loop (decode 1.25x -> 1.07x
its GEMM at d 512; benchmarks/RESULTS.md). Masked chunks keep the XLA path; without a C++
compiler (or with JAXLENS_CPU_KERNEL=0) everything does.

Parallelism (one code path: partial accumulators -> combine -> finalize):

* rows: ``mesh`` + ``row_axis``: the token axis T is sharded, W replicated; no communication.
* vocab: ``mesh`` + ``vocab_axis``: W is sharded on its vocab axis (padded to a multiple of the
  axis size; padded ids are masked); every shard streams its local slice with its global id
  offset; partial accumulators are combined with pmax / psum (with rescaling), the gold logit
  is contributed by its owner shard through a masked psum, and top-k is merged from the
  per-shard candidates (shard order = id order, so lower ids win ties).
* both can be given at once on a 2-D mesh.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlens.lens import cpu_kernel

__all__ = [
    "stream_stats",
    "dense_stats",
    "NEG",
]

#: Value given to masked (padded / already-counted) vocabulary columns. Finite on purpose:
#: exp(NEG - m) == 0 and 0 * NEG == 0, so no NaN can arise from 0 * inf in the accumulators.
NEG = -1e30
_LN2 = math.log(2.0)
_F32 = jnp.float32

# Default chunk size and working-set budget (elements of one [rows, C] fp32 block; the token
# axis is streamed in blocks of block_elems // (R*C) tokens). On CPU small, cache-resident
# blocks win (measured on a 2-core AVX-512 EPYC: C=2048 with 2^19-element blocks, i.e. ~2 MiB
# per block buffer); on accelerators big blocks keep the GEMM efficient.
DEFAULT_CHUNK = None  # None = the platform default below (kept as a name for callers)
DEFAULT_BLOCK_ELEMS = None
CPU_CHUNK, CPU_BLOCK_ELEMS = 2048, 1 << 19
ACCEL_CHUNK, ACCEL_BLOCK_ELEMS = 8192, 1 << 26
# Token blocks per iteration of the block loop. On CPU 3 independent blocks per iteration let
# XLA's thunk executor overlap one block's latency-bound top-k loop with the next block's GEMM
# and statistics (measured at d 512: decode/GEMM 1.31x -> 1.23-1.25x); accelerators run blocks
# large enough not to need it.
CPU_BLOCK_UNROLL, ACCEL_BLOCK_UNROLL = 3, 1


def _platform(mesh):
    try:
        return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    except Exception:  # pragma: no cover - exotic meshes
        return "cpu"


def _default_sizes(mesh):
    if _platform(mesh) == "cpu":
        return CPU_CHUNK, CPU_BLOCK_ELEMS
    return ACCEL_CHUNK, ACCEL_BLOCK_ELEMS


class _Cfg(NamedTuple):
    vocab: int  # true vocabulary size V (global)
    chunk: int  # requested chunk size
    top_k: int
    softcap: Optional[float]
    has_bias: bool
    has_temp: bool
    has_teacher: bool
    teacher_row: Optional[int]  # teacher logits = lens row teacher_row (no teacher GEMM)
    has_gold: bool
    token_block: int  # tokens per block (<= local T)
    precision: Any
    unroll: int
    topk_group: Any  # merge method: None = auto; int or tuple of group sizes
    topk_method: str = "merge"  # "extract" (threshold extraction) or "merge" (per-chunk top_k)
    block_unroll: int = 1  # token blocks per iteration of the block loop
    vocab_major: bool = False  # W is given as [V, d] (embedding / lm_head layout), not [d, V]
    cpu_kernel: bool = False  # unmasked chunks through the one-pass CPU kernel (cpu_kernel.py)


# ----------------------------------------------------------------------------------------------
# small shared pieces


def _dot(x, w, precision):
    """x [..., d] @ w [d, N] -> [..., N] with fp32 accumulation."""
    return lax.dot_general(
        x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision, preferred_element_type=_F32
    )


def _softcap(z, softcap):
    if softcap is None:
        return z
    c = float(softcap)
    return c * jnp.tanh(z * (1.0 / c))


def _compute_dtype(h, W):
    return jnp.promote_types(h.dtype, W.dtype)


def _gold_dot(h, W_cols, precision):
    """h [T, R, d], W_cols [d, T] (each token's gold column) -> [T, R] fp32.

    Written as a batched dot_general with the same operand dtype, precision and fp32
    accumulation as the chunk GEMM (the gather-dot of notes §4.2).
    """
    wt = jnp.transpose(W_cols)[:, :, None]  # [T, d, 1]
    out = lax.dot_general(
        h, wt, (((2,), (1,)), ((0,), (0,))), precision=precision, preferred_element_type=_F32
    )  # [T, R, 1]
    return out[..., 0]


def _norm_temperature(temperature, T, R):
    """temperature: None, scalar, [R] or [T, R] -> temperature [T, R] fp32 (or None)."""
    if temperature is None:
        return None
    t = jnp.asarray(temperature, _F32)
    if t.ndim == 0:
        t = jnp.broadcast_to(t, (T, R))
    elif t.ndim == 1:
        if t.shape[0] != R:
            raise ValueError(f"temperature of shape {t.shape} does not match R={R} lens rows")
        t = jnp.broadcast_to(t[None, :], (T, R))
    elif t.shape != (T, R):
        raise ValueError(f"temperature of shape {t.shape} is neither [R] nor [T, R]=({T}, {R})")
    return t


# ----------------------------------------------------------------------------------------------
# partial accumulators over one local vocab slice, for one block of tokens


def _init_acc(Tb, R, cfg):
    acc = {
        "m": jnp.full((Tb, R), NEG, _F32),
        "S": jnp.zeros((Tb, R), _F32),
        "Zc": jnp.zeros((Tb, R), _F32),
    }
    if cfg.has_teacher:  # the teacher's own m, S, Zc are those of its row cfg.teacher_row
        acc.update(Ac=jnp.zeros((Tb, R), _F32), Bc=jnp.zeros((Tb, R), _F32))
    if cfg.has_gold:
        acc["cnt"] = jnp.zeros((Tb, R), jnp.int32)
    if cfg.top_k:
        acc["tv"] = jnp.full((Tb, R, cfg.top_k), -jnp.inf, _F32)
        acc["ti"] = jnp.full((Tb, R, cfg.top_k), -1, jnp.int32)
    return acc


# per-row overhead of one more top-k level (top_k call, sort, gather), in element-equivalents
_TOPK_CALL_COST = 512


def _topk_groups(C, k, groups):
    """Group sizes (G_1, ..., G_L) of the hierarchical chunk top-k (() = one plain top_k).

    ``groups``: None = automatic (cost model: elements fed to lax.top_k per row, plus a
    per-call overhead), or an explicit tuple / int (1 or () = plain).
    """
    if groups is not None:
        gs = (groups,) if isinstance(groups, int) else tuple(groups)
        gs = tuple(int(g) for g in gs if int(g) > 1)
        n = C
        for g in gs:
            if n % g or n // g < k:
                return ()
            n //= g
        return gs

    def cost(gs):
        n = C
        for g in gs:
            n //= g
        return n + k * (1 + sum(gs)) + _TOPK_CALL_COST * len(gs)

    best, best_cost = (), C + k
    cands = (2, 4, 8, 16, 32, 64)

    def search(gs, n):
        nonlocal best, best_cost
        c = cost(gs)
        if c < best_cost:
            best, best_cost = gs, c
        if len(gs) == 3:
            return
        for g in cands:
            if n % g == 0 and n // g >= k:
                search(gs + (g,), n // g)

    search((), C)
    return best


def _topk_candidates(x, k, gs):
    """Candidate superset of the top-k of x [..., n] (ties: lower index), in ascending index order.

    With groups gs = (G, *rest): the top-k elements lie in the k groups of G consecutive
    entries with the largest maxima (ties: lower group), which are found recursively among
    the n/G group maxima; the k*G entries of those groups are returned. () returns x itself.
    Returns (values [..., m], indices int32 [..., m]).
    """
    lead = x.shape[:-1]
    n = x.shape[-1]
    if not gs:
        return x, jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), x.shape)
    G = gs[0]
    xg = x.reshape(lead + (n // G, G))
    gm = jnp.max(xg, axis=-1)
    gv, gid = _topk_candidates(gm, k, gs[1:])
    if gv.shape[-1] > k:
        _, pos = lax.top_k(gv, k)
        gid = lax.sort(jnp.take_along_axis(gid, pos, axis=-1), dimension=len(lead))
    cand = jnp.take_along_axis(xg, gid[..., None], axis=-2).reshape(lead + (k * G,))
    cid = (gid[..., None] * G + jnp.arange(G, dtype=jnp.int32)).reshape(lead + (k * G,))
    return cand, cid


def _topk_merge(z, tv, ti, k, gs, id0):
    """Merge chunk logits z [..., C] (ids id0 + arange(C)) into the running top-k buffer.

    tv / ti [..., k]: buffer values / ids, holding only ids below id0 (earlier chunks).
    Returns (new values, new ids, chunk max or None). Ties go to the lower id: XLA's TopK
    breaks ties by position (xla/service/cpu/runtime_topk.cc: "Stabilize sorting"), the
    buffer comes first and the chunk candidates are laid out in ascending id order.
    """
    cmax = None
    if gs:
        # the level-1 group maxima (shared with _topk_candidates by CSE) give the chunk max
        gm = jnp.max(z.reshape(z.shape[:-1] + (z.shape[-1] // gs[0], gs[0])), axis=-1)
        cmax = jnp.max(gm, axis=-1)
        cand, cid = _topk_candidates(z, k, gs)
    else:  # plain: the chunk's own top-k (ascending ids among ties), then a small merge
        cand, cid = lax.top_k(z, min(k, z.shape[-1]))
    cv = jnp.concatenate([tv, cand], axis=-1)
    ci = jnp.concatenate([ti, cid + id0], axis=-1)
    v, pos = lax.top_k(cv, k)
    return v, jnp.take_along_axis(ci, pos, axis=-1), cmax


# ----------------------------------------------------------------------------------------------
# exact streaming top-k by threshold extraction (the default)

#: Target column-group size of the extraction top-k (C is split into groups of about this size).
TOPK_GROUP = 32


def _extract_groups(C, target=None):
    """(G, n_groups, padded C) of the extraction top-k for a chunk of C columns.

    G is the divisor of C nearest to ``target`` (no padding); when C has no divisor in
    [target/4, 4*target] (e.g. a prime C) the chunk is padded with masked columns to a
    multiple of ``target`` instead.
    """
    target = TOPK_GROUP if target is None else int(target)
    if C <= target:
        return C, 1, C
    divs = [g for g in range(max(1, target // 4), 4 * target + 1) if C % g == 0]
    if divs:
        G = min(divs, key=lambda g: (abs(math.log(g / target)), g))
        return G, C // G, C
    Cp = -(-C // target) * target
    return target, Cp // target, Cp


def _topk_extract(z, tv, ti, id0):
    """Merge chunk logits z [..., C] (ids id0 + arange(C)) into the running top-k buffer, exactly.

    tv / ti [..., k]: the buffer, sorted by (value desc, id asc), holding ids below id0 only
    (earlier chunks; -inf / -1 while not full). Returns (new values, new ids, chunk max).

    Only the chunk's entries that beat the buffer's k-th value theta can enter it. The chunk is
    split into groups of G consecutive columns; one fused reduction gives the group maxima
    (and from them the chunk max the logsumexp needs anyway). Then a while loop extracts, for
    every row at once, the row's best remaining chunk entry in (value desc, id asc) order (best
    group maximum -> one gathered group of G values -> the entry, the group's next maximum)
    and inserts it into the sorted buffer, until no row's best remaining entry beats its theta.
    The loop runs max-over-rows(number of entries this chunk adds) times: k for the first
    chunk, then about k/i for the i-th chunk on unordered logits, so ~k*(1 + ln(chunks)) per
    pass; each iteration touches only [rows, G + n_groups + k] values. Masked columns (NEG)
    never enter. Exact, ties by the lower id, whatever the data.
    """
    lead = z.shape[:-1]
    C = z.shape[-1]
    k = tv.shape[-1]
    z2 = z.reshape(-1, C)
    rows = z2.shape[0]
    G, nG, Cp = _extract_groups(C)
    if Cp > C:
        z2 = jnp.pad(z2, ((0, 0), (0, Cp - C)), constant_values=NEG)
    z3 = z2.reshape(rows, nG, G)
    gmr = jnp.max(z3, axis=-1)  # [rows, nG]
    cmax = jnp.max(gmr, axis=-1)
    lo_ok = 0.5 * NEG
    # The loop's state is row-minor ([*, rows]: reductions over groups / the buffer run across rows,
    # vectorised); the gathered group is row-major ([rows, G], one contiguous slice per row). Every
    # reduction is a float one (indices as floats): XLA:CPU's integer / boolean reductions are slow.
    gm = jnp.transpose(jnp.where(gmr > lo_ok, gmr, -jnp.inf))
    tv = jnp.transpose(tv.reshape(rows, k))
    ti = jnp.transpose(ti.reshape(rows, k))
    io_g = jnp.arange(G, dtype=_F32)[None, :]
    io_n = jnp.arange(nG, dtype=_F32)[:, None]
    inf_row = jnp.full((1, rows), jnp.inf, _F32)

    def best(gm):  # best remaining group: max value, lowest group among ties
        vb = jnp.max(gm, axis=0)
        gb = jnp.min(jnp.where(gm == vb, io_n, nG - 1.0), axis=0)
        return vb, gb

    def cond(s):
        tv, vb = s[0], s[3]
        return jnp.max(jnp.where(vb > tv[k - 1], 1.0, 0.0)) > 0.0

    def body(s):
        tv, ti, gm, vb, gb, vl, il = s
        act = vb > tv[k - 1]  # the row's best remaining entry enters the buffer
        gbi = gb.astype(jnp.int32)
        zg = jnp.take_along_axis(z3, gbi[:, None, None], axis=1)[:, 0]  # [rows, G]
        base = gb * G  # local column of the group's first entry (exact in fp32: < 2^24)
        # the entry: first column of the group with value vb after the last extracted entry
        # (vl, il) -- only equal values (duplicates) need that test
        after = jnp.where(vb == vl, il - base, -1.0)[:, None]
        vbc = vb[:, None]
        pe = jnp.min(jnp.where((zg == vbc) & (io_g > after), io_g, G - 1.0), axis=1)
        nxt = jnp.max(jnp.where((zg < vbc) | ((zg == vbc) & (io_g > pe[:, None])), zg, -jnp.inf), axis=1)
        nxt = jnp.where(nxt > lo_ok, nxt, -jnp.inf)
        col = base + pe
        # sorted insertion (ties: the buffer's entries have lower ids and stay in front)
        v = jnp.where(act, vb, -jnp.inf)
        tvp = jnp.concatenate([inf_row, tv[:-1]], axis=0)
        tip = jnp.concatenate([ti[:1], ti[:-1]], axis=0)
        ti = jnp.where(tv >= v, ti, jnp.where(tvp >= v, col.astype(jnp.int32) + id0, tip))
        tv = jnp.maximum(tv, jnp.minimum(v, tvp))
        gm = jnp.where(act & (io_n == gb), nxt, gm)
        vl = jnp.where(act, vb, vl)
        il = jnp.where(act, col, il)
        vb, gb = best(gm)
        return tv, ti, gm, vb, gb, vl, il

    vb, gb = best(gm)
    s0 = (tv, ti, gm, vb, gb, jnp.full((rows,), jnp.inf, _F32), jnp.full((rows,), -1.0, _F32))
    tv, ti = lax.while_loop(cond, body, s0)[:2]
    return (jnp.transpose(tv).reshape(lead + (k,)), jnp.transpose(ti).reshape(lead + (k,)),
            cmax.reshape(lead))


def _vocab_axis(vocab_major):
    """The vocabulary axis of W: 0 for [V, d] (``vocab_major``), 1 for [d, V]."""
    return 0 if vocab_major else 1


def _w_cols(W, start, C, vocab_major):
    """Columns [start, start + C) of the unembedding as a [d, C] block (W [d, V], or [V, d] when
    ``vocab_major``: then C contiguous rows are sliced and transposed, a chunk-sized copy)."""
    w = lax.dynamic_slice_in_dim(W, start, C, axis=_vocab_axis(vocab_major))
    return jnp.transpose(w) if vocab_major else w


def _plus(z, x):
    return z if x is None else z + x


def _stream_local(blk, W, bias, offset, cfg, safe_cols):
    """Partial accumulators of all local rows over one local vocab slice W [d, Vl].

    blk: dict with h [T, R, d] (compute dtype), optional temp [T, R], g [T, R] (final gold
    logit), gcol [T] (gold column local to this slice, any int), gown [T] (bool: the gold
    lies in this slice). offset: global id of local column 0. Returns the accumulator dict.

    Loops: vocab chunks outside (each W chunk is sliced once), token blocks of Tb tokens
    inside (the [Tb*R, C] block stays cache-sized). Token block j covers [s_j, s_j + Tb) with
    s_j = min(j*Tb, T - Tb): the last block overlaps the previous one instead of padding; every
    block reads the chunk-start accumulators, so the overlap rows are recomputed to identical
    values and nothing of size T is padded or copied.

    ``safe_cols`` (static): the leading local columns that are real ids on every shard. Chunks
    inside them need no mask (no overlap, no padding): they run in a first scan whose
    logits go to the statistics unmasked (no extra [rows, C] pass); the remaining chunks (the
    clamped last one, padded ids) run in a second scan with the mask.
    """
    h = blk["h"]
    T, R, d = h.shape
    Vl = W.shape[_vocab_axis(cfg.vocab_major)]
    C = min(cfg.chunk, Vl)
    n_chunks = -(-Vl // C)
    cdt = h.dtype
    prec = cfg.precision
    col_iota = jnp.arange(C, dtype=jnp.int32)
    extract = cfg.topk_method == "extract"
    topk_gs = _topk_groups(C, cfg.top_k, cfg.topk_group) if cfg.top_k and not extract else ()
    Tb = min(cfg.token_block, T)
    nb = -(-T // Tb)
    Tb = -(-T // nb)  # balance the blocks

    def gold_col(b, start, lo):
        """Per token: the gold's column in the chunk at ``start`` when this shard owns it and it
        lies in the chunk's new columns [lo, start + C), else -1."""
        rel = b["gcol"] - start
        return jnp.where(b["gown"] & (rel >= lo - start) & (rel < C), rel, -1)

    def update(acc, b, wc, bc, madd, start, lo):
        """One [Tb, R, C] block: fold chunk logits into the accumulators of these rows."""
        hb = b["h"]
        tb = hb.shape[0]
        z = _dot(hb, wc, prec)  # [tb, R, C] fp32
        tmp = b.get("temp")
        z = _softcap(_plus(z, bc), cfg.softcap)
        if tmp is not None:
            z = z / tmp[..., None]
        z = _plus(z, madd)
        if cfg.cpu_kernel and madd is None:
            return _kernel_update(acc, b, z, start, lo)
        new = {}
        cmax = None
        if cfg.top_k:
            if extract:
                new["tv"], new["ti"], cmax = _topk_extract(z, acc["tv"], acc["ti"], start + offset)
            else:
                new["tv"], new["ti"], cmax = _topk_merge(
                    z, acc["tv"], acc["ti"], cfg.top_k, topk_gs, start + offset
                )
        if cmax is None:
            cmax = jnp.max(z, axis=-1)
        m, S = acc["m"], acc["S"]
        m_new = jnp.maximum(m, cmax)
        a = jnp.exp(m - m_new)
        zc = z - m_new[..., None]
        e = jnp.exp(zc)
        new["m"] = m_new
        new["S"] = a * S + jnp.sum(e, axis=-1)
        new["Zc"] = a * (acc["Zc"] + (m - m_new) * S) + jnp.sum(e * zc, axis=-1)
        if cfg.has_teacher:
            r = cfg.teacher_row  # the teacher is one of the rows (folded in if needed)
            zfc = zc[:, r, :]  # z_f - m_f (m_f is the teacher row's running max)
            ef = e[:, r, :]
            dm_f = (m - m_new)[:, r]  # old m_f - new m_f
            a_f = a[:, r]
            S_f = S[:, r]
            # sum_v e^{z-m} (z_f - m_f) and sum_v e^{z_f-m_f} (z - m): per token a [R, C] x [C]
            # product (batched dots: no broadcast [rows, C] operand is built)
            bdot = (((2,), (1,)), ((0,), (0,)))
            sa = lax.dot_general(e, zfc, bdot, preferred_element_type=_F32)
            sb = lax.dot_general(zc, ef, bdot, preferred_element_type=_F32)
            new["Ac"] = a * (acc["Ac"] + dm_f[:, None] * S) + sa
            new["Bc"] = a_f[:, None] * (acc["Bc"] + (m - m_new) * S_f[:, None]) + sb
        if cfg.has_gold:
            g = b["g"]
            # fp32 count (exact below 2^24 per chunk): XLA:CPU reduces floats much faster
            gt = jnp.sum(jnp.where(z > g[..., None], 1.0, 0.0), axis=-1).astype(jnp.int32)
            # the gold's own column never counts (its GEMM value may differ by ULPs from g)
            sc = gold_col(b, start, lo)  # [tb]
            zg = jnp.take_along_axis(
                z, jnp.broadcast_to(jnp.clip(sc, 0, C - 1)[:, None, None], (tb, R, 1)), axis=-1
            )[..., 0]
            selfc = ((sc >= 0)[:, None] & (zg > g)).astype(jnp.int32)
            new["cnt"] = acc["cnt"] + gt - selfc
        return new

    def _kernel_update(acc, b, z, start, lo):
        """update() through the one-pass CPU kernel (an unmasked chunk; cpu_kernel.py)."""
        tb = z.shape[0]
        rows = tb * R
        flat = {n: x.reshape((rows,) + x.shape[2:]) for n, x in acc.items()}
        g = selfcol = None
        if cfg.has_gold:
            g = b["g"].reshape(rows)
            selfcol = jnp.broadcast_to(gold_col(b, start, lo)[:, None], (tb, R)).reshape(rows)
        new = cpu_kernel.chunk_stats(
            z.reshape(rows, C), flat, g, selfcol, start + offset, R=R,
            teacher_row=cfg.teacher_row if cfg.has_teacher else None,
            has_gold=cfg.has_gold, k=cfg.top_k,
        )
        return {n: x.reshape((tb, R) + x.shape[1:]) for n, x in new.items()}

    def chunk_step(acc, i, masked):
        lo = i * C  # first column not yet seen
        start = jnp.minimum(lo, Vl - C)  # the last chunk is clamped inside W (no padding)
        # sliced once per chunk (the barrier keeps XLA from re-slicing W in every token block)
        wc = _w_cols(W, start, C, cfg.vocab_major)
        wc = lax.optimization_barrier(wc.astype(cdt))
        madd = None
        if masked:
            lcol = start + col_iota
            valid = (lcol >= lo) & (lcol + offset < cfg.vocab)
            madd = jnp.where(valid, 0.0, NEG).astype(_F32)
        bc = None
        if cfg.has_bias:
            bc = lax.dynamic_slice_in_dim(bias, start, C).astype(_F32)
        if nb == 1:
            return update(acc, blk, wc, bc, madd, start, lo), None

        def body(j, new_acc):
            s = jnp.minimum(j * Tb, T - Tb)
            sl = lambda x: lax.dynamic_slice_in_dim(x, s, Tb, 0)  # noqa: E731
            part = update(
                jax.tree_util.tree_map(sl, acc), jax.tree_util.tree_map(sl, blk),
                wc, bc, madd, start, lo,
            )
            return jax.tree_util.tree_map(
                lambda o, p: lax.dynamic_update_slice_in_dim(o, p, s, 0), new_acc, part
            )

        return lax.fori_loop(0, nb, body, acc, unroll=max(1, min(cfg.block_unroll, nb))), None

    n_free = min(Vl, safe_cols) // C  # chunks that need no mask
    acc = _init_acc(T, R, cfg)
    for lo_i, hi_i, masked in ((0, n_free, False), (n_free, n_chunks, True)):
        if hi_i > lo_i:
            acc, _ = lax.scan(functools.partial(chunk_step, masked=masked), acc,
                              jnp.arange(lo_i, hi_i, dtype=jnp.int32), unroll=cfg.unroll)
    return acc


# ----------------------------------------------------------------------------------------------
# combine partials across vocab shards, and finalize


def _combine(acc, axis, cfg):
    """Combine per-vocab-shard partial accumulators (inside shard_map) over mesh axis ``axis``."""
    out = {}
    m, S = acc["m"], acc["S"]
    mg = lax.pmax(m, axis)
    a = jnp.exp(m - mg)
    out["m"] = mg
    out["S"] = lax.psum(a * S, axis)
    out["Zc"] = lax.psum(a * (acc["Zc"] + (m - mg) * S), axis)
    if cfg.has_teacher:
        r = cfg.teacher_row
        dm_f = (m - mg)[:, r]
        out["Ac"] = lax.psum(a * (acc["Ac"] + dm_f[:, None] * S), axis)
        out["Bc"] = lax.psum(a[:, r, None] * (acc["Bc"] + (m - mg) * S[:, r, None]), axis)
    if cfg.has_gold:
        out["cnt"] = lax.psum(acc["cnt"], axis)
    if cfg.top_k:
        k = cfg.top_k
        tv = lax.all_gather(acc["tv"], axis)  # [n, T, R, k], shard order == id order
        ti = lax.all_gather(acc["ti"], axis)
        n = tv.shape[0]
        tv = jnp.moveaxis(tv, 0, -2).reshape(tv.shape[1:-1] + (n * k,))
        ti = jnp.moveaxis(ti, 0, -2).reshape(ti.shape[1:-1] + (n * k,))
        v, pos = lax.top_k(tv, k)
        out["tv"] = v
        out["ti"] = jnp.take_along_axis(ti, pos, axis=-1)
    return out


def _finalize(acc, g, gvalid, cfg):
    logS = jnp.log(acc["S"])
    lse = acc["m"] + logS
    zbar = acc["Zc"] / acc["S"]  # E_p[z - m]
    out = {"lse": lse, "entropy_bits": (logS - zbar) / _LN2}
    if cfg.has_teacher:
        r = cfg.teacher_row
        logSf = logS[:, r]
        out["teacher_lse"] = lse[:, r]
        out["teacher_entropy_bits"] = out["entropy_bits"][:, r]
        kl_pf = zbar - acc["Ac"] / acc["S"] - logS + logSf[:, None]
        kl_fp = (acc["Zc"][:, r, None] - acc["Bc"]) / acc["S"][:, r, None] - logSf[:, None] + logS
        out["kl_to_final_bits"] = jnp.maximum(kl_pf, 0.0) / _LN2
        out["kl_final_to_layer_bits"] = jnp.maximum(kl_fp, 0.0) / _LN2
    if cfg.has_gold:
        gv = gvalid[:, None]
        out["gold_rank"] = jnp.where(gv, acc["cnt"] + 1, -1).astype(jnp.int32)
        out["gold_prob"] = jnp.where(gv, jnp.exp(g - lse), jnp.nan)
        out["gold_logit"] = jnp.where(gv, g, jnp.nan)
    if cfg.top_k:
        out["top_ids"] = acc["ti"]
        out["top_probs"] = jnp.exp(acc["tv"] - lse[..., None])
    return out


# ----------------------------------------------------------------------------------------------
# local driver: gold logits, token blocking, streaming, combine, finalize


def _row_blocked(fn, xs, Tb):
    """Apply a row-independent fn to the pytree xs (leading axis T) in blocks of Tb rows.

    Blocks are [s_b, s_b + Tb) with s_b = min(b*Tb, T - Tb): the last block overlaps the
    previous one instead of padding (rows are independent, so the overlap is recomputed to
    identical values), so nothing of size T is copied. Returns fn's pytree with leading axis T.
    """
    T = jax.tree_util.tree_leaves(xs)[0].shape[0]
    if Tb >= T:
        return fn(xs)
    nb = -(-T // Tb)
    Tb = -(-T // nb)  # balance the blocks
    sub_shapes = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct((Tb,) + x.shape[1:], x.dtype), xs
    )
    out_shapes = jax.eval_shape(fn, sub_shapes)
    out0 = jax.tree_util.tree_map(lambda s: jnp.zeros((T,) + s.shape[1:], s.dtype), out_shapes)

    def body(b, out):
        s = jnp.minimum(b * Tb, T - Tb)
        part = fn(jax.tree_util.tree_map(lambda x: lax.dynamic_slice_in_dim(x, s, Tb, 0), xs))
        return jax.tree_util.tree_map(
            lambda o, p: lax.dynamic_update_slice_in_dim(o, p, s, 0), out, part
        )

    return lax.fori_loop(0, nb, body, out0)


def _local_stats(args, cfg, vocab_axis):
    """Runs on one device's data (inside shard_map, or alone). args: dict of local arrays."""
    h = args["h"]
    W = args["W"]
    bias = args.get("bias")
    T, R, _ = h.shape
    Vl = W.shape[_vocab_axis(cfg.vocab_major)]
    offset = 0 if vocab_axis is None else lax.axis_index(vocab_axis) * Vl
    blk = {"h": h}
    if cfg.has_temp:
        blk["temp"] = args["temp"]
    g = gvalid = None
    if cfg.has_gold:
        gold = args["gold"]
        gvalid = (gold >= 0) & (gold < cfg.vocab)
        lc = gold - offset
        own = gvalid & (lc >= 0) & (lc < Vl)
        lcc = jnp.clip(lc, 0, Vl - 1)
        wg = jnp.take(W, lcc, axis=_vocab_axis(cfg.vocab_major))
        wg = wg.T if cfg.vocab_major else wg  # [d, T]
        graw = _gold_dot(h, wg.astype(h.dtype), cfg.precision)
        graw = jnp.where(own[:, None], graw, 0.0)
        if cfg.has_bias:
            graw = graw + jnp.where(own, jnp.take(bias, lcc).astype(_F32), 0.0)[:, None]
        if vocab_axis is not None:
            graw = lax.psum(graw, vocab_axis)  # exactly one owner: x + 0 + ... == x
        g = _softcap(graw, cfg.softcap)
        if cfg.has_temp:
            g = g / args["temp"]
        blk.update(g=g, gcol=lc, gown=own)

    # leading local columns that are real ids on every shard (padding sits at the global end)
    nv = 1 if vocab_axis is None else lax.axis_size(vocab_axis)
    safe = max(0, min(Vl, cfg.vocab - (nv - 1) * Vl))
    acc = _stream_local(blk, W, bias, offset, cfg, safe_cols=safe)
    if vocab_axis is not None:
        acc = _combine(acc, vocab_axis, cfg)
    return _finalize(acc, g, gvalid, cfg)


def _run(args, cfg, mesh, vocab_axis, row_axis):
    if mesh is None:
        return _local_stats(args, cfg, None)
    T = args["h"].shape[0]
    vaxis = _vocab_axis(cfg.vocab_major)
    V = args["W"].shape[vaxis]
    nr = mesh.shape[row_axis] if row_axis is not None else 1
    nv = mesh.shape[vocab_axis] if vocab_axis is not None else 1
    args = dict(args)
    padT = (-T) % nr
    if padT:
        for key in ("h", "temp", "gold"):
            if key in args:
                x = args[key]
                fill = -1 if key == "gold" else (1.0 if key == "temp" else 0)
                args[key] = jnp.pad(x, [(0, padT)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
    padV = (-V) % nv
    if padV:
        args["W"] = jnp.pad(args["W"], ((0, padV), (0, 0)) if vaxis == 0 else ((0, 0), (0, padV)))
        if "bias" in args:
            args["bias"] = jnp.pad(args["bias"], (0, padV))
    if nr > 1 or nv > 1:
        cfg = cfg._replace(token_block=min(cfg.token_block, (T + padT) // nr))
    rspec = row_axis
    specs = {
        "h": P(rspec),
        "W": P(vocab_axis, None) if vaxis == 0 else P(None, vocab_axis),
        "bias": P(vocab_axis),
        "temp": P(rspec),
        "gold": P(rspec),
    }
    in_specs = ({k: specs[k] for k in args},)
    out_keys = _out_keys(cfg)
    out_specs = {k: P(rspec) for k in out_keys}
    explicit = any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))
    if explicit:
        # Explicit axes: shard_map demands inputs already typed with the in_specs' shardings.
        args = {k: jax.reshard(v, NamedSharding(mesh, specs[k])) for k, v in args.items()}
    fn = jax.shard_map(
        functools.partial(_local_stats, cfg=cfg, vocab_axis=vocab_axis),
        mesh=mesh,
        in_specs=in_specs,
        out_specs=out_specs,
        check_vma=False,
    )
    out = fn(args)
    if padT:
        if explicit:  # slicing a sharded dim to a non-multiple is not allowed under Explicit axes
            out = {k: jax.reshard(v, NamedSharding(mesh, P())) for k, v in out.items()}
        out = {k: v[:T] for k, v in out.items()}
    return out


def _out_keys(cfg):
    keys = ["lse", "entropy_bits"]
    if cfg.has_teacher:
        keys += ["teacher_lse", "teacher_entropy_bits", "kl_to_final_bits",
                 "kl_final_to_layer_bits"]
    if cfg.has_gold:
        keys += ["gold_rank", "gold_prob", "gold_logit"]
    if cfg.top_k:
        keys += ["top_ids", "top_probs"]
    return keys


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "vocab_axis", "row_axis"))
def _stream_jit(args, cfg, mesh, vocab_axis, row_axis):
    if "teacher" not in args:
        return _run(args, cfg, mesh, vocab_axis, row_axis)
    # Fold the teacher in as an extra row R of every token: its logits then come out of the
    # same GEMM and the same epilogue as the lens rows (one big GEMM instead of a second,
    # skinny one), with temperature 1.
    args = dict(args)
    h = args["h"]
    T, R, _ = h.shape
    args["h"] = jnp.concatenate([h, args.pop("teacher")[:, None, :]], axis=1)
    if "temp" in args:
        args["temp"] = jnp.concatenate([args["temp"], jnp.ones((T, 1), _F32)], axis=1)
    out = _run(args, cfg._replace(teacher_row=R), mesh, vocab_axis, row_axis)
    return {k: (v if k.startswith("teacher_") else v[:, :R]) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# public API


def _prepare(h, W, bias, temperature, teacher_h, gold, top_k, teacher_row=None, vocab_major=False):
    """Validate / normalise shapes. Returns (args dict, squeeze_R flag)."""
    h = jnp.asarray(h)
    W = jnp.asarray(W)
    squeeze = h.ndim == 2
    if squeeze:
        h = h[:, None, :]
    if h.ndim != 3:
        raise ValueError(f"h must be [T, R, d] or [T, d]; got shape {h.shape}")
    T, R, d = h.shape
    vax = _vocab_axis(vocab_major)
    if W.ndim != 2 or W.shape[1 - vax] != d:
        layout = "[V, d]" if vocab_major else "[d, V]"
        flag = " (vocab_major=True)" if vocab_major else ""
        raise ValueError(f"W must be {layout} with d={d}{flag}; got shape {W.shape}")
    V = W.shape[vax]
    if not 0 <= int(top_k) <= V:
        raise ValueError(f"top_k={top_k} must lie in [0, V={V}]")
    cdt = _compute_dtype(h, W)
    args = {"h": h.astype(cdt), "W": W}
    if bias is not None:
        bias = jnp.asarray(bias)
        if bias.shape != (V,):
            raise ValueError(f"bias must be [V]=({V},); got shape {bias.shape}")
        args["bias"] = bias
    if temperature is not None:
        if squeeze and jnp.ndim(temperature) == 1 and jnp.shape(temperature)[0] == T and T != 1:
            temperature = jnp.asarray(temperature)[:, None]
        args["temp"] = _norm_temperature(temperature, T, R)
    if teacher_h is not None:
        teacher_h = jnp.asarray(teacher_h)
        if teacher_h.shape != (T, d):
            raise ValueError(f"teacher_h must be [T, d]=({T}, {d}); got shape {teacher_h.shape}")
        args["teacher"] = teacher_h.astype(cdt)
    if teacher_row is not None:
        if teacher_h is not None:
            raise ValueError("pass either teacher_h or teacher_row, not both")
        if temperature is not None:
            raise ValueError("teacher_row needs temperature=None (the teacher has no temperature)")
        if not -R <= int(teacher_row) < R:
            raise ValueError(f"teacher_row={teacher_row} is not a lens row index for R={R}")
    if gold is not None:
        gold = jnp.asarray(gold)
        if gold.shape != (T,):
            raise ValueError(f"gold must be [T]=({T},) int ids; got shape {gold.shape}")
        args["gold"] = gold.astype(jnp.int32)
    return args, squeeze


def _squeeze_out(out, squeeze):
    if not squeeze:
        return out
    return {k: (v if k.startswith("teacher_") else v[:, 0]) for k, v in out.items()}


def _auto_token_block(T, R, C, block_elems):
    return max(1, min(T, int(block_elems) // max(1, R * C)))


def stream_stats(
    h,
    W,
    *,
    bias=None,
    softcap: Optional[float] = None,
    temperature=None,
    teacher_h=None,
    teacher_row: Optional[int] = None,
    gold=None,
    top_k: int = 0,
    chunk: Optional[int] = None,
    token_block: Optional[int] = None,
    block_elems: Optional[int] = None,
    precision=None,
    mesh: Optional[Mesh] = None,
    vocab_axis: Optional[str] = None,
    row_axis: Optional[str] = None,
    unroll: int = 1,
    topk_group=None,
    topk_method: Optional[str] = None,
    vocab_major: bool = False,
    cpu_kernel_path: Optional[bool] = None,
) -> dict:
    """Streaming softmax statistics of every lens row, in one pass over vocabulary chunks.

    Args:
      h: [T, R, d] lens rows, token-major (or [T, d] = one row per token; outputs then [T, ...]).
        Compute dtype (fp32 / bf16 / fp16); the GEMM accumulates in fp32.
      W: [d, V] unembedding (compute dtype or fp32; the operands are promoted to a common dtype),
        or [V, d] with ``vocab_major=True`` (a tied embedding / an lm_head as stored: no
        transposed copy of the whole matrix is made, each chunk's rows are sliced instead).
      bias: optional [V] output bias.
      softcap: optional final-logit softcap c (z <- c*tanh(z/c)), applied after the bias.
      temperature: optional scalar, [R] or [T, R]; lens logits are divided by it after the
        softcap (the teacher is not).
      teacher_h: optional [T, d] final-normed residual per token; enables the two KLs and the
        teacher_* outputs. It is streamed as one more row of each token (inside the jit, h is
        concatenated to [T, R+1, d]).
      teacher_row: alternative to teacher_h when the teacher is one of the lens rows (e.g. the
        last layer of the norm / logit lens): that row's logits are reused, which saves the
        extra row (1/(R+1) of the GEMM and epilogue) and the copy of h; that row's KLs are then
        exactly 0. Needs temperature=None.
      gold: optional [T] int gold id per token (out-of-range ids give rank -1, NaN prob).
      top_k: number of top tokens to return (0 = none).
      chunk: vocabulary chunk size C (clamped to the local vocab size). Default: 2048 on CPU,
        8192 on accelerators.
      token_block: tokens per streamed block (default: the largest with T_b*R*C <= block_elems).
      block_elems: working-set budget of one [rows, C] block (default 2^19 on CPU, 2^26 on
        accelerators).
      precision: lax precision for the GEMMs and the gold gather-dot (default: JAX's config).
      mesh, vocab_axis, row_axis: optional multi-device execution (see module docstring).
      unroll: lax.scan unroll factor over chunks.
      topk_method: how the running top-k absorbs each chunk (both exact, ties by lower id):
        ``"extract"`` (threshold extraction, see :func:`_topk_extract`; no sort or top_k call
        per chunk) or ``"merge"`` (a hierarchical lax.top_k per chunk merged into the buffer).
        None = automatic: "merge" when ``topk_group`` is given, else "extract" on CPU and
        "merge" on accelerators.
      topk_group: group sizes of the "merge" chunk top-k (None = automatic; 1 = plain
        lax.top_k over each chunk; an int G or a tuple of sizes per level).
      cpu_kernel_path: on CPU with the "extract" top-k (or none), fold each unmasked chunk into
        the statistics with the one-pass C++ kernel of :mod:`jaxlens.lens.cpu_kernel` (None =
        whenever it builds; False = the pure-XLA path; True = the kernel or a ValueError). Both
        paths give the same top-k ids and ranks and the same statistics to fp32 rounding.

    Returns:
      dict of fp32 arrays (int32 for ids / ranks) shaped [T, R] / [T, R, k]:
      ``lse``, ``entropy_bits``; with teacher: ``kl_to_final_bits``, ``kl_final_to_layer_bits``,
      ``teacher_lse`` [T], ``teacher_entropy_bits`` [T]; with gold: ``gold_rank``, ``gold_prob``,
      ``gold_logit``; with top_k: ``top_ids``, ``top_probs``.
    """
    args, squeeze = _prepare(h, W, bias, temperature, teacher_h, gold, top_k, teacher_row, vocab_major)
    T, R, _ = args["h"].shape
    V = args["W"].shape[_vocab_axis(vocab_major)]
    if (vocab_axis is not None or row_axis is not None) and mesh is None:
        raise ValueError("vocab_axis / row_axis need a mesh")
    if mesh is not None:
        for ax in (vocab_axis, row_axis):
            if ax is not None and ax not in mesh.shape:
                raise ValueError(f"axis {ax!r} is not an axis of the mesh {dict(mesh.shape)}")
        if vocab_axis is not None and vocab_axis == row_axis:
            raise ValueError("vocab_axis and row_axis must differ")
    nv = mesh.shape[vocab_axis] if (mesh is not None and vocab_axis is not None) else 1
    nr = mesh.shape[row_axis] if (mesh is not None and row_axis is not None) else 1
    dchunk, dblock = _default_sizes(mesh)
    chunk = dchunk if chunk is None else int(chunk)
    block_elems = dblock if block_elems is None else int(block_elems)
    if chunk < 1:
        raise ValueError(f"chunk must be positive; got {chunk}")
    if topk_method is None:
        topk_method = "merge" if topk_group is not None or _platform(mesh) != "cpu" else "extract"
    if topk_method not in ("extract", "merge"):
        raise ValueError(f"topk_method must be 'extract', 'merge' or None; got {topk_method!r}")
    use_kernel = (cpu_kernel_path is None or bool(cpu_kernel_path)) and _platform(mesh) == "cpu" and (
        topk_method == "extract" or not top_k) and cpu_kernel.available()
    if cpu_kernel_path and not use_kernel:
        raise ValueError("cpu_kernel_path=True needs the CPU platform, the 'extract' top-k and a built "
                         "kernel (a C++ compiler; JAXLENS_CPU_KERNEL not 0): see jaxlens.lens.cpu_kernel")
    Vl = -(-V // nv)
    C = min(chunk, Vl)
    Tl = -(-T // nr)
    if token_block is None:
        token_block = _auto_token_block(Tl, R + ("teacher" in args), C, block_elems)
    cfg = _Cfg(
        vocab=V,
        chunk=C,
        top_k=int(top_k),
        softcap=None if softcap is None else float(softcap),
        has_bias="bias" in args,
        has_temp="temp" in args,
        has_teacher="teacher" in args or teacher_row is not None,
        teacher_row=None if teacher_row is None else int(teacher_row) % R,
        has_gold="gold" in args,
        token_block=max(1, int(token_block)),
        precision=precision,
        unroll=int(unroll),
        topk_group=topk_group,
        topk_method=topk_method,
        block_unroll=CPU_BLOCK_UNROLL if _platform(mesh) == "cpu" else ACCEL_BLOCK_UNROLL,
        vocab_major=bool(vocab_major),
        cpu_kernel=use_kernel,
    )
    out = _stream_jit(args, cfg, mesh, vocab_axis, row_axis)
    return _squeeze_out(out, squeeze)


def dense_stats(
    h,
    W,
    *,
    bias=None,
    softcap: Optional[float] = None,
    temperature=None,
    teacher_h=None,
    teacher_row: Optional[int] = None,
    gold=None,
    top_k: int = 0,
    chunk: Optional[int] = None,
    token_block: Optional[int] = None,
    block_elems: Optional[int] = None,
    precision=None,
    mesh=None,
    vocab_axis=None,
    row_axis=None,
    unroll: int = 1,
    topk_group=None,
    topk_method=None,
    vocab_major: bool = False,
) -> dict:
    """Dense oracle of :func:`stream_stats` (same signature and outputs) from full logits.

    Materialises [T, R, V] fp32 logits; for tests and debugging only. The chunk / blocking /
    mesh arguments are accepted and ignored.
    """
    del chunk, token_block, block_elems, mesh, vocab_axis, row_axis, unroll, topk_group, topk_method
    args, squeeze = _prepare(h, W, bias, temperature, teacher_h, gold, top_k, teacher_row, vocab_major)
    if vocab_major:
        args["W"] = jnp.transpose(args["W"])
    if teacher_row is not None:
        args["teacher"] = args["h"][:, int(teacher_row)]
    out = _dense_jit(args, int(top_k), None if softcap is None else float(softcap), precision)
    return _squeeze_out(out, squeeze)


@functools.partial(jax.jit, static_argnames=("top_k", "softcap", "precision"))
def _dense_jit(args, top_k, softcap, precision):
    h, W = args["h"], args["W"]
    T, R, d = h.shape
    V = W.shape[1]
    Wc = W.astype(h.dtype)

    def head(x):
        z = _dot(x, Wc, precision)
        if "bias" in args:
            z = z + args["bias"].astype(_F32)
        return _softcap(z, softcap)

    z = head(h)
    if "temp" in args:
        z = z / args["temp"][..., None]
    lse = jax.nn.logsumexp(z, axis=-1)
    logp = z - lse[..., None]
    p = jnp.exp(logp)
    out = {"lse": lse, "entropy_bits": -jnp.sum(p * logp, axis=-1) / _LN2}
    if "teacher" in args:
        zf = head(args["teacher"])
        lsef = jax.nn.logsumexp(zf, axis=-1)
        logpf = (zf - lsef[:, None])[:, None, :]
        pf = jnp.exp(logpf)
        out["teacher_lse"] = lsef
        out["teacher_entropy_bits"] = -jnp.sum(pf * logpf, axis=-1)[:, 0] / _LN2
        out["kl_to_final_bits"] = jnp.maximum(jnp.sum(p * (logp - logpf), -1), 0.0) / _LN2
        out["kl_final_to_layer_bits"] = jnp.maximum(jnp.sum(pf * (logpf - logp), -1), 0.0) / _LN2
    if "gold" in args:
        gold = args["gold"]
        gvalid = (gold >= 0) & (gold < V)
        gc = jnp.clip(gold, 0, V - 1)
        g = _gold_dot(h, jnp.take(Wc, gc, axis=1), precision)
        if "bias" in args:
            g = g + jnp.take(args["bias"], gc).astype(_F32)[:, None]
        g = _softcap(g, softcap)
        if "temp" in args:
            g = g / args["temp"]
        ids = jnp.arange(V)
        greater = (z > g[..., None]) & (ids != gc[:, None, None])
        gv = gvalid[:, None]
        out["gold_rank"] = jnp.where(gv, 1 + jnp.sum(greater, -1), -1).astype(jnp.int32)
        out["gold_prob"] = jnp.where(gv, jnp.exp(g - lse), jnp.nan)
        out["gold_logit"] = jnp.where(gv, g, jnp.nan)
    if top_k:
        tv, ti = lax.top_k(z, top_k)
        out["top_ids"] = ti.astype(jnp.int32)
        out["top_probs"] = jnp.exp(tv - lse[..., None])
    return out


