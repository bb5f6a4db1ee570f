"""Last-layer consistency (spec §2.12) and norm temperatures (§2.13): pure functions over logits.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np

from jaxlens.probe import metrics as M

LN2 = math.log(2.0)


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
