"""Probe diagnostics: spec/probe.md §2.12-2.20, §2.23, §2.26, §2.28 and the raw-lens / milestones /
artefact-audit CSVs of §5.1.

Two layers:

* **Fused decodes** (JAX; every vocabulary-sized computation is one batched streaming call over all
  passes and layers, never a Python loop over layers):

  - :func:`multi_lens_stats` decodes several lenses at the same rows in ONE ``lens_stats`` pass
    (the probe decodes the norm and the raw lens together at the last position of every pass);
  - :func:`calibration_grid_stats`: one streaming pass over the calibration rows that gives, for every
    row and every temperature of a grid, CE(P_final, softmax(z/tau)) and KL(softmax(z/tau) || P_final),
    plus the per-row logit range and a non-finite count (norm temperatures §2.13, numeric health §2.20);
  - ``stream.pair_stats`` (KL both ways, JS, L1 between the norm and raw lens, §2.15 c);
  - one stacked pass [norm; :class:`TemperedLens`] (``kl_to_final_bits_norm_temp`` of every pass and
    the re-decode repeatability check);
  - :func:`dense_target_logits`: one small batched matmul for the handful of primary-pass rows the
    per-target diagnostics look at (last-layer consistency, decoding point, lens consistency, gate
    stability).

  :func:`decode_diagnostics` runs them on the probe's cached forward (no extra forward pass).

* **Pure functions** (numpy over per-layer scalars / plain Python) for every block of the JSON and
  every row of the CSVs; :func:`run_diagnostics` wires them together after ``pass_metrics``.

Reference bugs handled here (spec Appendix A; ``docs/reference_bugs.md``): Q3 (position window scores
the gold only at the last position), Q5 (raw-lens sample summary computed once from the primary pass),
Q13 (forward-of-two Jaccard over top-5) and N2 (the reference writes the last fact's raw/consecutive
Jaccards into every pos row of the same variant) are fixed by default and reproduced with
``metrics.ReferenceQuirks`` flags; Q14 (in-sample calibration) is reproduced and stated in the JSON.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import metrics as M
from . import stream
from .decoder import apply_norm, unembedding
from .errors import JaxlensError
from .lens import lens_stats, normalise
from .suite import CopyThresholds, Thresholds

F32 = jnp.float32
LN2 = math.log(2.0)
_HI = lax.Precision.HIGHEST

__all__ = [
    "StackedLens", "TemperedLens", "multi_lens_stats", "last_position_stats", "calibration_grid_stats",
    "dense_target_logits", "DiagnosticsOptions", "TunedInputs", "DecodeDiagnostics", "DiagnosticsResult",
    "decode_diagnostics", "run_diagnostics",
    # pure functions
    "temperature_grid", "fit_norm_temperatures", "kl_bits_rows", "temperature_probe", "head_transforms",
    "last_layer_consistency", "norm_temp_snapshots", "resid_geometry", "ln_source", "normalization_provenance",
    "layer_map", "norm_trajectory", "raw_sample_layers", "raw_samples", "raw_sample_summary",
    "window_centres", "window_layers", "window_rows", "window_summary", "topk_jaccard_np", "full_rows",
    "full_summary", "artifact_score", "confirmed_semantics", "topk_order", "rank_in_order", "lens_consistency",
    "semantic_milestones", "decoding_point", "gate_stability", "numeric_health", "repeatability", "preferred_milestone",
    "forward_gate", "position_grid", "position_window", "diagnostic_flags", "measurement_guidance",
    "evaluation_pack", "milestone_rows", "artifact_audit_rows",
]


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


# ==================================================================================================
# Pure functions: last-layer consistency (§2.12) and norm temperatures (§2.13)
# ==================================================================================================

def temperature_grid(lo: float, hi: float, n: int) -> np.ndarray:
    """``n`` log-spaced values from lo to hi (both included), like numpy / torch ``logspace``, rounded to
    12 decimals (so the end points and a grid point at 1 are exact)."""
    return np.round(np.logspace(math.log10(lo), math.log10(hi), int(n)), 12)


def fit_norm_temperatures(ce, grid) -> np.ndarray:
    """tau_l = argmin over the grid of the mean over prompts of CE(P_final, softmax(z_l / tau)) (§2.13).

    ``ce`` [P, L, G] (any unit); the first grid value wins ties. No prompts -> all 1.0."""
    ce = np.asarray(ce, np.float64)
    grid = np.asarray(grid, np.float64)
    if ce.ndim != 3 or ce.shape[0] == 0:
        L = ce.shape[1] if ce.ndim == 3 else 0
        return np.ones(L)
    return grid[np.argmin(ce.mean(axis=0), axis=-1)]


def _log_softmax64(z) -> np.ndarray:
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def kl_bits_rows(z, z_final) -> np.ndarray:
    """KL(softmax(z) || softmax(z_final)) in bits per row with the reference's 1e-30 guards, from
    fp32 logits evaluated in float64. z [..., V]; z_final [V] or broadcastable."""
    p = np.exp(_log_softmax64(z))
    q = np.exp(_log_softmax64(z_final))
    return np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30)), -1) / LN2


def temperature_probe(z, z_final, grid) -> tuple:
    """(temp_est, kl_after_temp_bits): the grid value s minimising KL(softmax(z/s) || P_final) (§2.12)."""
    grid = np.asarray(grid, np.float64)
    z = np.asarray(z, np.float64)
    kl = kl_bits_rows(z[None, :] / grid[:, None], z_final)
    i = int(np.argmin(kl))
    return float(grid[i]), float(kl[i])


_SCALE_NAMES = ("final_logit_scale", "logit_scale", "final_logits_scale")
_SOFTCAP_NAMES = ("final_logit_softcap", "logit_softcap", "final_logits_softcap", "softcap")
#: Hugging Face's name of Gemma-2/3's final softcap: the reference never looked for it (Q4).
_HF_SOFTCAP_NAMES = ("final_logit_softcapping",)


def _num(v) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        return None
    return float(v)


def head_transforms(config: Optional[Mapping] = None, *, model_attrs: Optional[Mapping] = None,
                    reference_names_only: bool = False) -> dict:
    """``cfg_transform`` = {scale, softcap} of the model head (§2.12): looked up in the config (and its
    ``text_config``), then in ``model_attrs``, under the reference's attribute names
    (``final_logit_scale|logit_scale|final_logits_scale``, ``final_logit_softcap|logit_softcap|
    final_logits_softcap|softcap``) and - unless ``reference_names_only`` (bug Q4) - HF's
    ``final_logit_softcapping``. Non-numeric values are ignored."""
    sources = []
    for src in (config, (config or {}).get("text_config") if isinstance(config, Mapping) else None, model_attrs):
        if isinstance(src, Mapping):
            sources.append(src)
    soft_names = _SOFTCAP_NAMES + (() if reference_names_only else _HF_SOFTCAP_NAMES)

    def find(names):
        for src in sources:
            for nm in names:
                v = _num(src.get(nm))
                if v is not None:
                    return v
        return None
    return {"scale": find(_SCALE_NAMES), "softcap": find(soft_names)}


def _rank_of(z, idx: int) -> int:
    """1 + #{v : z_v > z_idx} (ties in the index's favour, §2.1)."""
    z = np.asarray(z)
    return int(1 + np.sum(z > z[idx]))


def last_layer_consistency(z_lens, z_final, answer_id: Optional[int], *, z_pre=None,
                           transforms: Optional[Mapping] = None, softcap_in_lens: Optional[float] = None,
                           warn_kl_bits: float = 0.25, grid=None) -> dict:
    """``last_layer_consistency`` (§2.12): the lens at l = n against the model head.

    ``z_lens`` [V]: the lens logits at l = n (jaxlens applies the model's softcap, so for Gemma-2 this is
    the head itself); ``z_final`` [V]: the model's logits; ``z_pre``: the lens logits before any head
    transform (h @ W + b), used for ``kl_after_transform_bits`` = {scale: KL(softmax(z/scale) || q),
    softcap: KL(softmax(c tanh(z/c)) || q), scale_then_softcap: KL(softmax(c tanh((z/scale)/c)) || q)}
    (None where the transform is absent). Adds a jaxlens field ``lens_head_transform`` = {softcap_applied,
    kl_to_final_bits_without_softcap} (the latter is the number the reference reports for Gemma-2, Q4).
    """
    zl = np.asarray(z_lens, np.float32)
    zf = np.asarray(z_final, np.float32)
    p = np.exp(_log_softmax64(zl))
    q = np.exp(_log_softmax64(zf))
    kl = float(kl_bits_rows(zl, zf))
    i_l, i_f = int(np.argmax(zl)), int(np.argmax(zf))
    grid = temperature_grid(0.1, 10.0, 25) if grid is None else np.asarray(grid)
    temp_est, kl_temp = temperature_probe(zl, zf, grid)
    tr = {"scale": None, "softcap": None} if transforms is None else {"scale": transforms.get("scale"),
                                                                      "softcap": transforms.get("softcap")}
    zp = np.asarray(zl if z_pre is None else z_pre, np.float64)
    s, c = tr["scale"], tr["softcap"]
    after = {"scale": None if s is None else float(kl_bits_rows(zp / s, zf)),
             "softcap": None if c is None else float(kl_bits_rows(c * np.tanh(zp / c), zf)),
             "scale_then_softcap": (None if (s is None or c is None)
                                    else float(kl_bits_rows(c * np.tanh(zp / s / c), zf)))}
    delta = kl - kl_temp
    warn = bool(kl >= warn_kl_bits or delta >= warn_kl_bits)
    out = {
        "kl_to_final_bits": kl,
        "top1_agree": bool(i_l == i_f),
        "p_top1_lens": float(p[i_l]),
        "p_top1_model": float(q[i_f]),
        "p_answer_lens": None if answer_id is None else float(p[int(answer_id)]),
        "answer_rank_lens": None if answer_id is None else _rank_of(zl, int(answer_id)),
        "temp_est": temp_est,
        "kl_after_temp_bits": kl_temp,
        "cfg_transform": tr,
        "kl_after_transform_bits": after,
        "warn_high_last_layer_kl": warn,
        "gates": {"warn_high_last_layer_kl": warn, "threshold_bits": float(warn_kl_bits), "delta_kl_temp_bits": delta},
        "lens_head_transform": {
            "softcap_in_lens": softcap_in_lens,
            "kl_to_final_bits_without_softcap": (None if softcap_in_lens is None or z_pre is None
                                                 else float(kl_bits_rows(np.asarray(z_pre, np.float32), zf))),
        },
    }
    return out


def norm_temp_snapshots(kl_temp: Sequence, n_layers: int, fractions=(0.25, 0.5, 0.75)) -> dict:
    """``kl_to_final_bits_norm_temp@{25,50,75}%`` = {layer: round(n f), value} (§2.13; Python round)."""
    out = {}
    for f in fractions:
        layer = int(round(n_layers * float(f)))
        v = kl_temp[layer] if 0 <= layer < len(kl_temp) else None
        out[f"kl_to_final_bits_norm_temp@{M.format_threshold(100 * float(f), 2)}%"] = {
            "layer": layer, "value": None if v is None else float(v)}
    return out


# ==================================================================================================
# Normalisation provenance, layer map, trajectory (§2.14)
# ==================================================================================================

def resid_geometry(h_raw, h_norm) -> dict:
    """Per row: ``raw_resid_norm`` = ||h_raw||, ``resid_norm_ratio`` = (||h_norm|| + 1e-12)/(||h_raw|| + 1e-12),
    ``delta_resid_cos`` = clamp(<h_raw, h_norm>/(||h_raw|| ||h_norm|| + 1e-12), -1, 1) (fp32 inputs,
    float64 arithmetic), and NaN / Inf flags of both vectors. Inputs [..., d]."""
    a = np.asarray(h_raw, np.float64)
    b = np.asarray(h_norm, np.float64)
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    cos = np.clip(np.sum(a * b, -1) / (na * nb + 1e-12), -1.0, 1.0)
    return {"raw_resid_norm": na, "resid_norm_ratio": (nb + 1e-12) / (na + 1e-12), "delta_resid_cos": cos,
            "nan_raw": np.isnan(a).any(-1), "inf_raw": np.isinf(a).any(-1),
            "nan_norm": np.isnan(b).any(-1), "inf_norm": np.isinf(b).any(-1)}


def ln_source(spec, layer: int) -> str:
    """Which module normalises layer l in the norm lens (§1.5): blocks[0].ln1 at 0, the next block's
    ln1 at 1..n-1, ln_final at n; "raw" where the family has no input norm (OLMo-2)."""
    n = spec.n_layers
    if layer == n:
        return "ln_final"
    if not spec.pre_attn_norm:
        return "raw"
    return "blocks[0].ln1" if layer == 0 else f"blocks[{layer}].ln1"


def normalization_provenance(spec, geometry: Mapping, *, ablation_ran: bool = False) -> dict:
    """``normalization_provenance`` = {arch, strategy, per_layer} from per-layer geometry arrays [n+1]."""
    per = []
    for layer in range(spec.n_layers + 1):
        src = ln_source(spec, layer)
        per.append({"layer": layer, "ln_source": src, "eps_inside_sqrt": True, "scale_gamma_used": src != "raw",
                    "resid_norm_ratio": _f(geometry["resid_norm_ratio"][layer]),
                    "delta_resid_cos": _f(geometry["delta_resid_cos"][layer]),
                    "raw_resid_norm": _f(geometry["raw_resid_norm"][layer])})
    strategy = {"primary": "next_ln1", "ablation": "post_ln2_vs_next_ln1@targets"} if ablation_ran else "next_ln1"
    return {"arch": "pre_norm", "strategy": strategy, "per_layer": per}


def layer_map(spec) -> list:
    """``layer_map`` (§2.14): block / stream / norm of every lens layer."""
    n = spec.n_layers
    out = []
    for layer in range(n + 1):
        if layer == 0:
            e = {"layer": 0, "block": "blocks[0]", "stream": "pre_block"}
        elif layer < n:
            e = {"layer": layer, "block": f"blocks[{layer - 1}]", "stream": "post_block"}
        else:
            e = {"layer": layer, "block": "final", "stream": "unembed_head"}
        e["norm"] = ln_source(spec, layer)
        out.append(e)
    return out


def norm_trajectory(per_layer: Sequence[Mapping], L_semantic: Optional[int], *, spike_ratio: float = 3.0,
                    spike_cos: float = 0.8, plateau_slope: float = 0.01, monotonic_r2: float = 0.70) -> dict:
    """The norm-trajectory classifier (§2.14) over ``normalization_provenance.per_layer`` entries.

    Spikes: layers l <= L_semantic (all layers if None) with resid_norm_ratio > 3 or delta_resid_cos < 0.8.
    OLS of log(raw_resid_norm + 1e-9) on l gives slope and r^2 (1 when there is no variance). Shape:
    "spike" if any spike, else "plateau" if |slope| <= 0.01, else "monotonic" if r^2 >= 0.70, else
    "non_monotonic"; None when fewer than two layers carry a norm and nothing spiked.
    """
    spikes = 0
    xs, ys = [], []
    for e in per_layer:
        layer = e.get("layer")
        if layer is None:
            continue
        r, c, nrm = e.get("resid_norm_ratio"), e.get("delta_resid_cos"), e.get("raw_resid_norm")
        if L_semantic is None or layer <= L_semantic:
            if (r is not None and r > spike_ratio) or (c is not None and c < spike_cos):
                spikes += 1
        if nrm is not None and math.isfinite(nrm):
            xs.append(float(layer))
            ys.append(math.log(float(nrm) + 1e-9))
    slope = r2 = None
    if len(xs) >= 2:
        x, y = np.asarray(xs), np.asarray(ys)
        xm, ym = x.mean(), y.mean()
        sxx = float(np.sum((x - xm) ** 2))
        slope = float(np.sum((x - xm) * (y - ym)) / sxx) if sxx > 0 else 0.0
        resid = y - (ym + slope * (x - xm))
        sst = float(np.sum((y - ym) ** 2))
        r2 = 1.0 if sst == 0 else float(1.0 - np.sum(resid ** 2) / sst)
    if spikes:
        shape = "spike"
    elif slope is None:
        shape = None
    elif abs(slope) <= plateau_slope:
        shape = "plateau"
    elif r2 >= monotonic_r2:
        shape = "monotonic"
    else:
        shape = "non_monotonic"
    return {"shape": shape, "slope": slope, "r2": r2, "n_spikes": spikes, "sampled_layers": len(xs)}


# ==================================================================================================
# Raw-vs-norm checks (§2.15)
# ==================================================================================================

def raw_sample_layers(n_layers: int, mode: str) -> list:
    """Sampled-check layers: 0 plus l in {floor(n/4)+1, floor(n/2)+1, floor(3n/4)+1} (mode "sample"),
    every layer ("full"), none ("off")."""
    n = int(n_layers)
    if mode == "off":
        return []
    if mode == "full":
        return list(range(n + 1))
    if mode != "sample":
        raise JaxlensError(f"raw-lens mode must be off, sample or full; got {mode!r}")
    return sorted({0} | {x for x in (n // 4 + 1, n // 2 + 1, (3 * n) // 4 + 1) if 1 <= x <= n})


def _is_answer(rank, top1_str, gold_id, gold_string) -> bool:
    if gold_id is not None and rank is not None:
        return int(rank) == 1
    return bool(gold_string is not None and top1_str is not None and top1_str.strip() == gold_string)


def raw_samples(pass_data: Mapping, layers: Sequence[int]) -> list:
    """Sampled raw-lens entries (§2.15 a) of one pass at ``layers`` from its full-sweep data."""
    out = []
    for layer in layers:
        d = pass_data["layers"][layer]
        out.append({"layer": layer, "kl_norm_vs_raw_bits": d["kl_norm_vs_raw_bits"],
                    "top1_agree": d["top1_token_id_norm"] == d["top1_token_id_raw"],
                    "p_top1_norm": d["p_top1_norm"], "p_top1_raw": d["p_top1_raw"],
                    "p_answer_norm": d["p_answer_norm"], "p_answer_raw": d["p_answer_raw"],
                    "answer_rank_norm": d["answer_rank_norm"], "answer_rank_raw": d["answer_rank_raw"],
                    "is_answer_norm": d["is_answer_norm"], "is_answer_raw": d["is_answer_raw"]})
    return out


def raw_sample_summary(samples: Sequence[Mapping], *, high_kl: float = 1.0, medium_kl: float = 0.5) -> Optional[dict]:
    """{first_norm_only_semantic_layer, max_kl_norm_vs_raw_bits, lens_artifact_risk} over samples: risk
    "high" if some sample is answer under norm but not raw, or max KL >= 1; "medium" if >= 0.5; else "low"."""
    if not samples:
        return None
    first = next((s["layer"] for s in samples if s.get("is_answer_norm") and not s.get("is_answer_raw")), None)
    kls = [s["kl_norm_vs_raw_bits"] for s in samples if s.get("kl_norm_vs_raw_bits") is not None]
    mx = max(kls) if kls else None
    if first is not None or (mx is not None and mx >= high_kl):
        risk = "high"
    elif mx is not None and mx >= medium_kl:
        risk = "medium"
    else:
        risk = "low"
    return {"first_norm_only_semantic_layer": first, "max_kl_norm_vs_raw_bits": mx, "lens_artifact_risk": risk}


def window_radius(summary: Optional[Mapping], *, base: int = 4, high: int = 8, high_kl: float = 1.0) -> int:
    """R = 8 when the sample summary says risk "high" or max KL >= 1, else 4 (§2.15 b)."""
    if summary and (summary.get("lens_artifact_risk") == "high"
                    or (summary.get("max_kl_norm_vs_raw_bits") or 0.0) >= high_kl):
        return int(high)
    return int(base)


def window_centres(summary: Mapping, n_layers: int) -> list:
    """Centres of the windowed check: L_semantic, first_rank_le_5, first_kl_below_1.0, L_copy (strict)
    and the earliest soft copy layer; integers in [0, n] only, sorted, unique."""
    soft = [v for v in (summary.get("L_copy_soft") or {}).values() if isinstance(v, int)]
    cands = [summary.get("L_semantic"), summary.get("first_rank_le_5"), summary.get("first_kl_below_1.0"),
             summary.get("L_copy"), min(soft) if soft else None]
    return sorted({int(c) for c in cands if isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= n_layers})


def window_layers(centres: Sequence[int], radius: int, n_layers: int) -> list:
    out = set()
    for c in centres:
        out.update(range(max(0, c - radius), min(n_layers, c + radius) + 1))
    return sorted(out)


def _strict_flag(top1_id, p1, p2, top1_str, ctx: set, tau: float, margin: float) -> bool:
    return bool(top1_id in ctx and p1 is not None and p2 is not None and p1 > tau and (p1 - p2) > margin
                and not M.is_pure_ws_punct(top1_str))


def window_rows(pass_data: Mapping, layers: Sequence[int], keys: Mapping, *, ctx_ids: Sequence[int],
                copy_cfg=None) -> list:
    """Windowed raw-vs-norm rows (§2.15 b): two per layer (lens "norm", then "raw") with the window-CSV
    columns plus the strict-copy sweep flags of that lens (top-1 id in ctx_ids, p1 > tau, p1 - p2 >
    margin, whitespace guard; the flags are not CSV columns)."""
    cfg = copy_cfg or CopyThresholds()
    ctx = set(int(c) for c in ctx_ids)
    taus = sorted(set(float(t) for t in cfg.strict_sweep))
    out = []
    for layer in layers:
        d = pass_data["layers"][layer]
        for lens in ("norm", "raw"):
            row = dict(keys, layer=layer, lens=lens, p_top1=d[f"p_top1_{lens}"],
                       top1_token_id=d[f"top1_token_id_{lens}"], top1_token_str=d[f"top1_token_str_{lens}"],
                       p_answer=d[f"p_answer_{lens}"], answer_rank=d[f"answer_rank_{lens}"],
                       kl_norm_vs_raw_bits=d["kl_norm_vs_raw_bits"])
            for t in taus:
                row[M.copy_strict_label(t, sweep=True)] = _strict_flag(
                    d[f"top1_token_id_{lens}"], d[f"p_top1_{lens}"], d[f"p_top2_{lens}"], d[f"top1_token_str_{lens}"],
                    ctx, t, cfg.strict_margin)
            out.append(row)
    return out


def window_summary(rows: Sequence[Mapping], centres, layers, radius: int) -> dict:
    norm = {r["layer"]: r for r in rows if r["lens"] == "norm"}
    raw = {r["layer"]: r for r in rows if r["lens"] == "raw"}
    only = [layer for layer in sorted(norm) if norm[layer]["answer_rank"] == 1
            and (raw.get(layer) or {}).get("answer_rank") != 1]
    kls = [r["kl_norm_vs_raw_bits"] for r in norm.values() if r["kl_norm_vs_raw_bits"] is not None]
    return {"radius": int(radius), "center_layers": list(centres), "layers_checked": list(layers),
            "norm_only_semantics_layers": only, "max_kl_norm_vs_raw_bits_window": max(kls) if kls else None,
            "mode": "window"}


def topk_jaccard_np(a, b) -> np.ndarray:
    """Jaccard |A ∩ B| / |A ∪ B| of id sets per row ([..., k] each; ids < 0 ignored; 1.0 for two empty sets)."""
    a = np.asarray(a)
    b = np.asarray(b)
    va, vb = a >= 0, b >= 0
    inter = np.sum(np.any((a[..., :, None] == b[..., None, :]) & vb[..., None, :], -1) & va, -1)
    union = va.sum(-1) + vb.sum(-1) - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


_FULL_COLS = ("p_top1_raw", "top1_token_id_raw", "top1_token_str_raw", "p_answer_raw", "answer_rank_raw",
              "p_top1_norm", "top1_token_id_norm", "top1_token_str_norm", "p_answer_norm", "answer_rank_norm",
              "kl_norm_vs_raw_bits", "kl_raw_to_norm_bits", "js_divergence", "entropy_bits_norm", "entropy_bits_raw",
              "entropy_gap_bits", "l1_prob_diff", "topk_jaccard_raw_norm@50", "topk_jaccard_consecutive@50",
              "norm_only_semantics")


def full_rows(pass_data: Mapping, keys: Mapping) -> list:
    """Rows of the raw full-sweep CSV (``-pure-next-token-rawlens.csv``) of one pass, layer order."""
    return [dict(keys, layer=layer, **{c: d[c] for c in _FULL_COLS})
            for layer, d in sorted(pass_data["layers"].items())]


def full_summary(rows: Sequence[Mapping], *, n_layers: int, teacher_entropy_bits: Optional[float], th=None) -> dict:
    """``raw_lens_full`` (§2.15 c) of one pass from its full-sweep rows (without ``score``)."""
    th = th or Thresholds().raw_lens
    rows = sorted(rows, key=lambda r: r["layer"])
    layers = [r["layer"] for r in rows]
    kl = [r["kl_norm_vs_raw_bits"] for r in rows]
    denom = float(n_layers + 1)
    only = [r["layer"] for r in rows if r["norm_only_semantics"]]
    js = [r["js_divergence"] for r in rows]
    l1 = [r["l1_prob_diff"] for r in rows]
    jr = [r["topk_jaccard_raw_norm@50"] for r in rows]
    jc = [r["topk_jaccard_consecutive@50"] for r in rows]
    kls = [v for v in kl if v is not None]

    def pct(vals):
        return {"p25": M.percentile(vals, 0.25), "p50": M.percentile(vals, 0.5), "p75": M.percentile(vals, 0.75)}
    return {
        "pct_layers_kl_ge_1.0": sum(1 for v in kls if v >= 1.0) / denom,
        "pct_layers_kl_ge_0.5": sum(1 for v in kls if v >= 0.5) / denom,
        "n_norm_only_semantics_layers": len(only),
        "earliest_norm_only_semantic": only[0] if only else None,
        "max_kl_norm_vs_raw_bits": max(kls) if kls else None,
        "mode": "full",
        "js_divergence_percentiles": pct(js),
        "l1_prob_diff_percentiles": pct(l1),
        f"first_js_le_{th.js_le}": M.first_layer([v is not None and v <= th.js_le for v in js], layers),
        f"first_l1_le_{th.l1_le}": M.first_layer([v is not None and v <= th.l1_le for v in l1], layers),
        "teacher_entropy_bits": teacher_entropy_bits,
        "topk_overlap": {
            "K": int(th.topk_jaccard_k),
            "jaccard_raw_norm_p50": M.percentile(jr, 0.5),
            f"first_jaccard_raw_norm_ge_{th.jaccard_ge}": M.first_layer(
                [v is not None and v >= th.jaccard_ge for v in jr], layers),
            "per_layer_raw_norm": {str(layer): v for layer, v in zip(layers, jr)},
            "per_layer_consecutive_norm": {str(layer): v for layer, v in zip(layers, jc)},
            "cross_key": "topk_jaccard_raw_norm@50",
            "consecutive_key": "topk_jaccard_consecutive@50",
        },
    }


def artifact_score(pct_kl_ge_1: Optional[float], n_norm_only: Optional[int], max_kl: Optional[float],
                   js_p50: Optional[float] = None, l1_p50: Optional[float] = None, th=None) -> dict:
    """Lens-artefact score (§2.15 d): v1 = 0.6 pct_kl_ge_1 + 0.3 [n_norm_only > 0] + 0.1 min(1, max_kl/5);
    tier "low" (< 0.2), "medium" (<= 0.5), "high"; v2 = v1 + 0.1 min(1, max(0, js_p50)/0.1) +
    0.05 min(1, max(0, l1_p50)/0.5), clipped to [0, 1]. Missing inputs count as 0; all missing -> None."""
    th = th or Thresholds().artifact_score
    if pct_kl_ge_1 is None and n_norm_only is None and max_kl is None:
        return {"lens_artifact_score": None, "lens_artifact_score_v2": None, "tier": None}
    s = (th.weight_pct_kl_ge_1 * float(pct_kl_ge_1 or 0.0) + th.weight_norm_only * float(bool(n_norm_only))
         + th.weight_max_kl_scaled * min(1.0, float(max_kl or 0.0) / th.max_kl_scale_bits))
    tier = "low" if s < th.tier_low else ("medium" if s <= th.tier_high else "high")
    v2 = (s + th.v2_js_p50 * min(1.0, max(0.0, float(js_p50 or 0.0)) / th.v2_js_scale)
          + th.v2_l1_p50 * min(1.0, max(0.0, float(l1_p50 or 0.0)) / th.v2_l1_scale))
    return {"lens_artifact_score": s, "lens_artifact_score_v2": min(1.0, max(0.0, v2)), "tier": tier}


def artifact_score_config(th=None) -> dict:
    th = th or Thresholds().artifact_score
    return {"lens_artifact_score": {
        "weights": {"pct_ge_1.0": th.weight_pct_kl_ge_1, "norm_only": th.weight_norm_only,
                    "max_kl_scaled": th.weight_max_kl_scaled},
        "thresholds": {"low": th.tier_low, "high": th.tier_high},
        "v2_addends": {"js_p50": th.v2_js_p50, "l1_p50": th.v2_l1_p50}}}


# ==================================================================================================
# Confirmed semantics (§2.16), lens consistency (§2.17), decoding point (§2.18), gate stability (§2.19)
# ==================================================================================================

def _first_rank1(ranks: Mapping) -> Optional[int]:
    return next((layer for layer in sorted(ranks) if ranks[layer] is not None and int(ranks[layer]) == 1), None)


def confirmed_semantics(L_semantic_norm: Optional[int], raw_ranks: Mapping, tuned_ranks: Optional[Mapping] = None,
                        window: int = 2) -> dict:
    """§2.16: L_semantic_confirmed = L_semantic_norm (the norm layer, Q11) when some layer within
    +-window of it has raw and/or tuned rank 1; source raw / tuned / both / none. ``*_ranks``: layer -> rank."""
    L_raw = _first_rank1(raw_ranks)
    L_tuned = _first_rank1(tuned_ranks) if tuned_ranks else None
    src = "none"
    confirmed = None
    if L_semantic_norm is not None:
        lo, hi = L_semantic_norm - window, L_semantic_norm + window

        def hit(ranks):
            return bool(ranks) and any(lo <= layer <= hi and r is not None and int(r) == 1
                                       for layer, r in ranks.items())
        by_raw, by_tuned = hit(raw_ranks), hit(tuned_ranks)
        if by_raw or by_tuned:
            confirmed = L_semantic_norm
            src = "both" if (by_raw and by_tuned) else ("raw" if by_raw else "tuned")
    return {"L_semantic_norm": L_semantic_norm, "L_semantic_raw": L_raw, "L_semantic_tuned": L_tuned,
            "\u0394_window": int(window), "L_semantic_confirmed": confirmed, "confirmed_source": src}


def topk_order(z, k: Optional[int] = None) -> np.ndarray:
    """Token ids by descending logit, ties by lower id (first k)."""
    z = np.asarray(z)
    order = np.argsort(-z, kind="stable")
    return order if k is None else order[:k]


def rank_in_order(z, ids) -> np.ndarray:
    """1-based position of each id in the full descending order of z (ties by lower id)."""
    z = np.asarray(z)
    ids = np.asarray(ids, np.int64)
    zi = z[ids][:, None]
    v = np.arange(z.shape[-1])[None, :]
    return 1 + np.sum((z[None, :] > zi) | ((z[None, :] == zi) & (v < ids[:, None])), axis=-1)


def _pearson(x, y) -> Optional[float]:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2:
        return None
    sx, sy = x.std(), y.std()
    if sx == 0 or sy == 0:
        return None
    return float(np.mean((x - x.mean()) * (y - y.mean())) / (sx * sy))


def consistency_metrics(z_a, z_b) -> dict:
    """jaccard@10, jaccard@50 of the top-k id sets and ``spearman_top50`` = Pearson correlation of ranks
    1..50 of A's top-50 with those tokens' ranks in B's full order (§2.17)."""
    ta, tb = topk_order(z_a, 50), topk_order(z_b, 50)
    return {"jaccard@10": float(topk_jaccard_np(ta[:10], tb[:10])), "jaccard@50": float(topk_jaccard_np(ta, tb)),
            "spearman_top50": _pearson(np.arange(1, len(ta) + 1), rank_in_order(z_b, ta))}


def _p50(entries, key):
    return M.percentile([e.get(key) for e in entries], 0.5)


def lens_consistency(targets: Sequence[tuple], norm_logits: Mapping, others: Mapping, *,
                     L_semantic_confirmed: Optional[int] = None, th=None) -> dict:
    """§2.17 at ``targets`` [(name, layer)]: for each other lens (``others`` = {"raw": {layer: z}, ...}),
    ``norm_vs_{lens}`` = {at_targets [{layer, jaccard@10, jaccard@50, spearman_top50}], p50}. As in the
    reference an ``L_semantic_confirmed`` target is appended with the metrics of an existing entry at
    that layer (else nulls). ``low_lens_consistency_at_semantic`` = some target whose name contains
    "semantic" has jaccard@10 < 0.30 or spearman_top50 < 0.30 (for any lens)."""
    th = th or Thresholds().lens_consistency
    names = [nm for nm, _ in targets]
    out = {"targets": list(names)}
    if L_semantic_confirmed is not None:
        out["targets"].append("L_semantic_confirmed")
    low = False
    for lens, zs in others.items():
        at = []
        for _, layer in targets:
            e = {"layer": layer}
            if layer in norm_logits and layer in zs:
                e.update(consistency_metrics(norm_logits[layer], zs[layer]))
            else:
                e.update({"jaccard@10": None, "jaccard@50": None, "spearman_top50": None})
            at.append(e)
        if L_semantic_confirmed is not None:
            src = next((e for e in at if e["layer"] == L_semantic_confirmed), None)
            at.append(dict(src) if src is not None else {"layer": L_semantic_confirmed, "jaccard@10": None,
                                                         "jaccard@50": None, "spearman_top50": None})
        for nm, e in zip(out["targets"], at):
            j10, rho = e["jaccard@10"], e["spearman_top50"]
            if "semantic" in nm and ((j10 is not None and j10 < th.low_jaccard_at_10)
                                     or (rho is not None and rho < th.low_spearman_top50)):
                low = True
        out[f"norm_vs_{lens}"] = {"at_targets": at, "p50": {k: _p50(at, k) for k in ("jaccard@10", "jaccard@50",
                                                                                     "spearman_top50")}}
    out["low_lens_consistency_at_semantic"] = low
    return out


def _spearman_union(za, zb, k: int = 50) -> Optional[float]:
    ta, tb = [int(i) for i in topk_order(za, k)], [int(i) for i in topk_order(zb, k)]
    union = list(dict.fromkeys(ta + tb))
    ra = {t: i + 1 for i, t in enumerate(ta)}
    rb = {t: i + 1 for i, t in enumerate(tb)}
    return _pearson([ra.get(t, k + 1) for t in union], [rb.get(t, k + 1) for t in union])


def decoding_point_entry(name: str, layer: int, z_post, z_next, answer_id: Optional[int]) -> dict:
    """One decoding-point target (§2.18): post_ln2 (block l-1's ln2) vs next_ln1 (the norm lens)."""
    pp, pn = np.exp(_log_softmax64(z_post)), np.exp(_log_softmax64(z_next))
    tp, tn = topk_order(z_post, 50), topk_order(z_next, 50)
    rp = None if answer_id is None else _rank_of(z_post, answer_id)
    rn = None if answer_id is None else _rank_of(z_next, answer_id)
    return {"name": name, "layer": layer,
            "rank1_agree": None if answer_id is None else bool(rp == 1 and rn == 1),
            "delta_answer_rank": None if answer_id is None else int(rp - rn),
            "top1_token_agree": bool(tp[0] == tn[0]),
            "answer_rank_post_ln2": rp, "answer_rank_next_ln1": rn,
            "top1_id_post_ln2": int(tp[0]), "top1_id_next_ln1": int(tn[0]),
            "p_answer_post_ln2": None if answer_id is None else float(pp[answer_id]),
            "p_answer_next_ln1": None if answer_id is None else float(pn[answer_id]),
            "p_top1_post_ln2": float(pp[tp[0]]), "p_top1_next_ln1": float(pn[tn[0]]),
            "spearman_top50": _spearman_union(z_post, z_next),
            "jaccard@10": float(topk_jaccard_np(tp[:10], tn[:10])),
            "jaccard@50": float(topk_jaccard_np(tp, tn)), "status": "ok"}


def semantic_milestones(summary: Mapping) -> dict:
    """L_semantic, L_semantic_strong, L_semantic_strong_run2, first_rank_le_{5,10} of a pass summary
    (``summarize_pass`` keeps the strong milestones inside ``semantic_gate``; top-level keys win)."""
    sg = summary.get("semantic_gate") or {}
    return {"L_semantic": summary.get("L_semantic"),
            "L_semantic_strong": summary.get("L_semantic_strong", sg.get("L_semantic_strong")),
            "L_semantic_strong_run2": summary.get("L_semantic_strong_run2", sg.get("L_semantic_strong_run2")),
            "first_rank_le_5": summary.get("first_rank_le_5"), "first_rank_le_10": summary.get("first_rank_le_10")}


def decoding_point_targets(summary: Mapping, n_layers: int) -> list:
    """[(name, layer)]: L_semantic_norm, L_semantic_strong, L_semantic_strong_run2 and its +1,
    first_rank_le_5 (deduplicated by (name, layer), inside [0, n])."""
    ms = semantic_milestones(summary)
    sr2 = ms["L_semantic_strong_run2"]
    cands = [("L_semantic_norm", ms["L_semantic"]), ("L_semantic_strong", ms["L_semantic_strong"]),
             ("L_semantic_strong_run2", sr2), ("L_semantic_strong_run2+1", None if sr2 is None else sr2 + 1),
             ("first_rank_le_5", ms["first_rank_le_5"])]
    out = []
    for nm, layer in cands:
        if isinstance(layer, int) and 0 <= layer <= n_layers and (nm, layer) not in out:
            out.append((nm, layer))
    return out


_PREFERRED = ("L_semantic_strong_run2", "L_semantic_strong", "L_semantic_confirmed", "L_semantic_norm")


def decoding_point(entries: Sequence[Mapping], targets: Sequence[tuple], *, tested: bool,
                   L_semantic_confirmed: Optional[int] = None, jaccard_min: float = 0.5) -> dict:
    """The ``decoding_point`` block and its gate (§2.18) from per-target entries (``status`` "ok" for
    decoded ones). Gate ``decoding_point_consistent``: False if a decoded target has rank1_agree False;
    else the preferred milestone's entry (strong_run2 -> strong -> confirmed -> norm; else the first
    decoded one) must have jaccard@10 >= 0.5; None when nothing was decoded."""
    ok = [e for e in entries if e.get("status") == "ok"]
    gate = None
    pref = None
    if ok:
        if any(e.get("rank1_agree") is False for e in ok):
            gate = False
        for nm in _PREFERRED:
            if nm == "L_semantic_confirmed":
                pref = next((e for e in ok if L_semantic_confirmed is not None
                             and e["layer"] == L_semantic_confirmed), None)
            else:
                pref = next((e for e in ok if e["name"] == nm), None)
            if pref is not None:
                pref = dict(pref, name=nm) if nm == "L_semantic_confirmed" else pref
                break
        pref = pref or ok[0]
        if gate is None:
            gate = bool(pref.get("jaccard@10") is not None and pref["jaccard@10"] >= jaccard_min)
    return {"arch": "pre_norm", "tested": bool(tested), "strategies": ["post_ln2", "next_ln1"],
            "targets": [{"name": nm, "layer": layer} for nm, layer in targets], "per_target": list(entries),
            "gate": {"decoding_point_consistent": gate},
            "preferred_target": None if pref is None else {"name": pref["name"], "layer": pref["layer"]}}


def _gates_at(z, answer_id: int, s: float, V: int, delta_abs: float, delta_top2: float) -> tuple:
    z = np.asarray(z, np.float64)
    others = np.delete(z, answer_id)
    base_gap = z[answer_id] - others.max()
    lp = _log_softmax64(s * z)
    uni = bool(math.exp(lp[answer_id]) - 1.0 / V >= delta_abs)
    top2 = bool(s * base_gap >= delta_top2)
    return uni, top2


def gate_stability(targets: Sequence[tuple], norm_logits: Mapping, answer_id: Optional[int], *, vocab_size: int,
                   scales=(0.90, 0.95, 1.05, 1.10), delta_abs: float = 0.002, delta_top2: float = 0.5) -> dict:
    """§2.19: the uniform-margin and top-2 gates under logit rescalings s·z at the targets
    [(name, layer)] (L_semantic_norm, L_semantic_strong, L_semantic_strong_run2 - the last needs both
    gates at l and l + 1 at the same scale and reports only ``both_gates_pass_frac``)."""
    per = {}
    scales = [float(s) for s in scales]
    if answer_id is not None:
        for nm, layer in targets:
            if layer not in norm_logits:
                continue
            res = [_gates_at(norm_logits[layer], answer_id, s, vocab_size, delta_abs, delta_top2) for s in scales]
            if nm == "L_semantic_strong_run2":
                if layer + 1 not in norm_logits:
                    continue
                nxt = [_gates_at(norm_logits[layer + 1], answer_id, s, vocab_size, delta_abs, delta_top2)
                       for s in scales]
                per[nm] = {"layer": layer, "both_gates_pass_frac": float(np.mean([a and b and c and d for (a, b), (c, d)
                                                                                   in zip(res, nxt)]))}
            else:
                per[nm] = {"layer": layer, "uniform_margin_pass_frac": float(np.mean([u for u, _ in res])),
                           "top2_gap_pass_frac": float(np.mean([t for _, t in res])),
                           "both_gates_pass_frac": float(np.mean([u and t for u, t in res]))}
    both = [v["both_gates_pass_frac"] for v in per.values()]
    return {"scales": scales, "per_target": per, "min_both_gates_pass_frac": min(both) if both else None}


# ==================================================================================================
# Numeric health (§2.20), repeatability (§2.23), position window (§3.6 / Q3)
# ==================================================================================================

def numeric_health(layers: Sequence[int], *, nan_flags: Sequence[bool], inf_flags: Sequence[bool],
                   max_abs_logit: Sequence[float], min_prob: Sequence[float],
                   L_copy: Optional[int] = None, L_semantic: Optional[int] = None) -> dict:
    """§2.20 summary (+ ``caution``: a flagged layer <= L_copy or <= L_semantic, or any flagged layer when
    both are null)."""
    flagged = [{"layer": int(layer), "lens": "norm", "any_nan": bool(a), "any_inf": bool(b)}
               for layer, a, b in zip(layers, nan_flags, inf_flags) if a or b]
    caution = False
    for e in flagged:
        if (L_copy is None and L_semantic is None) or (L_copy is not None and e["layer"] <= L_copy) \
                or (L_semantic is not None and e["layer"] <= L_semantic):
            caution = True
    return {"any_nan": bool(any(nan_flags)), "any_inf": bool(any(inf_flags)),
            "max_abs_logit_p99": M.percentile(_finite(max_abs_logit), 0.99),
            "min_prob_p01": M.percentile(_finite(min_prob), 0.01),
            "layers_flagged": flagged, "_caution": caution}


def _finite(xs) -> list:
    return [float(x) for x in xs if x is not None and math.isfinite(float(x))]


def repeatability(top_ids_a, top_ids_b, *, deterministic: bool = True) -> dict:
    """Re-decode micro-check (§2.23) from the top-k ids of the original and the re-decoded rows
    ([L, k] each): top-1 flips and the rank deviation of the original top-1 in the re-decode (its
    0-based position in the new top-k list; k when it fell out of it - a lower bound)."""
    a = np.asarray(top_ids_a)
    b = np.asarray(top_ids_b)
    L, k = b.shape
    dev = []
    for i in range(L):
        pos = np.nonzero(b[i] == a[i, 0])[0]
        dev.append(float(pos[0]) if pos.size else float(k))
    flips = float(np.mean(a[:, 0] != b[:, 0])) if L else 0.0
    return {"status": "ok", "layers_checked": int(L), "max_rank_dev": max(dev) if dev else None,
            "p95_rank_dev": M.percentile(dev, 0.95), "top1_flip_rate": flips,
            "deterministic_algorithms": bool(deterministic)}


def repeatability_flag(block: Mapping, th=None) -> bool:
    th = th or Thresholds().repeatability
    return bool((block.get("max_rank_dev") or 0) > th.max_rank_dev
                or (block.get("top1_flip_rate") or 0) > th.max_top1_flip_rate)


def preferred_milestone(summary: Mapping, L_semantic_confirmed: Optional[int] = None) -> tuple:
    """(name, layer) by priority L_semantic_strong_run2 -> L_semantic_strong -> L_semantic_confirmed ->
    L_semantic_norm; (None, None) when none exists."""
    ms = semantic_milestones(summary)
    cands = {"L_semantic_strong_run2": ms["L_semantic_strong_run2"], "L_semantic_strong": ms["L_semantic_strong"],
             "L_semantic_confirmed": L_semantic_confirmed, "L_semantic_norm": ms["L_semantic"]}
    for nm in _PREFERRED:
        if cands[nm] is not None:
            return nm, cands[nm]
    return None, None


def forward_gate(mode: str, *, pass1: Optional[tuple] = None, pass2: Optional[tuple] = None,
                 topk1: Optional[Sequence[str]] = None, topk2: Optional[Sequence[str]] = None,
                 tolerance: int = 1, jaccard_min: float = 0.5, topk_k: int = 10) -> dict:
    """``repeatability_forward`` (§2.23). ``mode``: "skipped_deterministic", "disabled" or "ran"; pass1 /
    pass2 = (milestone name, layer); topk1 / topk2 = top-k token strings of both passes at the pass-1
    layer. The gate passes iff the names match, |Δlayer| <= 1 and the Jaccard of the strings >= 0.5 (None
    when neither pass has a semantic milestone)."""
    n1, l1 = pass1 if pass1 else (None, None)
    n2, l2 = pass2 if pass2 else (None, None)
    jac = None
    gate = None
    delta = None
    if mode == "ran":
        if l1 is not None and l2 is not None:
            delta = int(l2 - l1)
        if topk1 is not None and topk2 is not None:
            A, B = set(topk1), set(topk2)
            jac = len(A & B) / len(A | B) if (A | B) else 1.0
        if n1 is None and n2 is None:
            gate = None          # no semantic milestone in either pass: nothing to compare
        else:
            gate = bool(n1 == n2 and delta is not None and abs(delta) <= tolerance and jac is not None
                        and jac >= jaccard_min)
    return {"milestones": {"primary": n1, "pass1": {"layer": l1}, "pass2": {"layer": l2}, "delta_layers": delta},
            "topk_jaccard_at_primary_layer": jac, "gate": {"repeatability_forward_pass": gate},
            "enabled": mode != "disabled", "mode": mode, "tolerance_layers": int(tolerance), "topk_k": int(topk_k)}


POSITION_GRID = (0.20, 0.40, 0.60, 0.80, 0.92, 0.96, 0.98, 1.00)


def position_grid(T: int, fractions=POSITION_GRID) -> list:
    """[(fraction, position)]: position round((T-1) f) (Python round), the first fraction wins a collision."""
    out, seen = [], set()
    for f in fractions:
        p = int(round((T - 1) * float(f)))
        if p not in seen:
            seen.add(p)
            out.append((float(f), p))
    return out


def position_window(ranks, T: int, *, L_semantic: Optional[int], L_strong_run2: Optional[int] = None,
                    last_position_only: bool = False, fractions=POSITION_GRID) -> dict:
    """Position-window stability: at layer L_semantic, the fraction of the position grid whose norm-lens
    gold rank is 1. ``ranks`` [n+1, T]: the gold id's rank at every position (jaxlens scores it at every
    grid position; ``last_position_only`` reproduces bug Q3, where only the last position can count).
    ``rank1_frac_strong_run2``: fraction of grid positions with rank 1 at both L_strong_run2 and +1."""
    grid = position_grid(T, fractions)
    ranks = np.asarray(ranks)

    def r1(layer, pos):
        if layer is None or not (0 <= layer < ranks.shape[0]):
            return False
        if last_position_only and pos != T - 1:
            return False
        return bool(ranks[layer, pos] == 1)
    frac = None if L_semantic is None else float(np.mean([r1(L_semantic, p) for _, p in grid]))
    frac2 = None
    if L_strong_run2 is not None and L_strong_run2 + 1 < ranks.shape[0]:
        frac2 = float(np.mean([r1(L_strong_run2, p) and r1(L_strong_run2 + 1, p) for _, p in grid]))
    return {"grid": [f for f, _ in grid], "positions": [p for _, p in grid], "L_semantic_norm": L_semantic,
            "rank1_frac": frac, "n_positions": len(grid), "rank1_frac_strong_run2": frac2}


# ==================================================================================================
# Measurement guidance (§2.26), evaluation pack and its CSVs (§2.28)
# ==================================================================================================

REASON_ORDER = ("warn_high_last_layer_kl", "norm_only_semantics_window", "high_lens_artifact_risk",
                "high_lens_artifact_score", "repeatability_variance_high", "repeatability_forward_disagreement",
                "gold_alignment_partial", "nondeterministic_env", "normalization_spike", "numeric_health_caution",
                "copy_mask_missing", "copy_mask_error", "layer_map_missing", "rank_only_near_uniform",
                "decoding_point_sensitive", "low_lens_consistency_at_semantic", "tuned_is_calibration_only",
                "pos_window_low_stability", "scale_sensitive_semantic_gate")

FLAG_ORDER = ("decoding_point_sensitive", "rank_only_near_uniform", "repeatability_variance_high",
              "repeatability_skipped", "repeatability_unavailable", "repeatability_forward_disagreement",
              "repeatability_forward_skipped", "gold_alignment_partial", "pos_window_low_stability",
              "nondeterministic", "normalization_spike", "numeric_health_caution", "copy_mask_missing",
              "copy_mask_error", "layer_map_missing", "low_lens_consistency_at_semantic")


def diagnostic_flags(raised: Mapping) -> dict:
    """``diagnostics.flags``: the raised flags (truthy values) in the reference's order."""
    return {k: raised[k] for k in FLAG_ORDER if raised.get(k)}


def measurement_guidance(reasons_raised: Mapping, *, prefer_tuned: Optional[bool] = None,
                         tuned_hint: Optional[str] = None, L_semantic_confirmed: Optional[int] = None,
                         nondeterministic: bool = False) -> dict:
    """§2.26: reasons (in the reference order, deduplicated), prefer_ranks / suppress_abs_probs = any
    reason, preferred lens ("tuned" when the tuned attribution prefers it, forced "norm" when the tuned
    audit says calibration-only), the tuned hint, use_confirmed_semantics and the notes."""
    reasons = [r for r in REASON_ORDER if reasons_raised.get(r)]
    lens = "tuned" if prefer_tuned else "norm"
    if tuned_hint == "tuned_for_calibration_only":
        lens = "norm"
    note = "Prism is diagnostic-only; treat probabilities comparatively within model."
    if nondeterministic:
        note = "Run used nondeterministic kernels; treat small differences as noise. " + note
    return {"prefer_ranks": bool(reasons), "suppress_abs_probs": bool(reasons), "reasons": reasons,
            "notes": "Family-level head calibration; treat probabilities comparatively only within model.",
            "preferred_lens_for_reporting": lens, "preferred_semantics_lens_hint": tuned_hint,
            "use_confirmed_semantics": L_semantic_confirmed is not None, "notes_append": note}


def _soft_milestone(summary: Mapping) -> tuple:
    soft = summary.get("L_copy_soft") or {}
    best = None
    for k in sorted(int(x) for x in soft):
        v = soft.get(k, soft.get(str(k)))
        if v is not None and (best is None or v < best[1]):
            best = (k, v)
    return best if best else (None, None)


def evaluation_pack(*, model_name: str, n_layers: int, summary: Mapping, confirmed: Mapping, artifact: Mapping,
                    repeat: Mapping, repeat_flag: str, gold_rate, gold_variant, trajectory: Mapping,
                    tuned_audit: Optional[Mapping], files: Mapping, micro: Optional[Mapping],
                    preferred_lens: str, use_confirmed: bool) -> dict:
    """``evaluation_pack`` (§2.28) from fact-0 pos/orig data."""
    L_strict = summary.get("L_copy")
    k_soft, L_soft = _soft_milestone(summary)
    L_sem = summary.get("L_semantic")
    base = L_strict if L_strict is not None else L_soft
    ent = summary.get("entropy_gap_bits_percentiles") or {}
    ms_facts = []
    agg = {}
    cites = {}
    if micro:
        for f in micro.get("facts", []):
            ms_facts.append({k: f.get(k) for k in ("fact_key", "fact_index", "L_copy_strict", "L_semantic_norm",
                                                   "L_semantic_confirmed", "L_semantic_margin_ok_norm", "delta_hat")})
        a = micro.get("aggregates", {})
        agg = {k: a.get(k) for k in ("L_semantic_confirmed_median", "delta_hat_median", "n_missing", "n")}
        cites = micro.get("citations", {})
    return {
        "model": model_name, "n_layers": n_layers, "preferred_lens_for_reporting": preferred_lens,
        "use_confirmed_semantics": bool(use_confirmed),
        "milestones": {
            "L_copy_strict": L_strict, "L_copy_soft": {"k": k_soft, "layer": L_soft}, "L_semantic_norm": L_sem,
            "L_semantic_confirmed": {"layer": confirmed.get("L_semantic_confirmed"),
                                     "source": confirmed.get("confirmed_source")},
            "depth_fractions": {"copy_strict_frac": M.depth_fraction(L_strict, n_layers, 4),
                                "semantic_frac": M.depth_fraction(L_sem, n_layers, 4),
                                "delta_hat": (None if L_sem is None or base is None or not n_layers
                                              else round((L_sem - base) / float(n_layers), 4))}},
        "artifact": dict(artifact),
        "repeatability": {"max_rank_dev": repeat.get("max_rank_dev"), "p95_rank_dev": repeat.get("p95_rank_dev"),
                          "top1_flip_rate": repeat.get("top1_flip_rate"), "flag": repeat_flag},
        "alignment": {"gold_alignment_rate": gold_rate, "variant": gold_variant},
        "norm_trajectory": {k: trajectory.get(k) for k in ("shape", "slope", "r2", "n_spikes")},
        "entropy": {"entropy_gap_bits_p25": ent.get("p25"), "entropy_gap_bits_p50": ent.get("p50"),
                    "entropy_gap_bits_p75": ent.get("p75")},
        "tuned_audit": tuned_audit,
        "citations": {"layers": {"L_copy_strict_row": L_strict, "L_copy_soft_row": L_soft,
                                 "L_semantic_norm_row": L_sem,
                                 "L_semantic_confirmed_row": confirmed.get("L_semantic_confirmed")},
                      "files": dict(files)},
        "micro_suite": {"facts": ms_facts, "aggregates": agg, "citations": cites},
    }


def milestone_rows(summary: Mapping, confirmed: Mapping, pure_by_layer: Mapping) -> list:
    """The 4 rows of ``-milestones.csv`` (§2.28): strict copy, soft copy, semantic (norm), semantic
    (confirmed; lens = confirmed_source), each with the fact-0 pure-row values at that layer."""
    k_soft, L_soft = _soft_milestone(summary)
    specs = [(summary.get("L_copy"), "is_copy_strict", "norm"), (L_soft, "is_copy_soft_k", "norm"),
             (summary.get("L_semantic"), "is_semantic_norm", "norm"),
             (confirmed.get("L_semantic_confirmed"), "is_semantic_confirmed",
              confirmed.get("confirmed_source") or "none")]
    out = []
    for layer, which, lens in specs:
        r = pure_by_layer.get(layer, {}) if layer is not None else {}
        row = {"layer": layer, "csv_row_index": layer, "is_copy_strict": False,
               "is_copy_soft_k": k_soft if (which == "is_copy_soft_k" and layer is not None) else None,
               "is_semantic_norm": False, "is_semantic_confirmed": False,
               "answer_rank": r.get("answer_rank"), "p_answer": r.get("p_answer"),
               "kl_to_final_bits": r.get("kl_to_final_bits"), "entropy_bits": r.get("entropy_bits"), "lens": lens}
        if which != "is_copy_soft_k":
            row[which] = layer is not None
        out.append(row)
    return out


def artifact_audit_rows(full_rows_primary: Sequence[Mapping], summary: Mapping, score: Mapping) -> list:
    """``-artifact-audit.csv`` (§2.28): a ``_summary`` row (JS p50, median reverse KL, L1 p50, Jaccard p50,
    score v2, tier), then one row per layer of the fact-0 full sweep."""
    rev = [r["kl_raw_to_norm_bits"] for r in full_rows_primary]
    out = [{"layer": "_summary", "js_divergence": summary["js_divergence_percentiles"]["p50"],
            "kl_raw_to_norm_bits": M.percentile(rev, 0.5),
            "l1_prob_diff": summary["l1_prob_diff_percentiles"]["p50"],
            "topk_jaccard_raw_norm@50": summary["topk_overlap"]["jaccard_raw_norm_p50"],
            "lens_artifact_score_v2": score.get("lens_artifact_score_v2"), "risk_tier": score.get("tier")}]
    for r in full_rows_primary:
        out.append({"layer": r["layer"], "js_divergence": r["js_divergence"],
                    "kl_raw_to_norm_bits": r["kl_raw_to_norm_bits"], "l1_prob_diff": r["l1_prob_diff"],
                    "topk_jaccard_raw_norm@50": r["topk_jaccard_raw_norm@50"]})
    return out


def _f(x) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return x


# ==================================================================================================
# Pipeline glue: the decode stage (before pass_metrics) and the summary stage (after it)
# ==================================================================================================

@dataclasses.dataclass(frozen=True)
class DiagnosticsOptions:
    """Run-level switches (spec §1.1 environment knobs).

    ``raw_lens_mode``: "sample" (default), "full" or "off" - which layers the sampled raw-lens check
    (``raw_lens_check``) reports; the full sweep and the windowed check run regardless (env
    ``LOGOS_RAW_LENS``). ``repeat_forward``: "auto" (default: skipped when the re-decode is exactly
    repeatable on a deterministic backend), "always" or "off" (env ``LOGOS_REPEAT_FORWARD``).
    """

    raw_lens_mode: str = "sample"
    repeat_forward: str = "auto"
    deterministic: bool = True

    @classmethod
    def from_env(cls, raw_lens_mode: Optional[str] = None,
                 repeat_forward: Optional[str] = None) -> "DiagnosticsOptions":
        rl = (raw_lens_mode or os.environ.get("LOGOS_RAW_LENS") or "sample").strip().lower()
        rf = (repeat_forward or os.environ.get("LOGOS_REPEAT_FORWARD") or "auto").strip().lower()
        if rl not in ("off", "sample", "full"):
            raise JaxlensError(f"raw-lens mode must be off, sample or full; got {rl!r}")
        if rf not in ("auto", "always", "off"):
            raise JaxlensError(f"repeat-forward mode must be auto, always or off; got {rf!r}")
        return cls(raw_lens_mode=rl, repeat_forward=rf)


@dataclasses.dataclass
class TunedInputs:
    """What the diagnostics take from a tuned lens (every field optional; ``tuned=None`` = "disabled").

    ``lens``: an :class:`jaxlens.AffineLens`, decoded at the lens-consistency targets (norm_vs_tuned);
    ``primary_ranks``: {layer: tuned answer rank} of the primary pass (confirmed semantics);
    ``prefer_tuned``: ``tuned_lens.attribution.prefer_tuned`` (preferred lens for reporting);
    ``audit_summary``: ``tuned_lens.audit_summary`` (``tuned_is_calibration_only``,
    ``preferred_semantics_lens_hint``; the evaluation pack's ``tuned_audit``).
    """

    lens: Any = None
    primary_ranks: Optional[Mapping] = None
    prefer_tuned: Optional[bool] = None
    audit_summary: Optional[Mapping] = None


@dataclasses.dataclass
class DecodeDiagnostics:
    """Per-row arrays of the fused decode stage ([n+1, B] unless noted; B = passes in probe order)."""

    tau: np.ndarray                      # [n+1] norm-lens temperatures (§2.13)
    calibration: dict                    # JSON description of the fit (Q14 note)
    kl_temp: np.ndarray                  # kl_to_final_bits_norm_temp
    pair: dict                           # kl_norm_vs_raw, kl_raw_to_norm, js, l1 (bits / prob)
    jaccard_raw_norm: np.ndarray
    jaccard_consecutive: np.ndarray      # NaN at layer 0
    geometry: dict                       # resid_geometry arrays
    numeric: dict                        # primary pass: max_abs_logit, min_prob, logit_nan, logit_inf [n+1]
    redecode_top_ids: np.ndarray         # [n+1, B, k] re-decoded norm top-k ids
    pure_columns: list                   # per pass: pure CSV columns for pass_metrics
    timings: dict


def _pass_key(spec) -> tuple:
    return (spec.prompt_id, spec.variant, spec.fact_index)


def decode_diagnostics(model, suite, inputs: Sequence, dec: Mapping, quirks: M.ReferenceQuirks = M.ReferenceQuirks()
                       ) -> DecodeDiagnostics:
    """All vocabulary-sized diagnostic work of the probe, as fused batched calls on the cached forward:
    the raw-vs-norm pair statistics (one ``pair_stats`` pass), the norm-temperature grid over the
    calibration rows (one streaming pass), the tempered KL of every pass together with the re-decode
    check (one stacked ``lens_stats`` pass: [norm; norm / tau]) and top-k Jaccards (no vocab work).

    ``dec`` is :func:`jaxlens.probe.run_passes`' output (``last`` / ``raw_last`` from
    :func:`last_position_stats`, ``last_kwargs``, ``fw``)."""
    import time

    t0 = time.perf_counter()
    spec = model.spec
    th = suite.thresholds
    n = spec.n_layers
    fw = dec["fw"]
    norm, raw = dec["last"], dec["raw_last"]
    B = len(inputs)
    h_norm = np.asarray(norm.rows)[:, :, 0]                      # [R, B, d]
    h_raw = np.asarray(raw.rows)[:, :, 0]
    geo = resid_geometry(h_raw.astype(np.float32), h_norm.astype(np.float32))
    W, bias = unembedding(spec, model.params)
    pair = stream.pair_stats(h_norm, h_raw, W, bias, spec.final_softcap, norm.lse[:, :, 0], raw.lse[:, :, 0])
    pair = {"kl_norm_vs_raw": np.asarray(pair["kl_ab_bits"]), "kl_raw_to_norm": np.asarray(pair["kl_ba_bits"]),
            "js": np.asarray(pair["js_bits"]), "l1": np.asarray(pair["l1"])}
    t1 = time.perf_counter()
    K = int(th.raw_lens.topk_jaccard_k)
    if norm.top_ids.shape[-1] < K:
        raise JaxlensError(f"the last-position decode kept only the top {norm.top_ids.shape[-1]} ids; "
                           f"the raw-vs-norm Jaccard needs {K}")
    tn, tr = norm.top_ids[:, :, 0, :K], raw.top_ids[:, :, 0, :K]
    jr = topk_jaccard_np(tn, tr)
    jc = np.full_like(jr, np.nan, dtype=np.float64)
    jc[1:] = topk_jaccard_np(tn[1:], tn[:-1])

    # norm temperatures: one grid pass over the calibration rows (+ the primary's rows for numeric health)
    keys = [_pass_key(p.spec) for p in inputs]
    cal = [keys.index(_pass_key(p)) for p in suite.calibration_passes]
    rows_b = list(cal) + ([0] if 0 not in cal else [])
    lengths = np.asarray(dec["mask"]).sum(1)
    rb = np.asarray(rows_b)
    final = np.asarray(fw.logits[rb, lengths[rb] - 1])                                          # [P, V], one gather
    R = n + 1
    hh = np.transpose(h_norm[:, rows_b], (1, 0, 2)).reshape(len(rows_b) * R, -1)
    tg = th.norm_temperature
    grid = temperature_grid(tg.grid_min, tg.grid_max, tg.grid_points)
    g = calibration_grid_stats(hh, W, final, np.repeat(np.arange(len(rows_b)), R), grid, bias=bias,
                               softcap=spec.final_softcap)
    ce = g["ce_bits"].reshape(len(rows_b), R, -1)[:len(cal)]
    tau = fit_norm_temperatures(ce, grid)
    p0 = rows_b.index(0)
    sl = slice(p0 * R, (p0 + 1) * R)
    zmax, zmin = g["max_logit"][sl], g["min_logit"][sl]
    lse0 = norm.lse[:, 0, 0]
    n_nan, n_bad = g["n_nan"][sl], g["n_nonfinite"][sl]
    with np.errstate(invalid="ignore", over="ignore"):
        numeric = {"max_abs_logit": np.maximum(np.abs(zmax), np.abs(zmin)), "min_prob": np.exp(zmin - lse0),
                   "logit_nan": n_nan > 0, "logit_inf": n_bad > n_nan}
    t2 = time.perf_counter()
    # One stacked decode gives the tempered KL of every pass AND the re-decode micro-check (§2.23): its
    # norm block is the probe's last-position norm decode again, in a kernel of the same shapes as the
    # original [norm; raw] decode (dividing by a temperature of exactly 1 changes no bit).
    kw = {k: v for k, v in dec["last_kwargs"].items() if k in ("gold_ids", "top_k")}
    again, tempered = multi_lens_stats(model, fw, ("norm", TemperedLens(tau)), positions="last", cosine=False, **kw)
    kl_temp = np.asarray(tempered.kl_to_final_bits)[:, :, 0]
    t3 = time.perf_counter()

    saturated = [int(i) for i, t in enumerate(tau) if t in (grid[0], grid[-1])]
    calibration = {
        "objective": "argmin over the grid of the mean over the calibration prompts of CE(P_final, softmax(z/tau))",
        "grid": {"min": float(tg.grid_min), "max": float(tg.grid_max), "points": int(tg.grid_points), "spacing": "log"},
        "prompts": [{"prompt_id": p.prompt_id, "prompt_variant": p.variant, "fact_key": p.fact_key}
                    for p in suite.calibration_passes],
        "in_sample": True,
        "saturated_layers": saturated,
        "note": ("Q14 (reproduced): the temperatures are fitted on the calibration prompts, which are also "
                 "evaluated passes (in-sample), and the grid saturates at its ends; kl_to_final_bits_norm_temp "
                 "can exceed kl_to_final_bits where one tau is shared by the prompts."),
    }

    # pure-row columns (N2: the reference writes the last pos pass's Jaccards of the same variant into every
    # pos row of that variant)
    last_of = {}
    for b, p in enumerate(inputs):
        if p.spec.prompt_id == "pos":
            last_of[p.spec.variant] = b
    cols = []
    for b, p in enumerate(inputs):
        jb = last_of[p.spec.variant] if (quirks.n2_jaccard_writeback_by_variant and p.spec.prompt_id == "pos") else b
        cols.append({
            "kl_to_final_bits_norm_temp": [float(x) for x in kl_temp[:, b]],
            "topk_jaccard_raw_norm@50": [float(x) for x in jr[:, jb]],
            "topk_jaccard_consecutive@50": [None] + [float(x) for x in jc[1:, jb]],
            "resid_norm_ratio": [float(x) for x in geo["resid_norm_ratio"][:, b]],
            "delta_resid_cos": [float(x) for x in geo["delta_resid_cos"][:, b]],
        })
    return DecodeDiagnostics(tau=tau, calibration=calibration, kl_temp=kl_temp, pair=pair, jaccard_raw_norm=jr,
                             jaccard_consecutive=jc, geometry=geo, numeric=numeric,
                             redecode_top_ids=np.asarray(again.top_ids)[:, :, 0], pure_columns=cols,
                             timings={"pair_s": t1 - t0, "calibration_s": t2 - t1, "norm_temp_redecode_s": t3 - t2})


@dataclasses.dataclass
class DiagnosticsResult:
    """Everything the summary stage produced: JSON blocks by section (in the reference's key order),
    top-level JSON blocks, CSV rows, and the pieces the evaluation pack needs."""

    sections: dict            # section name -> {json key: value}
    top_level: dict           # raw_lens_check, measurement_guidance
    sidecars: dict            # csv kind -> rows
    confirmed: dict
    pack_inputs: dict
    timings: dict

    def json(self, section: str) -> dict:
        return dict(self.sections.get(section, {}))

    @property
    def L_semantic_confirmed(self) -> Optional[int]:
        return self.confirmed.get("L_semantic_confirmed")

    def evaluation_pack(self, micro: Optional[Mapping], files: Mapping) -> dict:
        return evaluation_pack(micro=micro, files=files, **self.pack_inputs)


def _pass_layer_data(b: int, res, norm, raw, dd: DecodeDiagnostics, decode) -> dict:
    """Per-layer raw-vs-norm data of pass b (the full-sweep row fields, plus p_top2 and is_answer)."""
    gid = res.inp.gold.first_id
    gstr = res.inp.gold.string if res.inp.gold.ok else None
    teacher = res.pure["teacher_entropy_bits"][0]
    layers = {}
    for layer in range(norm.entropy_bits.shape[0]):
        d = {}
        for lens, st in (("norm", norm), ("raw", raw)):
            tid = int(st.top_ids[layer, b, 0, 0])
            d[f"p_top1_{lens}"] = float(st.top_probs[layer, b, 0, 0])
            d[f"p_top2_{lens}"] = float(st.top_probs[layer, b, 0, 1])
            d[f"top1_token_id_{lens}"] = tid
            d[f"top1_token_str_{lens}"] = decode(tid)
            d[f"p_answer_{lens}"] = None if gid is None else float(st.gold_prob[layer, b, 0])
            d[f"answer_rank_{lens}"] = None if gid is None else int(st.gold_rank[layer, b, 0])
            d[f"is_answer_{lens}"] = _is_answer(d[f"answer_rank_{lens}"], d[f"top1_token_str_{lens}"], gid, gstr)
        d["kl_norm_vs_raw_bits"] = float(dd.pair["kl_norm_vs_raw"][layer, b])
        d["kl_raw_to_norm_bits"] = float(dd.pair["kl_raw_to_norm"][layer, b])
        d["js_divergence"] = float(dd.pair["js"][layer, b])
        d["entropy_bits_norm"] = float(norm.entropy_bits[layer, b, 0])
        d["entropy_bits_raw"] = float(raw.entropy_bits[layer, b, 0])
        d["entropy_gap_bits"] = None if teacher is None else d["entropy_bits_norm"] - float(teacher)
        d["l1_prob_diff"] = float(dd.pair["l1"][layer, b])
        d["topk_jaccard_raw_norm@50"] = float(dd.jaccard_raw_norm[layer, b])
        d["topk_jaccard_consecutive@50"] = None if layer == 0 else float(dd.jaccard_consecutive[layer, b])
        d["norm_only_semantics"] = bool(d["is_answer_norm"] and not d["is_answer_raw"])
        layers[layer] = d
    return {"layers": layers}


def _int_or_none(x) -> Optional[int]:
    return int(x) if isinstance(x, (int, np.integer)) and not isinstance(x, bool) else None


def run_diagnostics(model, suite, inputs: Sequence, results: Sequence, dec: Mapping, dd: DecodeDiagnostics, decode,
                    quirks: M.ReferenceQuirks = M.ReferenceQuirks(), *, options: Optional[DiagnosticsOptions] = None,
                    tuned: Optional[TunedInputs] = None, rerun: Optional[Callable[[], tuple]] = None,
                    files: Optional[Mapping] = None) -> DiagnosticsResult:
    """The summary stage (after ``pass_metrics``): every diagnostics block of spec §2.12-2.20, §2.23,
    §2.26, §2.28 from the cached decodes - no vocabulary pass except one small batched matmul over the
    primary pass's target rows. Mutates the pass summaries where the reference does
    (``copy_thresholds.norm_only_flags`` of every pass; the confirmed fields of the primary summary).

    ``rerun``: a callable that repeats the primary pass (forward + decode + metrics) and returns
    (PassResult, norm LensStats); called only when the forward-of-two gate runs.
    """
    import time

    t0 = time.perf_counter()
    opts = options or DiagnosticsOptions()
    spec = model.spec
    th = suite.thresholds
    n = spec.n_layers
    V = spec.vocab_size
    norm, raw = dec["last"], dec["raw_last"]
    fw = dec["fw"]
    prim = results[0]
    s0 = prim.summary
    gid = prim.inp.gold.first_id
    T0 = len(prim.inp.input_ids)

    # ---- raw-vs-norm: full sweep (every pass), samples, windows (§2.15) ------------------------------
    data = [_pass_layer_data(b, res, norm, raw, dd, decode) for b, res in enumerate(results)]
    keys = [{"fact_key": r.inp.spec.fact_key, "fact_index": r.inp.spec.fact_index, "prompt_id": r.inp.spec.prompt_id,
             "prompt_variant": r.inp.spec.variant} for r in results]
    full = [full_rows(d, k) for d, k in zip(data, keys)]
    full_sum0 = full_summary(full[0], n_layers=n, teacher_entropy_bits=prim.pure["teacher_entropy_bits"][0],
                             th=th.raw_lens)
    score = artifact_score(full_sum0["pct_layers_kl_ge_1.0"], full_sum0["n_norm_only_semantics_layers"],
                           full_sum0["max_kl_norm_vs_raw_bits"], full_sum0["js_divergence_percentiles"]["p50"],
                           full_sum0["l1_prob_diff_percentiles"]["p50"], th.artifact_score)
    full_sum0["score"] = score

    sample_layers = raw_sample_layers(n, opts.raw_lens_mode)
    sampled = [b for b, r in enumerate(results)
               if r.inp.spec.prompt_id == "pos" and r.inp.spec.variant == suite.primary_variant]
    samples_by_pass = {b: raw_samples(data[b], sample_layers) for b in sampled}
    samples = [s for b in sampled for s in samples_by_pass[b]]
    rl = th.raw_lens
    summ_primary = raw_sample_summary(samples_by_pass.get(0, []), high_kl=rl.risk_high_kl_bits,
                                      medium_kl=rl.risk_medium_kl_bits)
    sample_summary = summ_primary if quirks.q5_raw_sample_summary_once else raw_sample_summary(
        samples, high_kl=rl.risk_high_kl_bits, medium_kl=rl.risk_medium_kl_bits)
    radius_all = window_radius(sample_summary, base=rl.window_radius, high=rl.window_radius_high_risk,
                               high_kl=rl.risk_high_kl_bits)
    win_rows, win_sum0 = [], None
    for b, res in enumerate(results):
        R_b = rl.window_radius if (quirks.q5_raw_sample_summary_once and b == 0) else radius_all
        centres = window_centres(res.summary, n)
        layers = window_layers(centres, R_b, n)
        rows = window_rows(data[b], layers, keys[b], ctx_ids=res.inp.ctx_ids, copy_cfg=th.copy)
        ct = res.summary.get("copy_thresholds")
        if ct is not None:
            ct["norm_only_flags"] = M.copy_norm_only_flags(ct["L_copy_strict"], rows, R_b)
        if b == 0:
            win_sum0 = window_summary(rows, centres, layers, R_b)
        win_rows.extend(rows)
    csv_cols = set(("fact_key", "fact_index", "prompt_id", "prompt_variant", "layer", "lens", "p_top1", "top1_token_id",
                    "top1_token_str", "p_answer", "answer_rank", "kl_norm_vs_raw_bits"))
    win_csv = [{k: v for k, v in r.items() if k in csv_cols} for r in win_rows]

    # ---- confirmed semantics (§2.16) ------------------------------------------------------------------
    raw_ranks = {layer: d["answer_rank_raw"] for layer, d in data[0]["layers"].items()}
    tuned_ranks = dict(tuned.primary_ranks) if (tuned is not None and tuned.primary_ranks) else None
    confirmed = confirmed_semantics(s0.get("L_semantic"), raw_ranks, tuned_ranks, window=th.semantic.confirm_window)
    L_conf = confirmed["L_semantic_confirmed"]
    M.add_confirmed_fields(s0, L_conf, window=th.semantic.confirm_window)

    # ---- the primary pass's target rows: one batched matmul -----------------------------------------
    def named(pairs):
        return [(nm, int(v)) for nm, v in pairs if _int_or_none(v) is not None and 0 <= int(v) <= n]
    ms0 = semantic_milestones(s0)
    lc_targets = named([("first_rank_le_10", ms0["first_rank_le_10"]), ("first_rank_le_5", ms0["first_rank_le_5"]),
                        ("L_semantic_norm", ms0["L_semantic"]), ("L_semantic_strong", ms0["L_semantic_strong"]),
                        ("L_semantic_strong_run2", ms0["L_semantic_strong_run2"])])
    dp_targets = decoding_point_targets(s0, n)
    gs_targets = named([("L_semantic_norm", ms0["L_semantic"]), ("L_semantic_strong", ms0["L_semantic_strong"]),
                        ("L_semantic_strong_run2", ms0["L_semantic_strong_run2"])])
    has_ln2 = bool(spec.pre_mlp_norm) and "ln2" in model.params["blocks"]
    dp_ok = [layer for _, layer in dp_targets if layer >= 1 and has_ln2]
    norm_layers = sorted({layer for _, layer in lc_targets + dp_targets + gs_targets} | {n}
                         | {layer + 1 for nm, layer in gs_targets if nm == "L_semantic_strong_run2" and layer < n})
    raw_layers = sorted({layer for _, layer in lc_targets})
    post_layers = sorted(set(dp_ok))
    tuned_layers = raw_layers if (tuned is not None and tuned.lens is not None) else []
    tz = target_logits(model, fw, 0, T0 - 1, norm_layers=norm_layers, raw_layers=raw_layers,
                       post_layers=post_layers, tuned_lens=None if tuned is None else tuned.lens,
                       tuned_layers=tuned_layers)
    norm_z, raw_z, post_z, tuned_z = tz["norm"], tz["raw"], tz["post_ln2"], tz["tuned"]
    z_final = np.asarray(fw.logits[0, T0 - 1])

    # ---- §2.12 last-layer consistency --------------------------------------------------------------
    ll = th.last_layer
    llc = last_layer_consistency(norm_z[n], z_final, gid, z_pre=tz["norm_pre"][n],
                                 transforms=head_transforms(getattr(model, "config", None)),
                                 softcap_in_lens=spec.final_softcap, warn_kl_bits=ll.warn_kl_bits,
                                 grid=temperature_grid(ll.temp_grid_min, ll.temp_grid_max, ll.temp_grid_points))

    # ---- §2.17 lens consistency, §2.18 decoding point, §2.19 gate stability ---------------------------
    others = {"raw": raw_z}
    if tuned_layers:
        others["tuned"] = tuned_z
    lcons = lens_consistency(lc_targets, norm_z, others, L_semantic_confirmed=L_conf, th=th.lens_consistency)
    low_consistency = lcons.pop("low_lens_consistency_at_semantic")
    dp_entries = []
    for nm, layer in dp_targets:
        if layer < 1:
            dp_entries.append({"name": nm, "layer": layer, "status": "missing_block"})
        elif not has_ln2:
            dp_entries.append({"name": nm, "layer": layer, "status": "missing_ln2"})
        else:
            dp_entries.append(decoding_point_entry(nm, layer, post_z[layer], norm_z[layer], gid))
    dp = decoding_point(dp_entries, dp_targets, tested=bool(post_layers), L_semantic_confirmed=L_conf,
                        jaccard_min=th.decoding_point.jaccard_at_10_min)
    gst = th.gate_stability
    gs = gate_stability(gs_targets, norm_z, gid, vocab_size=V, scales=gst.scales,
                        delta_abs=th.semantic.margin_delta_abs, delta_top2=th.semantic.top2_delta_logit)

    # ---- §2.14 provenance / trajectory, §2.20 numeric health ----------------------------------------
    geo0 = {k: v[:, 0] for k, v in dd.geometry.items()}
    prov = normalization_provenance(spec, geo0, ablation_ran=bool(post_layers))
    tr = th.trajectory
    traj = norm_trajectory(prov["per_layer"], s0.get("L_semantic"), spike_ratio=tr.spike_ratio, spike_cos=tr.spike_cos,
                           plateau_slope=tr.plateau_slope, monotonic_r2=tr.monotonic_r2)
    num = dd.numeric
    nh = numeric_health(list(range(n + 1)),
                        nan_flags=list(geo0["nan_raw"] | geo0["nan_norm"] | num["logit_nan"]),
                        inf_flags=list(geo0["inf_raw"] | geo0["inf_norm"] | num["logit_inf"]),
                        max_abs_logit=list(num["max_abs_logit"]), min_prob=list(num["min_prob"]),
                        L_copy=s0.get("L_copy"), L_semantic=s0.get("L_semantic"))
    nh_caution = nh.pop("_caution")

    # ---- §2.23 repeatability -------------------------------------------------------------------------
    rep = repeatability(norm.top_ids[:, 0, 0], dd.redecode_top_ids[:, 0], deterministic=opts.deterministic)
    rep_high = repeatability_flag(rep, th.repeatability)
    rt = th.repeatability
    k_fw = 5 if quirks.q13_forward_jaccard_top5 else int(rt.forward_topk_k)
    flags_raised: dict = {}
    if opts.repeat_forward == "off":
        rf = forward_gate("disabled", pass1=preferred_milestone(s0, L_conf), tolerance=rt.forward_tolerance_layers,
                          jaccard_min=rt.forward_topk_jaccard_min, topk_k=rt.forward_topk_k)
    elif opts.repeat_forward == "auto" and opts.deterministic and (rep.get("max_rank_dev") or 0) == 0:
        rf = forward_gate("skipped_deterministic", pass1=preferred_milestone(s0, L_conf),
                          tolerance=rt.forward_tolerance_layers, jaccard_min=rt.forward_topk_jaccard_min,
                          topk_k=rt.forward_topk_k)
        flags_raised["repeatability_forward_skipped"] = "deterministic_env"
    elif rerun is None:
        rf = forward_gate("disabled", pass1=preferred_milestone(s0, L_conf), tolerance=rt.forward_tolerance_layers,
                          jaccard_min=rt.forward_topk_jaccard_min, topk_k=rt.forward_topk_k)
    else:
        res2, last2 = rerun()
        p1 = preferred_milestone(s0, L_conf)
        # pass 2 has no raw / tuned corroboration: its "confirmed" layer is its norm L_semantic (as for pass 1)
        p2 = preferred_milestone(res2.summary, res2.summary.get("L_semantic") if L_conf is not None else None)
        t1 = t2 = None
        if p1[1] is not None:
            t1 = [decode(int(x)) for x in norm.top_ids[p1[1], 0, 0, :k_fw]]
            t2 = [decode(int(x)) for x in np.asarray(last2.top_ids)[p1[1], 0, 0, :k_fw]]
        rf = forward_gate("ran", pass1=p1, pass2=p2, topk1=t1, topk2=t2, tolerance=rt.forward_tolerance_layers,
                          jaccard_min=rt.forward_topk_jaccard_min, topk_k=rt.forward_topk_k)

    # ---- position window (Q3 fixed: the gold is scored at every grid position) -----------------------
    allpos = dec["allpos"]
    scored = gid is not None and allpos.gold_rank is not None
    pw = position_window(np.asarray(allpos.gold_rank)[:, 0, :T0] if scored else np.zeros((n + 1, T0), np.int64), T0,
                         L_semantic=s0.get("L_semantic") if scored else None,
                         L_strong_run2=ms0["L_semantic_strong_run2"] if scored else None,
                         last_position_only=quirks.q3_position_window_last_only)

    # ---- flags, guidance (§2.26) ---------------------------------------------------------------------
    gold_ok = [r.inp.gold.ok for r in results]
    gold_rate = sum(gold_ok) / float(len(gold_ok)) if gold_ok else None
    audit = dict(tuned.audit_summary) if (tuned is not None and tuned.audit_summary) else None
    calib_only = bool(audit and audit.get("tuned_is_calibration_only"))
    margin_at_sem = (s0.get("semantic_margin") or {}).get("margin_ok_at_L_semantic_norm")
    raised = {
        "warn_high_last_layer_kl": llc["warn_high_last_layer_kl"],
        "norm_only_semantics_window": bool(win_sum0 and win_sum0["norm_only_semantics_layers"]),
        "high_lens_artifact_risk": bool(sample_summary and sample_summary["lens_artifact_risk"] == "high"),
        "high_lens_artifact_score": score.get("tier") == "high",
        "repeatability_variance_high": rep_high,
        "repeatability_forward_disagreement": rf["gate"]["repeatability_forward_pass"] is False,
        "gold_alignment_partial": gold_rate is not None and gold_rate < 1.0,
        "nondeterministic_env": not opts.deterministic,
        "normalization_spike": traj["n_spikes"] > 0,
        "numeric_health_caution": nh_caution,
        "rank_only_near_uniform": s0.get("L_semantic") is not None and margin_at_sem is False,
        "decoding_point_sensitive": dp["gate"]["decoding_point_consistent"] is False,
        "low_lens_consistency_at_semantic": low_consistency,
        "tuned_is_calibration_only": calib_only,
        "pos_window_low_stability": pw["rank1_frac"] is not None and pw["rank1_frac"] < 0.5,
        "scale_sensitive_semantic_gate": (gs["min_both_gates_pass_frac"] is not None
                                          and gs["min_both_gates_pass_frac"] < gst.min_both_gates_pass_frac),
    }
    flags = diagnostic_flags(dict(raised, nondeterministic=raised["nondeterministic_env"], **flags_raised))
    guidance = measurement_guidance(raised, prefer_tuned=None if tuned is None else tuned.prefer_tuned,
                                    tuned_hint=None if audit is None else audit.get("preferred_semantics_lens_hint"),
                                    L_semantic_confirmed=L_conf, nondeterministic=raised["nondeterministic_env"])

    # ---- JSON sections in the reference order ---------------------------------------------------------
    snaps = norm_temp_snapshots(dd.kl_temp[:, 0], n, th.norm_temperature.snapshot_fractions)
    prism = {"mode": "off", "artifact_path": None, "present": False, "compatible": False, "k": None, "layers": None,
             "error": None, "metrics": None}
    sections = {
        "head": {"flags": flags, "prism_summary": prism},
        "calibration": {"tau_norm_per_layer": [float(t) for t in dd.tau], "tau_norm_calibration": dd.calibration},
        "per_pass": {"gate_stability_small_scale": gs, "raw_lens_window": win_sum0, "raw_lens_full": full_sum0,
                     "normalization_provenance": prov, "layer_map": layer_map(spec), "numeric_health": nh,
                     "repeatability": rep, "decoding_point": dp, "lens_consistency": lcons},
        "run": dict({"repeatability_forward": rf, "last_layer_consistency": llc}, **snaps),
        "post": {"confirmed_semantics": confirmed, "L_semantic_confirmed": L_conf,
                 "config": artifact_score_config(th.artifact_score)},
        "tail": {"position_window": pw, "norm_trajectory": traj},
    }
    raw_check = {"mode": opts.raw_lens_mode, "samples": samples, "summary": sample_summary}
    pure0 = {layer: {"answer_rank": prim.pure["answer_rank"][i], "p_answer": prim.pure["p_answer"][i],
                     "kl_to_final_bits": prim.pure["kl_to_final_bits"][i], "entropy_bits": prim.pure["entropy_bits"][i]}
             for i, layer in enumerate(prim.pure["layer"])}
    sidecars = {"pure-next-token-rawlens": [r for rows in full for r in rows],
                "pure-next-token-rawlens-window": win_csv,
                "milestones": milestone_rows(s0, confirmed, pure0),
                "artifact-audit": artifact_audit_rows(full[0], full_sum0, score)}
    rep_flag = "high_variance" if rep_high else "ok"
    pack_inputs = dict(
        model_name=model.name, n_layers=n, summary=s0, confirmed=confirmed,
        artifact={"lens_artifact_score": score["lens_artifact_score"],
                  "lens_artifact_score_v2": score["lens_artifact_score_v2"],
                  "js_divergence_p50": full_sum0["js_divergence_percentiles"]["p50"],
                  "l1_prob_diff_p50": full_sum0["l1_prob_diff_percentiles"]["p50"],
                  f"first_js_le_{rl.js_le}": full_sum0[f"first_js_le_{rl.js_le}"],
                  f"first_l1_le_{rl.l1_le}": full_sum0[f"first_l1_le_{rl.l1_le}"],
                  "jaccard_raw_norm_p50": full_sum0["topk_overlap"]["jaccard_raw_norm_p50"],
                  f"first_jaccard_raw_norm_ge_{rl.jaccard_ge}":
                      full_sum0["topk_overlap"][f"first_jaccard_raw_norm_ge_{rl.jaccard_ge}"],
                  "pct_layers_kl_ge_1.0": full_sum0["pct_layers_kl_ge_1.0"],
                  "n_norm_only_semantics_layers": full_sum0["n_norm_only_semantics_layers"],
                  "earliest_norm_only_semantic": full_sum0["earliest_norm_only_semantic"], "risk_tier": score["tier"]},
        repeat=rep, repeat_flag=rep_flag, gold_rate=gold_rate, gold_variant=prim.inp.gold.variant,
        trajectory=traj, tuned_audit=audit, preferred_lens=guidance["preferred_lens_for_reporting"],
        use_confirmed=guidance["use_confirmed_semantics"])
    return DiagnosticsResult(sections=sections,
                             top_level={"raw_lens_check": raw_check, "measurement_guidance": guidance},
                             sidecars=sidecars, confirmed=confirmed, pack_inputs=pack_inputs,
                             timings={"summaries_s": time.perf_counter() - t0})
