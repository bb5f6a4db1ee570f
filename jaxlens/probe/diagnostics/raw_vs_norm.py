"""Raw-vs-norm lens checks (spec §2.15): sampled layers, windows, the full sweep and the artefact score.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from jaxlens.errors import JaxlensError
from jaxlens.probe import metrics as M
from jaxlens.probe.suite import CopyThresholds, Thresholds

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
