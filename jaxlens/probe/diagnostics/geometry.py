"""Normalisation provenance, layer map and residual-norm trajectory (spec §2.14).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np

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


def _f(x) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return x
