"""Numeric health (§2.20), repeatability (§2.23) and the position window (§3.6 / Q3).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np

from jaxlens.probe import metrics as M
from jaxlens.probe.diagnostics.semantics import _PREFERRED, semantic_milestones
from jaxlens.probe.suite import Thresholds

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
