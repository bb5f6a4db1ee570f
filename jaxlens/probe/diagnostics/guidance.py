"""Measurement guidance (§2.26), the evaluation pack and its milestones / artefact-audit CSV rows (§2.28).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

from jaxlens.probe import metrics as M

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
