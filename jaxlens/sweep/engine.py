"""The sweep engine: length buckets, a fixed set of padded shapes, and ONE jitted forward + fused decode
per bucket shape.

* :func:`bucket_lengths` / :func:`plan_window` — a small fixed set of padded lengths (16, 24, 32, 48, ... up
  to the model's context, those dividing ``batch_tokens``); each has one batch size (``batch_tokens //
  length``, a multiple of the data-parallel size); a window's prompts are batched longest first, each batch
  padded to the bucket of its longest prompt, only the last batch partial (dummy rows), so a sweep compiles
  one program per bucket length it meets (:attr:`Engine.compiles`).
* :class:`Engine` — the jitted step: the model's forward (:func:`jaxlens.models.decoder.apply`, whose
  unused all-position logits XLA drops), then at each prompt's last position every requested lens over
  layers 0..n stacked into ONE streaming pass over the vocabulary (:class:`jaxlens.lens.multi.StackedLens`
  through :func:`jaxlens.lens.stream.stream_stats`), the logits at the answer / control / prompt-vocabulary
  ids (:func:`jaxlens.lens.pairwise.gather_logits`) and the cosine to the final logits
  (:func:`jaxlens.lens.stats.cosine_to_final`'s kernel). This is :func:`jaxlens.lens.stats.lens_stats`'s
  ``positions="last"`` path step for step (the same calls in the same order), written so that it traces
  inside one jit: ``lens_stats`` itself converts gold / gather ids with numpy and cannot. The test suite
  checks the two against each other.
* Under a mesh the batch axis is sharded over (data, fsdp), the parameters as loaded
  (``load_model(mesh=...)``), the unembedding is replicated for the decode (rows sharded, no
  communication; blocks of MIN_ROWS sequences per batch shard, strided over the batch so that every device
  keeps its rows), and every output keeps its batch axis sharded, so each process reads back only its rows.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import numpy as np

from jaxlens.errors import JaxlensError

MIN_BUCKET = 16
#: XLA:CPU flag that leaves matrix products to Eigen instead of YNNPACK fusions. YNNPACK picks kernels by the
#: number of rows, so a row's rounding depends on the batch shape; the engine keeps those shapes fixed (same
#: padded tokens per batch, fixed decode blocks), which makes rows identical across batches of one sweep. With
#: Eigen kernels rows are also the same across --batch-tokens settings and equal the probe's bit for bit,
#: at about half the CPU speed (``stable_kernels=True`` / ``--stable-kernels``).
STABLE_KERNELS_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def use_stable_kernels() -> None:
    """Add :data:`STABLE_KERNELS_FLAG` to ``XLA_FLAGS``; must run before JAX starts its backend."""
    import os

    flags = os.environ.get("XLA_FLAGS", "")
    if STABLE_KERNELS_FLAG in flags.split():
        return
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise JaxlensError("stable kernels must be chosen before JAX starts: set XLA_FLAGS="
                           f"'{STABLE_KERNELS_FLAG}' in the environment (or pass stable_kernels=True before any "
                           "other JAX work in this process)")
    os.environ["XLA_FLAGS"] = (flags + " " + STABLE_KERNELS_FLAG).strip()
#: Every GEMM of a step gets at least this many rows (per device): XLA:CPU multiplies matrices of fewer rows
#: with other kernels, whose rounding depends on the row count; from 64 rows on, a row's result is the same
#: whatever the batch (measured for d = 64 .. 1536), which makes the sweep's rows batch-invariant.
MIN_ROWS = 64


def bucket_lengths(max_len: int, buckets: Optional[Sequence[int]] = None, batch_tokens: Optional[int] = None) -> tuple:
    """Padded lengths: ``buckets`` (sorted, capped at max_len), or 16, 24, 32, 48, 64, 96, ... (steps of 2 and
    1.5) up to max_len, keeping only lengths that divide ``batch_tokens`` (or exceed it), so every bucket's batch
    holds the same number of padded tokens."""
    max_len = int(max_len)
    if buckets:
        out = sorted({int(b) for b in buckets if int(b) > 0})
        if not out:
            raise JaxlensError("--buckets needs positive lengths")
        out = [b for b in out if b < max_len] + [min(max_len, out[-1]) if out[-1] <= max_len else max_len]
        return tuple(sorted(set(out)))
    out, L = [], MIN_BUCKET
    while L < max_len:
        for x in (L, L * 3 // 2):
            if x < max_len and (batch_tokens is None or x >= batch_tokens or int(batch_tokens) % x == 0):
                out.append(x)
        L *= 2
    out.append(max_len)
    return tuple(sorted(set(out)))


def batch_size_for(length: int, batch_tokens: int, max_batch: Optional[int], multiple: int) -> int:
    """Prompts per batch of a bucket: batch_tokens // length (at most max_batch), a multiple of ``multiple``
    (the data-parallel size), at least MIN_ROWS padded tokens per device. With power-of-two lengths and
    batch_tokens every bucket up to batch_tokens then has the same number of padded tokens, so the forward's
    matrix products have the same shapes in every batch."""
    b = max(1, int(batch_tokens) // max(1, int(length)))
    if max_batch:
        b = min(b, int(max_batch))
    b = max(b, -(-MIN_ROWS // int(length)) * multiple)
    return max(multiple, (b // multiple) * multiple)


@dataclasses.dataclass
class Job:
    """One prompt ready for the device: its ids, gold ids and the host data its metrics need."""

    row: Any                  # inputs.PromptRow
    ids: list                 # model input ids (BOS policy of the tokenizer)
    ctx_ids: list             # prompt ids without special tokens
    gold: Any                 # probe.gold.GoldAlignment or None (no answer)
    control: Any              # GoldAlignment of control_answer or None
    prompt_vocab: list


@dataclasses.dataclass
class Batch:
    window: int
    length: int               # padded length (bucket)
    size: int                 # global batch size
    jobs: list                # len <= size; the rest of the batch is dummy rows
    ids: np.ndarray           # [size, length] int32
    mask: np.ndarray          # [size, length] int32
    last: np.ndarray          # [size] int32
    gold: np.ndarray          # [size] int32 (-1: none)
    gather: np.ndarray        # [size, length + 2] int32 (-1: none)


def plan_window(window: int, jobs: Sequence[Job], lengths: Sequence[int], batch_of: dict) -> list:
    """Batches of one window: the jobs longest first (ties by input order); each batch takes the next
    batch_of[L] of them, L the bucket of its first (longest) job. Every batch of a bucket has the bucket's one
    shape, and only the window's last batch is partial (filled with dummy rows): a bucket's last, short
    batch is topped up with the longest prompts of the buckets below it, which fit. Since every bucket's batch
    has the same number of padded tokens, where a prompt lands does not change its numbers."""
    order = sorted(jobs, key=lambda j: (-len(j.ids), j.row.index))
    out, i = [], 0
    while i < len(order):
        L = next(b for b in lengths if b >= len(order[i].ids))
        B = batch_of[L]
        out.append(make_batch(window, L, B, order[i:i + B]))
        i += B
    return out


def make_batch(window: int, L: int, B: int, jobs: Sequence[Job], pad_id: int = 0) -> Batch:
    S = L + 2
    ids = np.full((B, L), pad_id, np.int32)
    mask = np.zeros((B, L), np.int32)
    mask[:, 0] = 1                       # dummy rows: one real token, so every row has a last position
    last = np.zeros(B, np.int32)
    gold = np.full(B, -1, np.int32)
    gather = np.full((B, S), -1, np.int32)
    for i, j in enumerate(jobs):
        n = len(j.ids)
        ids[i, :n] = j.ids
        mask[i, :n] = 1
        last[i] = n - 1
        gid = j.gold.first_id if (j.gold is not None and j.gold.ok) else None
        cid = j.control.first_id if (j.control is not None and j.control.ok) else None
        gold[i] = -1 if gid is None else gid
        g = [-1 if gid is None else gid, -1 if cid is None else cid] + list(j.prompt_vocab)
        gather[i, :len(g)] = g
    return Batch(window=window, length=L, size=B, jobs=list(jobs), ids=ids, mask=mask, last=last, gold=gold,
                 gather=gather)


# --------------------------------------------------------------------------------------------------
# lenses as traced arguments


def _is_array(x) -> bool:
    import jax

    return isinstance(x, (np.ndarray, jax.Array))


def split_lens(lens):
    """(arrays, rebuild): a lens object's array fields, to pass into the jit as arguments (not constants)."""
    if isinstance(lens, str) or not dataclasses.is_dataclass(lens):
        return {}, (lambda arrays: lens)
    arrays = {}
    for f in dataclasses.fields(lens):
        v = getattr(lens, f.name)
        if _is_array(v):
            arrays[f.name] = v
        elif isinstance(v, dict) and v and all(_is_array(x) for x in v.values()):
            arrays[f.name] = dict(v)
    if not arrays:
        return {}, (lambda a: lens)

    def rebuild(a):
        return dataclasses.replace(lens, **a)

    import jax

    try:   # a lens whose constructor converts its arrays with numpy cannot be rebuilt from tracers
        jax.eval_shape(lambda a: (rebuild(a), 0)[1], arrays)
    except Exception:  # noqa: BLE001 - then its arrays are compiled in as constants
        return {}, (lambda a: lens)
    return arrays, rebuild


class _View:
    """What :func:`jaxlens.lens.stats.normalise` and the lenses read of a model, over traced parameters."""

    def __init__(self, spec, params):
        self.spec = spec
        self.params = params


# --------------------------------------------------------------------------------------------------
# the jitted step


@dataclasses.dataclass(frozen=True)
class StepConfig:
    n_lenses: int
    top_k: int                # decode top-k (>= the written k; 50 feeds topk_prompt_mass@50)
    positions_all: bool       # records-style decode at every position too
    positions_k: int
    residuals: bool
    token_block: int          # sequences per decode block (every decode GEMM has the same shape)
    min_decode: int           # under a mesh: sequences the last-position decode pads to (MIN_ROWS per device)


def decode_blocks(B: int, cfg: StepConfig, mesh) -> tuple:
    """(pb, nb, Bs): the rows, the final logits and the cosines of the last-position decode are computed in
    nb >= 2 blocks of pb = MIN_ROWS sequences, the streaming pass runs over the first Bs = a multiple (>= 2) of
    the stream's token block; Bs <= pb * nb. Under a mesh: nb >= 1 blocks of pb = min_decode sequences (MIN_ROWS
    per batch shard, each block strided over the batch so that every device keeps its rows), Bs = pb * nb."""
    if mesh is not None:
        nb = max(1, -(-B // cfg.min_decode))
        return cfg.min_decode, nb, cfg.min_decode * nb
    tb = cfg.token_block
    Bs = tb * max(2, -(-B // tb))
    return MIN_ROWS, max(2, -(-Bs // MIN_ROWS)), Bs


def _prep(cfg: StepConfig, spec, rebuilds, mesh, params, lens_arrays, G, W, bias, ids, mask, last, gold, gather):
    """Program A of a step: the forward, every lens's rows at the last position (and at every position with
    ``positions_all``), the logits at the gathered ids, the cosines to the final logits, the final logits.

    The decode side runs in fixed blocks (a ``lax.map`` over MIN_ROWS sequences; the streaming pass over blocks
    of ``token_block``), so its matrix products have the same shapes whatever the batch: a row's numbers do not
    depend on the batch it is in."""
    import jax
    import jax.numpy as jnp

    from jaxlens.lens import pairwise as PW
    from jaxlens.lens import stats as LS
    from jaxlens.lens.multi import StackedLens
    from jaxlens.models import decoder

    n = spec.n_layers
    B = ids.shape[0]
    view = _View(spec, params)
    lenses = [rb(a) for rb, a in zip(rebuilds, lens_arrays)]
    fw = decoder.apply(spec, params, ids, mask)          # fw.logits unused: XLA drops the all-position head
    stacked = StackedLens(view, lenses, np.arange(n + 1))
    layers = stacked.layers
    R = len(layers)
    temp = LS._temperature(stacked, layers)

    def on_batch(x, axis):
        from jax.sharding import NamedSharding, PartitionSpec

        from jaxlens.distributed import batch_sharding

        spec = [None] * x.ndim
        spec[axis] = batch_sharding(mesh, x.shape[axis], 1).spec[0]       # None where the shards do not divide
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))

    def block(res, last_res, gid, want_cos):
        """lens_stats(view, fw, stacked, positions=..., layers=stacked.layers) up to its streaming pass, for
        one block: res [R, b, P, d], last_res [b, P, d], gid [b, S] or None."""
        b, P_ = res.shape[1], res.shape[2]
        if mesh is not None:        # a block's sequences sharded over (data, fsdp), as the batch (also in lax.map)
            res, last_res = on_batch(res, 1), on_batch(last_res, 0)
            gid = None if gid is None else on_batch(gid, 0)
        rows = LS.normalise(view, res, stacked, layers)
        h = jnp.transpose(rows, (1, 2, 0, 3)).reshape(b * P_, R, -1)
        if mesh is not None:
            h = on_batch(h, 0)
        teacher_n = decoder.apply_norm(spec, params["final_norm"], last_res)
        out = {"h": h, "teacher": teacher_n.reshape(b * P_, -1)}
        if gid is not None:
            out["gathered"] = PW.gather_logits(h, W, jnp.repeat(gid, P_, axis=0), bias, spec.final_softcap,
                                               temp).reshape(b, P_, R, -1)
        if want_cos:
            logits = decoder.head(spec, params, teacher_n, W, bias)                              # [b, P, V]
            out["cos_to_final"] = jnp.transpose(LS._cosine(rows, logits, W, bias, G), (1, 2, 0))  # [b, P, R]
            out["final_logits"] = logits
        return out

    def rows_at(res, last_res, gold_rows, gather_ids, want_cos, tb, nb, Bs):
        """res [R, N, P, d], last_res [N, P, d] (N sequences of P positions): every block of tb sequences
        (Bp = tb * nb >= N; the extra sequences are zero rows); the streaming pass gets the first Bs sequences."""
        N, P_ = res.shape[1], res.shape[2]
        Bp = tb * nb
        if Bp > N:
            res = jnp.pad(res, ((0, 0), (0, Bp - N), (0, 0), (0, 0)))
            last_res = jnp.pad(last_res, ((0, Bp - N), (0, 0), (0, 0)))
            gold_rows = jnp.pad(gold_rows, (0, (Bp - N) * P_), constant_values=-1)
            if gather_ids is not None:
                gather_ids = jnp.pad(gather_ids, ((0, Bp - N), (0, 0)), constant_values=-1)
        if nb == 1 and mesh is None:
            out = block(res, last_res, gather_ids, want_cos)
        elif mesh is None:          # block k = sequences k*tb .. (k+1)*tb - 1
            xs = (jnp.moveaxis(res.reshape((R, nb, tb) + res.shape[2:]), 1, 0),
                  last_res.reshape((nb, tb) + last_res.shape[1:]),
                  None if gather_ids is None else gather_ids.reshape(nb, tb, -1))
            ys = jax.lax.map(lambda x: block(x[0], x[1], x[2], want_cos), xs)
            out = {k: v.reshape((v.shape[0] * v.shape[1],) + v.shape[2:]) for k, v in ys.items()}
        else:                       # block k = sequences t*nb + k: each device's rows stay on it (its t range)
            xs = (jnp.moveaxis(res.reshape((R, tb, nb) + res.shape[2:]), 2, 0),
                  jnp.moveaxis(last_res.reshape((tb, nb) + last_res.shape[1:]), 1, 0),
                  None if gather_ids is None else jnp.moveaxis(gather_ids.reshape(tb, nb, -1), 1, 0))
            ys = jax.lax.map(lambda x: block(x[0], x[1], x[2], want_cos), xs)
            out = {k: jnp.moveaxis(v, 0, 1).reshape((v.shape[0] * v.shape[1],) + v.shape[2:]) for k, v in ys.items()}
        h = out.pop("h")
        dec = {"h": h[:Bs * P_], "teacher": out.pop("teacher")[:Bs * P_], "gold": gold_rows[:Bs * P_]}
        if temp is not None:
            dec["temp"] = jnp.broadcast_to(jnp.asarray(temp, jnp.float32), (Bs * P_, R))
        if want_cos:
            out["rows"] = h.reshape(Bp, P_, R, -1)
        return dec, {k: v[:N] for k, v in out.items()}

    lastpos = last[:, None]
    res = jnp.take_along_axis(fw.residuals, lastpos[None, :, :, None], axis=2)[layers]            # [R, B, 1, d]
    last_res = jnp.take_along_axis(fw.residuals[n], lastpos[:, :, None], axis=1)                 # [B, 1, d]
    dec, host = rows_at(res, last_res, gold, gather, True, *decode_blocks(B, cfg, mesh))
    host = {k: v[:, 0] for k, v in host.items()}       # [B, R, ...], final_logits [B, V]
    idc = jnp.clip(gather, 0, W.shape[1] - 1)
    host["Wg"] = jnp.moveaxis(jnp.take(W, idc, axis=1), 0, -1)                                # [B, S, d]
    if cfg.residuals:
        host["residuals"] = jnp.moveaxis(jnp.take_along_axis(fw.residuals, lastpos[None, :, :, None], axis=2)[:, :, 0],
                                         0, 1)                                                 # [B, n+1, d]
    decs = {"last": dec}
    if cfg.positions_all:
        # every (sequence, position) pair a row of its own (sequence-major, as _decode reshapes them back),
        # decoded in blocks of MIN_ROWS rows like the last position: the lens translators' products then have
        # the same shape whatever the bucket length (blocks of one sequence of L positions made a prompt's
        # rows depend on its bucket wherever XLA:CPU picks kernels by row count, e.g. d = 576 at L <= 32)
        N = B * ids.shape[1]
        res_all = fw.residuals[layers].reshape(R, N, 1, -1)                                    # [R, B*T, 1, d]
        last_all = fw.residuals[n].reshape(N, 1, -1)
        blocks = (N, 1, N) if mesh is not None else (MIN_ROWS, -(-N // MIN_ROWS), N)
        decs["all"], _ = rows_at(res_all, last_all, jnp.repeat(gold, ids.shape[1]), None, False, *blocks)
    return decs, host


_JITS: dict = {}     # one jitted step per (config, model spec, lenses, mesh) in a process (reused by later sweeps)


class Engine:
    """Compiled sweep steps for one model and lens set; ``compiles`` counts the programs built."""

    def __init__(self, model, lenses: Sequence, *, top_k: int, positions_all: bool = False, positions_k: int = 5,
                 residuals: bool = False, mesh=None):
        import jax
        import jax.numpy as jnp

        from jaxlens.lens import stats as LS

        self.model = model
        self.mesh = mesh
        self.lenses = list(lenses)
        from jaxlens.lens import stream

        shards = 1 if mesh is None else int(mesh.shape["data"]) * int(mesh.shape["fsdp"])
        n_rows = len(self.lenses) * (model.spec.n_layers + 1) + 1           # + the teacher row the stream adds
        chunk, block_elems = stream._default_sizes(mesh)
        C = min(chunk, model.spec.vocab_size)
        tb = max(-(-MIN_ROWS // n_rows), stream._auto_token_block(1 << 30, n_rows, C, block_elems))
        self.cfg = StepConfig(n_lenses=len(self.lenses), top_k=int(top_k), positions_all=bool(positions_all),
                              positions_k=int(positions_k), residuals=bool(residuals), token_block=int(tb),
                              min_decode=MIN_ROWS * shards)
        split = [split_lens(lz) for lz in self.lenses]
        for lz, (arrs, _) in zip(self.lenses, split):
            if not arrs and hasattr(lz, "place"):     # compiled in as constants: let it cache its device arrays now,
                lz.place()                            # outside any trace (PrismLens)
        rep = None
        rebuilds = tuple(s[1] for s in split)
        arrays = [s[0] for s in split]
        W, bias = model.unembedding()
        G = LS._gram(model, W)
        if mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec as P

            rep = NamedSharding(mesh, P())
            arrays = jax.tree.map(lambda a: jax.device_put(np.asarray(a) if not isinstance(a, jax.Array) else a, rep),
                                  arrays)
            G = jax.device_put(G, rep)
        else:
            arrays = jax.tree.map(jnp.asarray, arrays)
        if mesh is not None:      # the decode replicates the unembedding: rows sharded, no communication
            W = jax.device_put(W, rep)
            bias = None if bias is None else jax.device_put(bias, rep)
        self._W, self._bias = W, bias
        self._lens_arrays = tuple(arrays)
        self._G = G
        key = (self.cfg, model.spec, tuple(x if isinstance(x, str) else id(x) for x in self.lenses), id(mesh))
        hit = _JITS.get(key)
        if hit is None:
            hit = _JITS[key] = (jax.jit(functools.partial(_prep, self.cfg, model.spec, rebuilds, mesh)),
                                tuple(self.lenses), mesh)       # the lens objects stay alive with their entry
            while len(_JITS) > 32:
                _JITS.pop(next(iter(_JITS)))
        self._fn = hit[0]
        self._shapes: set = set()

    @property
    def compiles(self) -> int:
        return len(self._shapes)

    def _sharding(self, B, ndim):
        from jaxlens.distributed import batch_sharding

        return batch_sharding(self.mesh, B, ndim)

    def rows_of(self, B: int) -> tuple:
        """(fed, owned): the rows of a global batch of B this process feeds, and those it writes."""
        if self.mesh is None:
            return (0, B), (0, B)
        from jaxlens import distributed as DI

        sh = self._sharding(B, 1)
        return DI.local_rows(sh, B), DI.owned_rows(sh, B)

    def stream_rows(self, B: int, n_real: int) -> int:
        """Sequences the streaming pass decodes for a batch of B with n_real real prompts: the smallest of the
        full decode size and its halves, quarters, eighths (multiples of the token block, >= 2 blocks) that
        holds them — a partial batch does not decode its dummy rows, and the pass's per-row numbers do not
        depend on how many blocks it runs."""
        pb, nb, Bs = decode_blocks(B, self.cfg, self.mesh)
        if self.mesh is not None:
            return Bs
        tb = self.cfg.token_block
        for f in (8, 4, 2):
            b = tb * max(2, -(-(Bs // f) // tb))
            if n_real <= b < Bs:
                return b
        return Bs

    def run(self, batch: Batch) -> dict:
        """Dispatch one batch (asynchronously); returns the global output arrays."""
        import jax.numpy as jnp

        B, L = batch.ids.shape
        self._shapes.add((B, L))
        arrs = (batch.ids, batch.mask, batch.last, batch.gold, batch.gather)
        if self.mesh is None:
            args = tuple(jnp.asarray(a) for a in arrs)
        else:
            from jaxlens import distributed as DI

            (lo, hi), _ = self.rows_of(B)
            args = tuple(DI.global_batch(a[lo:hi], self._sharding(B, a.ndim), a.shape) for a in arrs)
        decs, host = self._fn(self.model.params, self._lens_arrays, self._G, self._W, self._bias, *args)
        return self._decode(decs, host, B, max(1, len(batch.jobs)))

    def _decode(self, decs: dict, host: dict, B: int, n_real: int) -> dict:
        """Program B of a step: the vocabulary streaming pass of every row, as lens_stats runs it (its own jit)."""
        from jaxlens.lens import stream

        spec = self.model.spec
        out = dict(host)
        Bs = self.stream_rows(B, n_real)
        if Bs < decs["last"]["h"].shape[0]:
            decs = dict(decs, last={k: v[:Bs] for k, v in decs["last"].items()})
        for kind, d in decs.items():
            k = self.cfg.top_k if kind == "last" else self.cfg.positions_k
            T = d["h"].shape[0]
            tbl = self.cfg.token_block if (kind == "last" and self.mesh is None) else None
            st = stream.stream_stats(d["h"], self._W, bias=self._bias, softcap=spec.final_softcap,
                                     temperature=d.get("temp"), teacher_h=d["teacher"], gold=d["gold"], top_k=int(k),
                                     chunk=stream.DEFAULT_CHUNK, token_block=tbl)
            for name, v in st.items():
                if name.startswith("teacher_"):
                    continue
                if kind == "last":
                    out[name] = v[:B]                                                          # [B, R, ...]
                else:
                    T = v.shape[0] // B
                    out["pos_" + name] = v.reshape((B, T) + v.shape[1:])                       # [B, T, R, ...]
        return out

    def fetch(self, out: dict, lo: int, hi: int) -> dict:
        """This process's rows lo..hi of a step's outputs, as numpy."""
        from jaxlens import distributed as DI

        return {k: DI.host_rows(v, lo, hi) for k, v in out.items()}
