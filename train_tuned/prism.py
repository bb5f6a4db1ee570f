"""Fitting a Prism (spec/probe.md §4.1): ``jaxlens fit-prism --model SOURCE --out DIR``.

The recipe (both modes):

1. **Depths**: the embedding stream and the outputs of blocks ⌊n/4⌋-1, ⌊n/2⌋-1, ⌊3n/4⌋-1, i.e. jaxlens
   layers 0, ⌊n/4⌋, ⌊n/2⌋, ⌊3n/4⌋ (the reference records them as ``["embed", ⌊n/4⌋-1, ...]``); ``--layers``
   overrides them (jaxlens layer numbers 0..n).
2. **Rows**: one d-vector per (token position, depth), in stream order (sequence, position, depth). The
   budget N (``--tokens``; the reference calls rows "tokens") and the reservoir R follow the model size:
   <= 14B parameters 100,000 / 20,000, <= 34B 130,000 / 25,000, else 160,000 / 30,000.
3. **Moments**: per-feature count / mean / M2 of every row, per sequence on the device (fp32, two-pass), merged
   across sequences and batches on the host in float64 (Chan et al.'s parallel Welford update);
   var = max(M2 / N, 1e-8), eps = 1e-8.
4. **Reservoir**: Algorithm R with Python's ``random.Random(316)`` over the stream indices (append while
   fewer than R, else j = randint(0, i) for the i-th row (0-based) and replace slot j if j < R). The
   decisions depend only on the indices, so the final owner of every slot is computed first and only
   those rows ever leave the device; the result is the sequential reservoir's, row for row.
5. **PCA basis**: X_w = (X - mean) / sqrt(var + eps) over the reservoir, centred; E_k = the top-k
   eigenvectors of X_wᵀ X_w (= the top-k right singular vectors of X_w, exactly; the reference uses a
   randomised ``pca_lowrank``), QR-orthonormalised; k = min(512, d) (and <= R).
6. **Unembedding basis**: U_k = the top-k eigenvectors of W_U W_Uᵀ (d x d, accumulated over the vocabulary;
   nothing of size V x V is built), QR-orthonormalised.
7. **Signs** (arbitrary in both eigenproblems; the reference keeps LAPACK's): each E_k column has its
   largest-magnitude entry positive, each U_k column points the same way as its paired PCA direction
   (u_i . e_i >= 0).
8. **Procrustes**: M = U_k E_kᵀ, SVD M = U S Vᵀ, Q_col = U Vᵀ (so Q_col e_i = u_i, column convention); for
   k < d the map between the complements, which M leaves open, is the one closest to the identity
   (:func:`procrustes`); if ||Q_colᵀ Q_col - I||_F > 1e-3 (or not finite) Q_col is replaced by the Q factor of
   its QR. The saved ``orthogonality_error`` is that norm for the saved fp32 matrix.

What differs (Q6, spec Appendix A; the jaxlens default fixes all three, ``--reference-quirks`` restores them):

=====================  =====================================================  =================================
                       jaxlens (default)                                      reference (``--reference-quirks``)
=====================  =====================================================  =================================
rows                   every position of a real data stream (``--data``: the  the last position of 10 fixed
                       train-lens sources, or the demo corpus for the demo)   prompts (or ``--data`` lines),
                                                                              cycled until the budget
statistics on          the normalised residuals N_l(h) the decoder whitens    the raw residuals h
saved Q                Q_colᵀ: the matrix the decoder right-multiplies,       Q_col, right-multiplied (i.e. the
                       logits = x_w . Q . W_U maps e_i to u_i                 transpose of the fitted map)
=====================  =====================================================  =================================

In reference mode the P prompts are forwarded once: the model is deterministic, so the cycled stream is the
same P x depths rows repeated (the reference runs one forward per cycled prompt, 25,000 for 100,000 rows).

Cost and resumability: the fit reads N / depths token positions (25,000 by default) in batched forwards,
data-parallel over the mesh's (data, fsdp) axes, then solves three d x d eigen / SVD problems in float64 on
the host. That is seconds to minutes even for a 14B model, so the fit is not resumable: rerun it.

Sharded / multi-host (``mesh=`` / ``--mesh``, ``--coordinator`` ...; :mod:`jaxlens.distributed`): the model is
loaded sharded, the batch (rounded up to a multiple of the data x fsdp shards; the stream order, and so every
row's index, does not depend on the batch size) is split over (data, fsdp), and each process feeds the
sequences its devices hold. The per-sequence moments and the batch's reservoir picks come back replicated, so
every process merges the same numbers in the same order: counts, means, M2, the reservoir (its slots are fixed
by the row indices alone) and both Grams equal a one-process run's up to fp32 rounding of the sharded forward,
whatever the number of processes. Every process returns the same fit; only process 0 writes ``out``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import re
import sys
import tempfile
import time
import types
from datetime import datetime, timezone
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.errors import JaxlensError

SEED = 316
K_MAX = 512
VAR_FLOOR = 1e-8
EPS = 1e-8
ORTH_TOL = 1e-3
DEFAULT_SEQ_LEN = 512
#: the reference's default prompt pool (spec §4.1), cycled in this order
DEFAULT_PROMPTS = (
    "The capital of Germany is", "The capital of France is", "The capital of Italy is", "The capital of Spain is",
    "The largest ocean is", "2 + 2 =", "Complete the sentence: The sky is", "Name a prime number after 10:",
    "Compute 3 * 7 =", "Python is a",
)
F32 = jnp.float32
_HI = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------------
# the recipe's pieces (pure functions; tests/test_prism.py checks them against NumPy)


def sample_layers(n_layers: int) -> list:
    """jaxlens layers of the reference's depths: 0 (embeddings) and the outputs of blocks ⌊n/4⌋-1, ⌊n/2⌋-1,
    ⌊3n/4⌋-1 (jaxlens layer = block + 1), without duplicates (small n)."""
    n = int(n_layers)
    out = [0]
    for b in (n // 4 - 1, n // 2 - 1, (3 * n) // 4 - 1):
        layer = b + 1 if b >= 0 else 0
        if layer not in out:
            out.append(layer)
    return out


def reference_layer_names(layers: Sequence[int]) -> list:
    """The reference's ``layers`` record: "embed" for layer 0, else the block index (layer - 1)."""
    return ["embed" if int(x) == 0 else int(x) - 1 for x in layers]


def parse_layers(text, n_layers: int) -> list:
    """``--layers`` "0,10,20" (jaxlens layers; "embed" = 0) -> sorted unique ints in 0..n."""
    if text is None:
        return sample_layers(n_layers)
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for it in items:
        s = str(it).strip()
        if not s:
            continue
        if s == "embed":
            v = 0
        else:
            try:
                v = int(s)
            except ValueError:
                raise JaxlensError(f"--layers: {s!r} is not a layer number (0..{n_layers} or 'embed')") from None
        if not 0 <= v <= n_layers:
            raise JaxlensError(f"--layers: layer {v} is outside 0..{n_layers}")
        if v not in out:
            out.append(v)
    if not out:
        raise JaxlensError("--layers needs at least one layer")
    return sorted(out)


def parameter_count(model) -> float:
    """The reference's size estimate: a "<N>B" in the model name, else the real parameter count."""
    m = re.search(r"(\d+(?:\.\d+)?)[bB](?![a-zA-Z])", model.name)
    if m:
        return float(m.group(1)) * 1e9
    return float(sum(int(np.prod(a.shape)) for a in jax.tree.leaves(model.params)))


def budgets(n_params: float) -> tuple:
    """(rows, reservoir) by model size (spec §4.1)."""
    if n_params <= 14e9:
        return 100_000, 20_000
    if n_params <= 34e9:
        return 130_000, 25_000
    return 160_000, 30_000


def reservoir_owners(n_rows: int, capacity: int, seed: int = SEED) -> np.ndarray:
    """Final stream index held by each reservoir slot after Algorithm R over ``n_rows`` rows (0-based
    indices; ``random.Random(seed)``; slots 0..min(n_rows, capacity)-1)."""
    rng = random.Random(seed)
    size = min(int(n_rows), int(capacity))
    owners = np.arange(size, dtype=np.int64)
    for i in range(size, int(n_rows)):
        j = rng.randint(0, i)
        if j < capacity:
            owners[j] = i
    return owners


class Moments:
    """Per-feature count / mean / M2 in float64, merged with Chan et al.'s parallel update."""

    def __init__(self, d: int):
        self.count = 0
        self.mean = np.zeros(d, np.float64)
        self.m2 = np.zeros(d, np.float64)

    def merge(self, count, mean, m2) -> None:
        nb = float(count)
        if nb <= 0:
            return
        na = float(self.count)
        n = na + nb
        delta = np.asarray(mean, np.float64) - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + np.asarray(m2, np.float64) + delta * delta * (na * nb / n)
        self.count = int(round(n))

    @property
    def var(self) -> np.ndarray:
        return np.maximum(self.m2 / max(self.count, 1), VAR_FLOOR)


def orient_columns(E: np.ndarray) -> np.ndarray:
    """Flip each column so that its largest-magnitude entry is positive (deterministic eigenvector signs)."""
    idx = np.argmax(np.abs(E), axis=0)
    s = np.sign(E[idx, np.arange(E.shape[1])])
    s[s == 0] = 1.0
    return E * s


def _top_eigvecs(G: np.ndarray, k: int) -> tuple:
    w, V = np.linalg.eigh(np.asarray(G, np.float64))
    order = np.argsort(w)[::-1][:k]
    Q, _ = np.linalg.qr(V[:, order])
    return Q, w[order]


def pca_basis(X: np.ndarray, mean, var, eps: float, k: int, gram: Callable | None = None) -> tuple:
    """E_k [d, k] (orthonormal, oriented) and the singular values [k] of the centred whitened rows X [R, d].

    ``gram``: optional function X_c -> X_cᵀ X_c (the fit passes a device one); default NumPy float64."""
    Xw = (np.asarray(X, np.float64) - np.asarray(mean, np.float64)) / np.sqrt(np.asarray(var, np.float64) + eps)
    Xc = Xw - Xw.mean(axis=0, keepdims=True)
    G = Xc.T @ Xc if gram is None else np.asarray(gram(Xc), np.float64)
    E, w = _top_eigvecs(G, k)
    return orient_columns(E), np.sqrt(np.maximum(w, 0.0))


def unembed_basis(G: np.ndarray, k: int, pair_with: np.ndarray | None = None) -> tuple:
    """U_k [d, k] (top-k eigenvectors of G = W_U W_Uᵀ, descending, QR-orthonormalised) and the eigenvalues.
    With ``pair_with`` (E_k), each column is signed to point the same way as its paired PCA direction."""
    U, w = _top_eigvecs(G, k)
    if pair_with is not None:
        s = np.sign(np.sum(U * pair_with, axis=0))
        s[s == 0] = 1.0
        U = U * s
    else:
        U = orient_columns(U)
    return U, w


def procrustes(U_k: np.ndarray, E_k: np.ndarray) -> tuple:
    """Q_col = U Vᵀ from the SVD of M = U_k E_kᵀ (Q_col e_i = u_i), with the QR fallback; (Q_col, error, used_qr).

    For k < d, M has d - k zero singular values and any orthogonal map from span(E_k)⊥ onto span(U_k)⊥
    completes an optimal Q (an SVD picks one at random, numerically). jaxlens takes the completion closest to
    the identity, the polar factor of C = (I - U_k U_kᵀ)(I - E_k E_kᵀ), by decomposing M + C instead of M; C
    maps span(E_k)⊥ into span(U_k)⊥ and vanishes on span(E_k), so the polar factor of M + C is U_k E_kᵀ plus
    that completion. For k = d, C = 0 and this is the plain SVD of M. The fit is then a continuous,
    deterministic function of its inputs (the same on one device or a mesh)."""
    U = np.asarray(U_k, np.float64)
    E = np.asarray(E_k, np.float64)
    eye = np.eye(U.shape[0])
    M = U @ E.T
    C = (eye - U @ U.T) @ (eye - E @ E.T)
    Uu, _, Vt = np.linalg.svd(M + C)
    Q, used_qr = qr_fallback(Uu @ Vt)
    return Q, orthogonality_error(Q), used_qr


def qr_fallback(Q: np.ndarray, tol: float = ORTH_TOL) -> tuple:
    """(Q, False) if ||QᵀQ - I||_F <= tol, else (the Q factor of Q's QR decomposition, True) (spec §4.1)."""
    err = orthogonality_error(Q)
    if np.isfinite(err) and err <= tol:
        return Q, False
    q, _ = np.linalg.qr(np.nan_to_num(np.asarray(Q, np.float64)))
    return q, True


def orthogonality_error(Q) -> float:
    Q = np.asarray(Q, np.float64)
    return float(np.linalg.norm(Q.T @ Q - np.eye(Q.shape[0])))


# --------------------------------------------------------------------------------------------------
# the row stream on the device


def _stats_fn(spec, layers: tuple, normalised: bool, mesh=None):
    """jit (params, ids [B, T], gather [G], limit) -> per-sequence (count [B], mean [B, d], M2 [B, d]) and the
    gathered rows [G, d] (fp32) of the (sequence, position, depth)-ordered rows whose flat index < limit.

    Under a mesh the outputs are replicated: every process reads the whole batch's statistics and picks back
    and merges them in the same order, so every process ends with the same fit (and the same as one)."""
    from jaxlens.lens.stats import normalise
    from jaxlens.models import decoder

    layer_idx = np.asarray(layers, np.int64)
    D = len(layers)

    def fn(params, ids, gather, limit):
        fw = decoder.apply(spec, params, ids)
        res = fw.residuals[layer_idx]                                             # [D, B, T, d]
        if normalised:
            shim = types.SimpleNamespace(spec=spec, params=params)
            res = normalise(shim, res, "norm", layer_idx)
        rows = jnp.transpose(res.astype(F32), (1, 2, 0, 3))                       # [B, T, D, d]
        B, T = ids.shape
        flat = jnp.arange(B * T * D, dtype=jnp.int32).reshape(B, T, D)
        valid = (flat < limit)[..., None]
        cnt = jnp.sum(valid, axis=(1, 2, 3)).astype(F32)                          # [B]
        mean = jnp.sum(jnp.where(valid, rows, 0.0), axis=(1, 2)) / jnp.maximum(cnt, 1.0)[:, None]
        dev = jnp.where(valid, rows - mean[:, None, None, :], 0.0)
        m2 = jnp.sum(dev * dev, axis=(1, 2))
        picked = jnp.take(rows.reshape(B * T * D, -1), gather, axis=0)
        return cnt, mean, m2, picked

    return jax.jit(fn, **_replicated_out(mesh))


def _replicated_out(mesh) -> dict:
    """jit keyword arguments making every output replicated over ``mesh`` (nothing without a mesh)."""
    if mesh is None:
        return {}
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    return {"out_shardings": NamedSharding(mesh, P())}


def _grams(mesh):
    """A device function X -> Xᵀ X (fp32, full precision)."""
    @jax.jit
    def g(X):
        X = X.astype(F32)
        return jax.lax.dot_general(X, X, (((0,), (0,)), ((), ())), precision=_HI, preferred_element_type=F32)

    return lambda X: np.asarray(g(jnp.asarray(np.asarray(X, np.float32))), np.float64)


# --------------------------------------------------------------------------------------------------
# the fit


@dataclasses.dataclass
class PrismFit:
    """What :func:`fit_prism` returns: the lens (also written to ``out``), its provenance and the timings."""

    prism: object
    out: str | None
    provenance: dict
    timings: dict
    #: with ``keep_stats=True``: the accumulated statistics (count, mean, m2, reservoir_index, reservoir_rows,
    #: gram_reservoir = the centred whitened reservoir's Gram, gram_unembed = W_U W_Uᵀ), for checks
    stats: dict | None = None


def _demo_corpus(tmpdir: str, n_docs: int) -> tuple:
    from jaxlens.demo.corpus import generate, text_sha256

    docs = generate(seed=3, n_docs=n_docs)
    path = os.path.join(tmpdir, "demo_corpus_seed3.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join(docs))
    return path, {"generator": f"jaxlens.demo.corpus.generate(seed=3, n_docs={n_docs})",
                  "text_sha256": text_sha256(docs)}


def _read_prompts(path: str) -> list:
    if not os.path.isfile(path):
        raise JaxlensError(f"prompt file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f.read().splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise JaxlensError(f"{path} contains no prompts (one per line)")
    return lines


def fit_prism(model_source, out: str | None, *, data: str | None = None, k: int | None = None, layers=None,
              tokens: int | None = None, reservoir: int | None = None, reference_quirks: bool = False,
              seq_len: int | None = None, batch_seqs: int | None = None, mesh=None, dtype: str = "float32",
              text_field: str = "text", force: bool = False, progress: bool = True,
              log: Callable[[str], None] | None = None, keep_stats: bool = False) -> PrismFit:
    """Fit a Prism (module docstring) and write it into ``out`` (both formats; None = do not write).

    ``model_source``: a source string or a loaded Model. ``data``: fixed recipe: a text / .jsonl file or
    ``hf:NAME[:CONFIG][@SPLIT]`` (default for the demo model: the generated demo corpus); reference recipe: a
    prompt file (one per line; default the reference's 10 prompts). ``tokens`` / ``reservoir``: the row budget
    and reservoir size (default by model size). ``mesh``: a mesh or "data=N,fsdp=N,tensor=N"
    (:func:`jaxlens.distributed.mesh_from_spec`): the model sharded as loaded, the sequences of each batch over
    (data, fsdp). Under ``jax.distributed`` (:func:`jaxlens.distributed.initialize` first) every process feeds
    its devices' sequences, every process returns the same fit, and only process 0 writes ``out``.
    ``keep_stats``: also return the accumulated statistics (:attr:`PrismFit.stats`)."""
    from jaxlens import distributed as DI
    from jaxlens.lens.prism import PrismLens, find_format, save_prism
    from jaxlens.models.loader import load_model

    lead = DI.info().is_coordinator
    if not lead:
        log, progress = (lambda msg: None), False
    say = log or (lambda msg: print(f"[jaxlens] {msg}", file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    if mesh is not None and not hasattr(mesh, "shape"):
        mesh = DI.mesh_from_spec(mesh)
    taken = out is not None and not force and os.path.isdir(out) and bool(find_format(out))
    if jax.process_count() > 1:                    # process 0, the writer, decides (its file system may differ)
        taken = DI.allgather_bytes(b"1" if taken else b"0")[0] == b"1"
    if taken:
        raise JaxlensError(f"{out} already holds a Prism; pass --force to replace it, or use a new --out")
    if isinstance(model_source, str):
        model = load_model(model_source, dtype=dtype, mesh=mesh)
    else:
        model = model_source
        if mesh is None:
            mesh = getattr(model, "mesh", None)
        elif getattr(model, "mesh", None) is None or model.mesh != mesh:
            raise JaxlensError("a loaded model fitted on a mesh must have been loaded with that mesh "
                               "(load_model(..., mesh=...)); or pass its source instead")
    spec = model.spec
    n, d, V = spec.n_layers, spec.d_model, spec.vocab_size
    lay = parse_layers(layers, n)
    D = len(lay)
    n_params = parameter_count(model)
    rows_default, res_default = budgets(n_params)
    N = int(tokens) if tokens is not None else rows_default
    R = int(reservoir) if reservoir is not None else res_default
    if N < 1 or R < 1:
        raise JaxlensError("--tokens and --reservoir must be positive")
    k_req = int(k) if k is not None else min(K_MAX, d)
    if not 1 <= k_req <= d:
        raise JaxlensError(f"--k must lie in 1..{d} (d_model); got {k_req}")
    tok = model.tokenizer
    moments = Moments(d)
    recipe = "reference" if reference_quirks else "jaxlens"
    t0 = time.perf_counter()
    data_desc: dict
    positions_seen = 0
    if reference_quirks:
        from jaxlens.models.loader import pad_batch
        from jaxlens.probe.gold import model_input_ids

        prompts = list(DEFAULT_PROMPTS) if data is None else _read_prompts(data)
        seqs = [model_input_ids(tok, p) for p in prompts]
        if any(len(s) == 0 for s in seqs):
            raise JaxlensError("a Prism prompt tokenises to nothing")
        ids, mask = pad_batch(seqs)
        fw = model.forward(ids, mask)
        last = mask.sum(1) - 1
        pick = jax.jit(lambda r: r[np.asarray(lay)][:, np.arange(len(seqs)), last].astype(F32),
                       **_replicated_out(mesh))
        res = np.asarray(pick(fw.residuals), np.float32)                        # [D, P, d]
        base = np.transpose(res, (1, 0, 2)).reshape(len(seqs) * D, d)            # stream order: prompt, depth
        N = int(math.ceil(N / D) * D)                                            # whole prompts, as the reference
        cycle = base.shape[0]
        # the batched Welford merge, one cycle of the prompt pool at a time
        done = 0
        bar = _bar(progress, N)
        while done < N:
            take = min(cycle, N - done)
            chunk = base[:take].astype(np.float64)
            mu = chunk.mean(0)
            moments.merge(take, mu, ((chunk - mu) ** 2).sum(0))
            done += take
            if bar is not None:
                bar.update(take)
        if bar is not None:
            bar.close()
        owners = reservoir_owners(N, R)
        X = base[owners % cycle]
        positions_seen = N // D
        data_desc = {"kind": "prompts", "prompts": prompts, "source": data or "reference default (10 prompts)",
                     "position": "last", "cycled": True, "distinct_rows": cycle}
        seconds_stream = time.perf_counter() - t0
        stream_rows_per_s = None
    else:
        from train_tuned import data as data_mod

        tmp = None
        extra_desc = {}
        try:
            if data is None:
                if model.name != "demo":
                    raise JaxlensError("fit-prism needs --data (a text / .jsonl file or hf:NAME[:CONFIG][@SPLIT]) for "
                                       "the fixed recipe; --reference-quirks uses the reference's 10 prompts instead")
                tmp = tempfile.TemporaryDirectory(prefix="jaxlens-prism-")
                data, extra_desc = _demo_corpus(tmp.name, n_docs=4000)
            T = int(seq_len) if seq_len else min(DEFAULT_SEQ_LEN, int(spec.max_positions or DEFAULT_SEQ_LEN))
            tok_max = getattr(tok, "model_max_length", None)
            if tok_max and tok_max < 10**8:
                T = min(T, int(tok_max))
            src = data_mod.open_source(data, tok, T, join_eos=True, seed=SEED, shuffle=True, text_field=text_field,
                                       vocab_size=V)
            ndev = 1 if mesh is None else int(mesh.shape["data"] * mesh.shape["fsdp"])
            B = int(batch_seqs) if batch_seqs else max(1, 4096 // T)
            B = int(math.ceil(B / ndev) * ndev)           # the stream order does not depend on B (docstring)
            if mesh is not None:
                sharding = DI.batch_sharding(mesh, B, 2)
                feed = DI.local_rows(sharding, B)          # the sequences of a batch this process's devices hold
                DI.agree(f"{getattr(src, 'sha256', None)} {src.describe().get('kind')} {N} {R} {lay} {k_req} {T} {B}",
                         "the Prism fit's data, budgets and batch")
            per_batch = B * T * D
            n_batches = int(math.ceil(N / per_batch))
            owners = reservoir_owners(N, R)
            slot_of = {int(i): s for s, i in enumerate(owners)}
            order = np.sort(owners)
            G = int(min(len(owners), per_batch))
            fn = _stats_fn(spec, tuple(lay), True, mesh)
            X = np.zeros((len(owners), d), np.float32)
            params = model.params
            bar = _bar(progress, N)
            first_s = None
            t_steady = None
            say(f"Prism fit on {model.name}: {N} rows (= {int(math.ceil(N / D))} positions x {D} depths, layers "
                f"{lay}), reservoir {R}, k {min(k_req, R)}; {n_batches} batches of {B} x {T} tokens, {ndev} device(s)")
            for bi in range(n_batches):
                tb = time.perf_counter()
                start = bi * per_batch
                limit = min(per_batch, N - start)
                lo, hi = np.searchsorted(order, [start, start + limit])
                mine = order[lo:hi] - start
                gidx = np.zeros(G, np.int32)
                gidx[:len(mine)] = mine
                if mesh is None:
                    ids = jnp.asarray(src.batch(bi * B, B), jnp.int32)
                else:
                    lo_r, hi_r = feed
                    ids = DI.global_batch(np.asarray(src.batch(bi * B + lo_r, hi_r - lo_r), np.int32), sharding,
                                          (B, T))
                cnt, mu, m2, picked = jax.device_get(fn(params, ids, gidx, np.int32(limit)))
                for b in range(B):
                    moments.merge(cnt[b], mu[b], m2[b])
                for j, rel in enumerate(mine):
                    X[slot_of[int(rel) + start]] = picked[j]
                if bar is not None:
                    bar.update(limit)
                if first_s is None:
                    first_s = time.perf_counter() - tb
                    t_steady = time.perf_counter()
            if bar is not None:
                bar.close()
            positions_seen = int(math.ceil(N / D))
            steady_rows = N - min(N, per_batch)
            steady_s = time.perf_counter() - t_steady if t_steady is not None else 0.0
            stream_rows_per_s = (steady_rows / steady_s) if (steady_rows and steady_s > 0) else None
            data_desc = dict(src.describe(), **extra_desc, position="every position", sequences=n_batches * B,
                             epochs=(n_batches * B / src.n_sequences) if hasattr(src, "n_sequences") else None)
            if data_desc.get("path") and tmp is not None:
                data_desc["path"] = os.path.basename(data_desc["path"])
        finally:
            if tmp is not None:
                tmp.cleanup()
        seconds_stream = time.perf_counter() - t0
    if moments.count != N:
        raise JaxlensError(f"internal error: {moments.count} rows were accumulated for a budget of {N}")
    mean, var = moments.mean, moments.var
    # ---- bases and Procrustes --------------------------------------------------------------------------
    t1 = time.perf_counter()
    kk = int(min(k_req, X.shape[0], d))
    gram = _grams(mesh)
    grams = {}
    if keep_stats:
        def gram(Xc, _g=gram):
            grams["reservoir"] = _g(Xc)
            return grams["reservoir"]
    E, sv = pca_basis(X, mean, var, EPS, kk, gram=gram)
    from jaxlens.lens.pairwise import gram as w_gram

    W = model.unembedding()[0]
    G_u = np.asarray(jax.jit(lambda w: w_gram(w.astype(F32)), **_replicated_out(mesh))(W),
                     np.float64)                                                  # [d, d], never V x V
    U, eig = unembed_basis(G_u, kk, pair_with=E)
    Q_col, err64, used_qr = procrustes(U, E)
    Q_save = (Q_col if reference_quirks else Q_col.T).astype(np.float32)
    err = orthogonality_error(Q_save)
    seconds_linalg = time.perf_counter() - t1
    total_s = time.perf_counter() - t_start
    rows_per_s = N / seconds_stream if seconds_stream > 0 else None
    dev = jax.devices()[0]
    prov = {
        "method": "procrustes", "k": kk, "layers": reference_layer_names(lay), "tokens_seen": N, "reservoir": R,
        "seed": SEED, "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "device": dev.platform,
        "dtype": str(jnp.dtype(model.dtype).name), "d_model": d, "d_vocab": V, "n_layers": n,
        "orthogonality_error": err,
        "notes": ("jaxlens fit-prism, reference recipe (--reference-quirks): raw-residual statistics, Q in the "
                  "reference's orientation, the prompt pool cycled (spec Appendix A, Q6)") if reference_quirks else
                 ("jaxlens fit-prism (Q6 fixed): statistics of the normalised residuals the decoder whitens, Q saved "
                  "as the matrix the decoder right-multiplies, every position of a real data stream"),
        "jaxlens": {
            "recipe": recipe, "q6_fixed": not reference_quirks,
            "statistics_on": "raw residuals h (reference)" if reference_quirks
            else "normalised residuals N_l(h) (the norm lens's normaliser at each sampled layer)",
            "q_orientation": ("reference: Q_col with Q_col e_i ~ u_i, right-multiplied by the decoder "
                              "(applies Q_colᵀ)") if reference_quirks else
                             "right-multiplied: logits = x_w . Q . W_U with Q = Q_colᵀ, so e_iᵀ Q = u_iᵀ",
            "jaxlens_layers": lay, "rows_order": "sequence, position, depth", "positions_seen": positions_seen,
            "k_requested": k_req, "budget_rule": {"parameters_estimate": n_params, "rows": rows_default,
                                                  "reservoir": res_default},
            "reservoir_rule": "Algorithm R, random.Random(316), j = randint(0, i) for the 0-based i-th row",
            "pca": "exact: top-k eigenvectors of the centred whitened reservoir's Gram (fp32 on the device), "
                   "eigh in float64",
            "sign_convention": "E_k columns: largest-magnitude entry positive; U_k columns: u_i . e_i >= 0",
            "procrustes_qr_fallback": used_qr, "orthogonality_error_float64": err64, "var_floor": VAR_FLOOR,
            "data": data_desc, "model": {"source": model.source, "name": model.name, "arch": spec.arch},
            "mesh": None if mesh is None else {k_: int(v) for k_, v in mesh.shape.items()},
            "processes": jax.process_count(),
            "timings": {"stream_s": seconds_stream, "linalg_s": seconds_linalg, "total_s": total_s,
                        "rows_per_s": rows_per_s, "rows_per_s_steady": stream_rows_per_s},
        },
    }
    extras = {"basis_pca": E.astype(np.float32), "basis_unembed": U.astype(np.float32),
              "pca_singular_values": sv.astype(np.float32), "unembed_eigenvalues": eig.astype(np.float32)}
    prism = PrismLens(mean.astype(np.float32), var.astype(np.float32), Q_save, EPS, provenance=prov,
                      extras=extras, format="memory")
    if out is not None:
        if lead:                                   # every process holds the same fit; process 0 writes it
            save_prism(prism, out)
            prism.path = os.path.abspath(out)
            say(f"Prism ({recipe} recipe) written to {out}: k {kk}, orthogonality error {err:.2e}, "
                f"{N} rows in {seconds_stream:.2f} s ({rows_per_s:,.0f} rows/s)")
        DI.barrier("fit-prism written")
    stats = None
    if keep_stats:
        stats = {"count": moments.count, "mean": moments.mean.copy(), "m2": moments.m2.copy(),
                 "reservoir_index": np.asarray(owners, np.int64), "reservoir_rows": X,
                 "gram_reservoir": grams.get("reservoir"), "gram_unembed": G_u}
    return PrismFit(prism=prism, out=None if out is None else os.path.abspath(out), provenance=prov,
                    timings=prov["jaxlens"]["timings"], stats=stats)


def _bar(progress: bool, total: int):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="row", unit_scale=True, file=sys.stderr, dynamic_ncols=True, desc="fit-prism")
