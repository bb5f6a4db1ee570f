"""Confirmed semantics (§2.16), lens consistency (§2.17), decoding point (§2.18) and gate
stability (§2.19).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np

from jaxlens.probe import metrics as M
from jaxlens.probe.diagnostics.calibration import _log_softmax64, _rank_of
from jaxlens.probe.diagnostics.raw_vs_norm import topk_jaccard_np
from jaxlens.probe.suite import Thresholds

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
