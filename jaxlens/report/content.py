"""The evaluation report of one probe run, written from its files (no language model involved).

The sections follow the analyst's report the reference published (``tests/data/reference/
evaluation-report-Qwen3-14B.md``): overview, method sanity-check, quantitative findings, qualitative
patterns, checklist, limitations, model fingerprint; then the figures and the files read. Every
number is a :class:`~jaxlens.report.load.V` read from the run with its citation; a checklist item
is decided by the rule stated next to it (the diagnostics' own thresholds and flags where they exist).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from jaxlens.report.document import Bullets, Code, Doc, Figure, Heading, Mark, Para, Row, Table, Text, Val
from jaxlens.report.load import ABSENT, Cite, CsvRow, Run, V, finite

__all__ = ["build_document", "fingerprint", "REASON_TEXT", "FILLER_WORDS"]

#: one sentence per ``measurement_guidance.reasons`` entry (names: jaxlens.probe.diagnostics.guidance)
REASON_TEXT = {
    "warn_high_last_layer_kl": "the norm lens does not reproduce the model's own head at the last layer "
                               "(KL ≥ 0.25 bit), so KL-based milestones are biased",
    "norm_only_semantics_window": "some layers near the milestones are semantic only under the norm lens, "
                                  "not under the raw lens; early semantics may be a normalisation artefact",
    "high_lens_artifact_risk": "the sampled raw-vs-norm check rates the lens-artefact risk high",
    "high_lens_artifact_score": "the full raw-vs-norm sweep gives a high lens-artefact score",
    "repeatability_variance_high": "re-decoding the same activations changed ranks or top-1 tokens",
    "repeatability_forward_disagreement": "a second forward pass moved the preferred milestone",
    "gold_alignment_partial": "the gold answer could not be aligned to token ids for every prompt",
    "nondeterministic_env": "the run used nondeterministic kernels",
    "normalization_spike": "the normaliser rescales the residual sharply at some layer before semantics "
                           "(resid_norm_ratio > 3 or delta_resid_cos < 0.8)",
    "numeric_health_caution": "NaN or Inf values appear at or before the milestones",
    "copy_mask_missing": "the whitespace/punctuation copy mask is missing",
    "copy_mask_error": "the copy mask could not be built",
    "layer_map_missing": "the layer map is missing",
    "rank_only_near_uniform": "at the semantic layer the answer is rank 1 but barely above uniform",
    "decoding_point_sensitive": "decoding after the post-attention norm instead of the next block's norm "
                                "changes the answer at a milestone",
    "low_lens_consistency_at_semantic": "the norm lens and the other lenses share few top-k tokens at the "
                                        "semantic layer (Jaccard@10 or Spearman < 0.30)",
    "tuned_is_calibration_only": "the tuned lens improves KL only through temperature, not rotation",
    "pos_window_low_stability": "the answer is rank 1 at the semantic layer at fewer than half of the "
                                "prompt's grid positions",
    "scale_sensitive_semantic_gate": "scaling the logits by 0.90-1.10 flips the semantic gates",
}

#: the grammatical fillers of the checklist's "filler anchoring" item (lower-cased, stripped)
FILLER_WORDS = ("the", "a", "an", "is", "of", "and", "to", "in", "that", "it", "as", "called", "simply", "was")

PER_LAYER_COLUMNS = ("layer", "top1", "entropy_bits", "p_top1", "answer_rank", "p_answer", "kl_to_final_bits",
                     "cos_to_final")

PRIMARY_MILESTONES = (
    ("strict copy L_copy", "L_copy"), ("soft copy L_copy_soft (k = 1)", "L_copy_soft/1"),
    ("entropy collapse L_copy_H", "L_copy_H"), ("semantic L_semantic", "L_semantic"),
    ("first rank ≤ 10", "first_rank_le_10"), ("first rank ≤ 5", "first_rank_le_5"),
    ("first rank ≤ 1", "first_rank_le_1"), ("first KL ≤ 1.0 bit", "first_kl_below_1.0"),
    ("first KL ≤ 0.5 bit", "first_kl_below_0.5"), ("margin-ok semantic", "L_semantic_margin_ok"),
    ("top-2 gap ≥ 0.5 logit", "answer_margin_thresholds/gap_ge_0.5"),
    ("strong semantic L_semantic_strong", "semantic_gate/L_semantic_strong"),
    ("two-layer run L_semantic_run2", "semantic_gate/L_semantic_run2"),
    ("surface → meaning", "L_surface_to_meaning_{lens}"), ("geometric crossover", "L_geom_{lens}"),
    ("prompt top-K decay", "L_topk_decay_{lens}"), ("cos to final ≥ 0.2", "cos_milestones/{lens}/ge_0.2"),
    ("cos to final ≥ 0.4", "cos_milestones/{lens}/ge_0.4"), ("cos to final ≥ 0.6", "cos_milestones/{lens}/ge_0.6"),
)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

class _Ctx:
    def __init__(self, run: Run):
        self.run = run
        self.n = run.n_layers
        self.key = run.primary_key()
        self.pure = run.pass_rows(run.pure("norm"), self.key)
        self.pure_by_layer = {r["layer"]: r for r in self.pure}
        self.tuned = run.pass_rows(run.pure("tuned"), self.key) if run.tuned_loaded else []
        self.tuned_by_layer = {r["layer"]: r for r in self.tuned}
        self.pure_file = self.pure[0].file

    def j(self, ptr: str) -> V:
        return self.run.j(ptr)

    def val(self, ptr: str, name: str = "", quote: bool = True) -> Val:
        return Val(self.run.j(ptr), name, quote)

    def int_at(self, ptr: str) -> Optional[int]:
        v = self.run.j(ptr).value
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    def norm_path(self, key: str) -> str:
        return "/diagnostics/" + key.replace("{lens}", "norm")

    def tuned_path(self, key: str) -> str:
        return "/tuned_lens/summaries/0/" + key.replace("{lens}", "tuned")


def _scalar_leaves(obj: Any, ptr: str) -> list:
    """JSON Pointers of the scalar leaves under ``obj`` (depth first, in file order)."""
    from jaxlens.report.jsonloc import pointer

    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            out += _scalar_leaves(v, ptr + pointer(k))
        return out
    if isinstance(obj, list):
        if all(not isinstance(v, (dict, list)) for v in obj):
            return [ptr]
        out = []
        for i, v in enumerate(obj):
            out += _scalar_leaves(v, ptr + f"/{i}")
        return out
    return [ptr]


def _rows_cite(rows: Sequence[CsvRow]) -> Optional[Cite]:
    if not rows:
        return None
    return Cite(rows[0].file, rows[0].line, "", rows[-1].line if rows[-1].line != rows[0].line else None)


def _kv_table(rows: list, header=("quantity", "value")) -> Table:
    """A value table: rows of (label, Val), one value per row."""
    return Table(list(header), [Row([Text(label), val]) for label, val in rows])


def _csv_row_table(rows: Sequence[CsvRow], columns: Sequence[str], bold_layer: Optional[int]) -> Table:
    out = []
    for r in rows:
        cells = [Val(r.get(c)) for c in columns if c in r.cells]
        out.append(Row(cells, bold=(bold_layer is not None and r["layer"] == bold_layer),
                       cite=Cite(r.file, r.line)))
    cols = [c for c in columns if rows and c in rows[0].cells]
    return Table(cols, out, mode="row")


def _join(items: list, sep: str = "; ") -> list:
    out: list = []
    for i, it in enumerate(items):
        if i:
            out.append(Text(sep))
        out.extend(it if isinstance(it, list) else [it])
    return out


def _first_row(rows: Sequence[CsvRow], pred) -> Optional[CsvRow]:
    for r in rows:
        if pred(r):
            return r
    return None


# --------------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------------

def _absent_parts(c: _Ctx) -> list:
    run = c.run
    items = []
    if not run.tuned_loaded:
        items.append([Text("Tuned lens: absent — "), c.val("/diagnostics/tuned_lens/status", "tuned_lens.status"),
                      Text("; its tables, attribution, figure panels and checklist item are left out.")])
    if not run.prism_present:
        items.append([Text("Prism: absent — "), c.val("/diagnostics/prism_summary/mode", "prism_summary.mode"),
                      Text(", "), c.val("/diagnostics/prism_summary/present", "present"),
                      Text("; the Prism comparison is left out.")])
    if run.records("norm") is None:
        items.append([Text(f"Per-position records (output-{run.name}-records.csv): absent; the layer × position "
                           "heatmap is left out.")])
    if run.table("-pure-next-token-rawlens.csv") is None:
        items.append([Text(f"Raw-lens sweep (output-{run.name}-pure-next-token-rawlens.csv): absent; the raw-vs-norm "
                           "panel and the raw-lens curves are left out.")])
    items.append([Text("Raw lens per position: the probe writes the raw lens at the next-token position only, so "
                       "the heatmap has no raw (or Prism) version; the raw lens appears in the trajectories and the "
                       "raw-vs-norm panel.")])
    return items


def _overview(c: _Ctx, doc: Doc) -> None:
    doc.add(Heading(1, "1. Overview", "overview"))
    doc.add(Para([c.val("/diagnostics/model", "model"), Text(" ("), c.val("/model_stats/num_layers", "num_layers"),
                  Text(", "), c.val("/model_stats/d_model", "d_model"), Text(", "),
                  c.val("/model_stats/d_vocab", "d_vocab"), Text(", "),
                  c.val("/model_stats/architecture", "architecture"),
                  Text(") was probed by jaxlens "), c.val("/provenance/env/jaxlens_version", "jaxlens_version"),
                  Text(" on "), c.val("/provenance/env/device", "device"), Text(" in "),
                  c.val("/provenance/env/dtype_compute", "dtype_compute"), Text(" with the "),
                  c.val("/provenance/suite", "suite"),
                  Text(" prompt suite. The layer-by-layer probe tracks copy cues, entropy, rank milestones, KL to "
                       "the final distribution, cosine geometry and surface masses through the norm lens, the raw "
                       "lens and (when present) the tuned lens. The gold answer is "),
                  c.val("/gold_answer/string", "gold_answer.string"), Text(", aligned to token id "),
                  c.val("/gold_answer/first_id", "first_id"), Text(" ("),
                  c.val("/diagnostics/gold_alignment/variant", "variant"), Text(").")]))
    doc.add(Para([Text("Lenses in this run: norm (pure CSV, "), Text(f"{len(c.pure)} rows of the primary prompt"),
                  Text("), raw ("), c.val("/diagnostics/raw_lens_full/mode", "raw_lens_full.mode"), Text("), tuned ("),
                  c.val("/diagnostics/tuned_lens/status", "tuned_lens.status"), Text("), Prism ("),
                  c.val("/diagnostics/prism_summary/mode", "prism_summary.mode"), Text(").")]))
    doc.add(Para([Text("Sections or parts absent from this run:")]))
    doc.add(Bullets(_absent_parts(c)))


def _sanity(c: _Ctx, doc: Doc) -> None:
    run = c.run
    doc.add(Heading(1, "3. Method Sanity-Check", "sanity"))
    doc.add(Para([Text("The run's own records of how the lens was applied, one value per row (the context prompt "
                       "ends with the word the answer should follow, with no trailing space).")]))
    npl = len(run.json.value("/diagnostics/normalization_provenance/per_layer", []) or [])
    last = npl - 1
    L_sem = c.int_at("/diagnostics/L_semantic")
    pl = "/diagnostics/normalization_provenance/per_layer/"
    strategy = run.json.value("/diagnostics/normalization_provenance/strategy")
    strat_ptr = "/diagnostics/normalization_provenance/strategy" + ("/primary" if isinstance(strategy, dict) else "")
    D, R = "/diagnostics/", "/diagnostics/raw_lens_full/"
    spec: list = [
        ("context prompt", D + "context_prompt"),
        ("norm lens used", D + "use_norm_lens"),
        ("unembedding dtype", D + "unembed_dtype"),
        ("first block normaliser", D + "first_block_ln1_type"),
        ("final normaliser", D + "final_ln_type"),
        ("LayerNorm bias handling", D + "layernorm_bias_fix"),
        ("normaliser strategy", strat_ptr),
        ("ln_source at layer 0", pl + "0/ln_source"),
        ("ln_source at the last layer", pl + f"{max(last, 0)}/ln_source"),
        ("resid_norm_ratio at layer 0", pl + "0/resid_norm_ratio"),
        ("delta_resid_cos at layer 0", pl + "0/delta_resid_cos"),
    ]
    if L_sem is not None and 0 <= L_sem < npl:
        spec += [(f"resid_norm_ratio at L_semantic = {L_sem}", pl + f"{L_sem}/resid_norm_ratio"),
                 (f"delta_resid_cos at L_semantic = {L_sem}", pl + f"{L_sem}/delta_resid_cos")]
    spec += [
        ("normalisation trajectory shape", D + "norm_trajectory/shape"),
        ("normalisation spikes", D + "norm_trajectory/n_spikes"),
        ("unembedding bias present", D + "unembed_bias/present"),
        ("unembedding bias L2 norm", D + "unembed_bias/l2_norm"),
        ("deterministic algorithms", "/provenance/env/deterministic_algorithms"),
        ("seed", "/provenance/env/seed"),
        ("numeric health: any NaN", D + "numeric_health/any_nan"),
        ("numeric health: any Inf", D + "numeric_health/any_inf"),
        ("numeric health: layers flagged", D + "numeric_health/layers_flagged"),
        ("gold alignment", D + "gold_alignment/status"),
        ("gold alignment rate over prompts", D + "gold_alignment_rate"),
        ("gold answer pieces", "/gold_answer/pieces"),
        ("copy mask size", D + "copy_mask/size"),
        ("strict copy threshold τ", D + "copy_thresh"),
        ("strict copy window k", D + "copy_window_k"),
        ("copy match level", D + "copy_match_level"),
        ("soft copy threshold", D + "copy_soft_threshold"),
        ("soft copy window sizes", D + "copy_soft_window_ks"),
        ("copy-threshold sweep τ list", D + "copy_thresholds/tau_list"),
        ("copy-threshold stability", D + "copy_thresholds/stability"),
        ("copy flag columns", "/copy_flag_columns"),
        ("last layer: KL to final [bits]", D + "last_layer_consistency/kl_to_final_bits"),
        ("last layer: top-1 agrees with the model", D + "last_layer_consistency/top1_agree"),
        ("last layer: p_top1 of the lens", D + "last_layer_consistency/p_top1_lens"),
        ("last layer: p_top1 of the model", D + "last_layer_consistency/p_top1_model"),
        ("last layer: temperature estimate", D + "last_layer_consistency/temp_est"),
        ("last layer: KL after temperature [bits]", D + "last_layer_consistency/kl_after_temp_bits"),
        ("last layer: high-KL warning", D + "last_layer_consistency/warn_high_last_layer_kl"),
        ("guidance: prefer ranks", "/measurement_guidance/prefer_ranks"),
        ("guidance: suppress absolute probabilities", "/measurement_guidance/suppress_abs_probs"),
        ("guidance: preferred lens for reporting", "/measurement_guidance/preferred_lens_for_reporting"),
        ("guidance: use confirmed semantics", "/measurement_guidance/use_confirmed_semantics"),
        ("raw-lens window: radius", D + "raw_lens_window/radius"),
        ("raw-lens window: centre layers", D + "raw_lens_window/center_layers"),
        ("raw-lens window: norm-only semantic layers", D + "raw_lens_window/norm_only_semantics_layers"),
        ("raw-lens window: max KL(norm ‖ raw) [bits]", D + "raw_lens_window/max_kl_norm_vs_raw_bits_window"),
        ("raw-lens full: share of layers with KL ≥ 1.0 bit", R + "pct_layers_kl_ge_1.0"),
        ("raw-lens full: share of layers with KL ≥ 0.5 bit", R + "pct_layers_kl_ge_0.5"),
        ("raw-lens full: norm-only semantic layers", R + "n_norm_only_semantics_layers"),
        ("raw-lens full: earliest norm-only semantic layer", R + "earliest_norm_only_semantic"),
        ("raw-lens full: max KL(norm ‖ raw) [bits]", R + "max_kl_norm_vs_raw_bits"),
        ("raw-lens full: lens-artefact score v1", R + "score/lens_artifact_score"),
        ("raw-lens full: lens-artefact score v2", R + "score/lens_artifact_score_v2"),
        ("raw-lens full: tier", R + "score/tier"),
        ("raw-lens sample: first norm-only semantic layer", "/raw_lens_check/summary/first_norm_only_semantic_layer"),
        ("raw-lens sample: max KL(norm ‖ raw) [bits]", "/raw_lens_check/summary/max_kl_norm_vs_raw_bits"),
        ("raw-lens sample: artefact risk", "/raw_lens_check/summary/lens_artifact_risk"),
        ("repeatability: status", D + "repeatability/status"),
        ("repeatability: max rank deviation", D + "repeatability/max_rank_dev"),
        ("repeatability: top-1 flip rate", D + "repeatability/top1_flip_rate"),
        ("control prompt gold alignment", "/control_prompt/gold_alignment/status"),
        ("diagnostic flags raised", D + "flags"),
        ("Prism sidecar mode", D + "prism_summary/mode"),
        ("Prism sidecar present", D + "prism_summary/present"),
        ("tuned lens status", D + "tuned_lens/status"),
    ]
    if run.tuned_loaded:
        spec += [("tuned lens preferred (attribution)", "/tuned_lens/attribution/prefer_tuned"),
                 ("semantics lens hint", "/measurement_guidance/preferred_semantics_lens_hint")]
    doc.add(_kv_table([(label, c.val(ptr)) for label, ptr in spec], ("check", "value")))
    # copy reflex in the first layers, straight from the pure CSV
    early = [r for r in c.pure if isinstance(r["layer"], int) and r["layer"] <= 3]
    cols = ["copy_collapse"] + [k for k in (run.json.value("/copy_flag_columns") or []) if k.startswith("copy_soft")]
    hits = [(r, col) for r in early for col in cols if r[col] is True]
    if early:
        if hits:
            parts = [Text("Copy reflex in layers 0–3 of the primary prompt (pure CSV): ")]
            parts += _join([[Text(f"layer {r['layer']} "), Val(r.get(col), col)] for r, col in hits[:6]])
            parts.append(Text("."))
        else:
            parts = [Text(f"No strict or soft copy flag is True in layers 0–3 of the primary prompt "
                          f"(columns {', '.join(cols)}) "), Text(_rows_cite(early).text()), Text(".")]
        doc.add(Para(parts))
    fin = c.pure_by_layer.get(c.n)
    if fin is not None:
        doc.add(Para([Text("Last-layer CSV row: "), Val(fin.get("top1"), "top1"), Text(", "),
                      Val(fin.get("p_top1"), "p_top1"), Text(", "), Val(fin.get("kl_to_final_bits"), "kl_to_final_bits"),
                      Text(", "), Val(fin.get("answer_rank"), "answer_rank"), Text(".")]))


def _milestone_table(c: _Ctx) -> Table:
    run = c.run
    header = ["milestone (first layer)", "norm lens"] + (["tuned lens"] if run.tuned_loaded else [])
    rows = []
    for label, key in PRIMARY_MILESTONES:
        cells: list = [Text(label), c.val(c.norm_path(key))]
        if run.tuned_loaded:
            tv = run.j(c.tuned_path(key))
            cells.append(Val(tv))
        rows.append(Row(cells))
    return Table(header, rows, caption=[Text("Milestones of the primary prompt (the norm column is "),
                                        Code("diagnostics"), Text(", the tuned column "),
                                        Code("tuned_lens.summaries[0]"), Text("; null: never reached).")])


def _confirmed_table(c: _Ctx) -> Table:
    conf = "/diagnostics/confirmed_semantics/"
    return _kv_table([(label, c.val(conf + key)) for label, key in (
        ("L_semantic, norm lens", "L_semantic_norm"), ("L_semantic, raw lens", "L_semantic_raw"),
        ("L_semantic, tuned lens", "L_semantic_tuned"), ("window ±Δ layers", "Δ_window"),
        ("confirmed semantic layer", "L_semantic_confirmed"), ("confirmed by", "confirmed_source"))],
        ("confirmed semantics", "value"))


def _quantitative(c: _Ctx, doc: Doc) -> None:
    run = c.run
    doc.add(Heading(1, "4. Quantitative Findings", "quantitative"))
    conf = c.j("/diagnostics/confirmed_semantics/L_semantic_confirmed")
    src = c.j("/diagnostics/confirmed_semantics/confirmed_source")
    L_sem = c.j("/diagnostics/L_semantic")
    bold = conf.value if conf.ok else (L_sem.value if L_sem.ok else None)
    pref = c.j("/measurement_guidance/preferred_lens_for_reporting")
    if conf.ok:
        cap = [Text("Bold: the confirmed semantic layer ("), Val(conf, "L_semantic_confirmed"), Text("; "),
               Val(src, "confirmed_source"), Text(").")]
    else:
        cap = [Text("No confirmed semantic layer ("), Val(conf, "L_semantic_confirmed"),
               Text("); bold: the norm lens's "), Val(L_sem, "L_semantic"), Text(".")]
    doc.add(Heading(2, "Per-layer next-token prediction, norm lens", "per-layer-norm"))
    doc.add(Para([Text("Primary prompt (prompt_id pos, variant orig), next-token position, norm lens. ")] + cap
                 + [Text(" The preferred lens for reporting is "), Val(pref, "preferred_lens_for_reporting"),
                    Text("; with "), c.val("/measurement_guidance/suppress_abs_probs", "suppress_abs_probs"),
                    Text(" read probabilities comparatively, ranks and KL first.")]))
    doc.add(_csv_row_table(c.pure, PER_LAYER_COLUMNS, bold))
    if run.tuned_loaded and c.tuned:
        doc.add(Heading(2, "Per-layer next-token prediction, tuned lens", "per-layer-tuned"))
        doc.add(Para([Text("Same prompt through the tuned lens (layers 1 … n; the last layer is the model's own "
                           "head). ")] + cap))
        doc.add(_csv_row_table(c.tuned, PER_LAYER_COLUMNS, bold))
    doc.add(Heading(2, "Milestones", "milestones"))
    doc.add(_milestone_table(c))
    doc.add(_confirmed_table(c))
    df = run.json.value("/diagnostics/depth_fractions") or {}
    if isinstance(df, dict) and df:
        doc.add(_kv_table([(k, c.val(f"/diagnostics/depth_fractions/{k}")) for k in df],
                          ("depth fraction (layer / n, norm lens)", "value")))
    # micro-suite
    facts = run.json.value("/micro_suite/facts") or []
    if facts:
        cols = ("L_copy_strict", "L_copy_soft_k1", "L_semantic_norm", "L_semantic_confirmed",
                "L_semantic_margin_ok_norm", "delta_hat")
        rows = []
        for i, f in enumerate(facts):
            rows.append(Row([Text(str(f.get("fact_key")))] + [c.val(f"/micro_suite/facts/{i}/{k}") for k in cols]))
        agg = "/micro_suite/aggregates/"
        rows.append(Row([Text("median")] + [c.val(agg + "L_copy_strict_median"), c.val(agg + "L_copy_soft_k1_median"),
                                            c.val(agg + "L_semantic_norm_median"),
                                            c.val(agg + "L_semantic_confirmed_median"),
                                            c.val(agg + "L_semantic_margin_ok_norm_median"),
                                            c.val(agg + "delta_hat_median")]))
        doc.add(Heading(2, "Micro-suite (five facts)", "micro-suite"))
        doc.add(Table(["fact"] + list(cols), rows,
                      caption=[Text("Per fact, pos/orig pass, norm lens; "), Code("delta_hat"),
                               Text(" = (L_semantic − L_copy) / n.")]))
    # control, ablation
    doc.add(Heading(2, "Control and stylistic ablation", "control"))
    cs, ab = "/control_summary/", "/ablation_summary/"
    doc.add(Para([Text("Control prompt "), c.val("/control_prompt/context_prompt", quote=True), Text(": "),
                  c.val(cs + "first_control_margin_pos", "first_control_margin_pos"), Text(", "),
                  c.val(cs + "max_control_margin", "max_control_margin"), Text(", "),
                  c.val(cs + "first_control_strong_pos", "first_control_strong_pos"), Text(", "),
                  c.val(cs + "max_control_top2_logit_gap", "max_control_top2_logit_gap"), Text(".")]))
    doc.add(Para([Text("Ablation (no filler word): "), c.val(ab + "L_copy_orig", "L_copy_orig"), Text(", "),
                  c.val(ab + "L_sem_orig", "L_sem_orig"), Text(", "), c.val(ab + "L_copy_nf", "L_copy_nf"), Text(", "),
                  c.val(ab + "L_sem_nf", "L_sem_nf"), Text(", "), c.val(ab + "delta_L_copy", "delta_L_copy"),
                  Text(", "), c.val(ab + "delta_L_sem", "delta_L_sem"), Text(".")]))
    # entropy drop between copy and semantics
    Lc = c.int_at("/diagnostics/L_copy")
    Ls = c.int_at("/diagnostics/L_semantic")
    if Lc is not None and Ls is not None and Lc in c.pure_by_layer and Ls in c.pure_by_layer:
        rc, rs = c.pure_by_layer[Lc], c.pure_by_layer[Ls]
        doc.add(Para([Text("Entropy at the strict copy layer and at the semantic layer (ΔH = the first minus the "
                           "second): "), Val(rc.get("entropy_bits"), f"entropy_bits(L_copy = {Lc})"), Text(", "),
                      Val(rs.get("entropy_bits"), f"entropy_bits(L_semantic = {Ls})"), Text(".")]))
    else:
        doc.add(Para([Text("ΔH = entropy(L_copy) − entropy(L_semantic) is not defined: "),
                      c.val("/diagnostics/L_copy", "L_copy"), Text(", "), c.val("/diagnostics/L_semantic", "L_semantic"),
                      Text(".")]))
    # confidence milestones from the CSV
    parts = [Text("Confidence milestones (pure CSV, norm lens): ")]
    items = []
    for thr in (0.30, 0.60):
        r = _first_row(c.pure, lambda r: finite(r["p_top1"]) and r["p_top1"] > thr)
        if r is None:
            items.append([Text(f"p_top1 never exceeds {thr:.2f}")])
        else:
            items.append([Text(f"p_top1 > {thr:.2f} first at layer {r['layer']} ("), Val(r.get("p_top1"), "p_top1"),
                          Text(")")])
    fin = c.pure_by_layer.get(c.n)
    if fin is not None:
        items.append([Text("final layer "), Val(fin.get("p_top1"), "p_top1")])
    doc.add(Para(parts + _join(items) + [Text(".")]))
    # surface / geometry
    doc.add(Para([Text("Surface → meaning (norm): "), c.val("/diagnostics/L_surface_to_meaning_norm",
                                                             "L_surface_to_meaning_norm"), Text(" with "),
                  c.val("/diagnostics/answer_mass_at_L_surface_norm", "answer_mass"), Text(" and "),
                  c.val("/diagnostics/echo_mass_at_L_surface_norm", "echo_mass"), Text("; geometric crossover "),
                  c.val("/diagnostics/L_geom_norm", "L_geom_norm"), Text("; prompt top-K decay "),
                  c.val("/diagnostics/L_topk_decay_norm", "L_topk_decay_norm"), Text(" with "),
                  c.val("/diagnostics/topk_prompt_mass_at_L_norm", "topk_prompt_mass_at_L"), Text(".")]))
    # tuned lens
    doc.add(Heading(2, "Tuned lens", "tuned"))
    if not run.tuned_loaded:
        doc.add(Para([Text("Absent: "), c.val("/diagnostics/tuned_lens/status", "tuned_lens.status"),
                      Text(" (run the probe with --tuned LENS_DIR to add it).")]))
    else:
        m = "/tuned_lens/summary/metrics/"
        rows = []
        for k in ("le_10", "le_5", "le_1"):
            rows.append(Row([Text(f"first rank {k.replace('le_', '≤ ')}"),
                             c.val(f"{m}rank_milestones/baseline/{k}"), c.val(f"{m}rank_milestones/tuned/{k}"),
                             c.val(f"{m}rank_milestones/delta/{k}")]))
        for k in ("p25", "p50", "p75"):
            rows.append(Row([Text(f"KL [bits] at depth {k}"), c.val(f"{m}kl_bits_at_percentiles/baseline/{k}"),
                             c.val(f"{m}kl_bits_at_percentiles/tuned/{k}"), c.val(f"{m}kl_bits_at_percentiles/delta/{k}")]))
        rows.append(Row([Text("first KL ≤ 1.0 bit"), c.val(m + "first_kl_le_1.0/baseline"),
                         c.val(m + "first_kl_le_1.0/tuned"), c.val(m + "first_kl_le_1.0/delta")]))
        doc.add(Table(["metric", "norm (baseline)", "tuned", "delta"], rows,
                      caption=[Text("Tuned vs norm lens on the primary prompt ("), Code("tuned_lens.summary.metrics"),
                               Text("; rank delta = tuned − norm layers, KL delta = norm − tuned).")]))
        a = "/tuned_lens/attribution/percentiles/"
        rows = [Row([Text(p), c.val(f"{a}{p}/ΔKL_tuned"), c.val(f"{a}{p}/ΔKL_temp"), c.val(f"{a}{p}/ΔKL_rot")])
                for p in ("p25", "p50", "p75")]
        doc.add(Table(["depth percentile", "ΔKL tuned [bits]", "ΔKL temperature only", "ΔKL rotation"], rows,
                      caption=[Text("Rotation vs temperature attribution ("), Code("tuned_lens.attribution"),
                               Text("): ΔKL = KL(norm) − KL(variant); rotation = tuned − temperature. "),
                               c.val("/tuned_lens/attribution/prefer_tuned", "prefer_tuned"), Text(".")]))
        au = "/tuned_lens/audit_summary/"
        doc.add(_kv_table([(label, c.val(ptr)) for label, ptr in (
            ("positional: median ΔKL in distribution (≤ 0.92)", au + "positional/pos_in_dist_le_0.92"),
            ("positional: median ΔKL out of distribution (≥ 0.96)", au + "positional/pos_ood_ge_0.96"),
            ("head mismatch: KL(tuned ‖ final) at the last layer [bits]", au + "head_mismatch/kl_bits_tuned_final"),
            ("head mismatch: τ*", au + "head_mismatch/tau_star_modelcal"),
            ("calibration only", au + "tuned_is_calibration_only"),
            ("skip-layers sanity m = 2 (relative perplexity change)", "/diagnostics/skip_layers_sanity/m=2"),
            ("skip-layers sanity m = 4", "/diagnostics/skip_layers_sanity/m=4"),
            ("skip-layers sanity m = 8", "/diagnostics/skip_layers_sanity/m=8"),
            ("tuned-lens regression flag", "/diagnostics/tuned_lens_regression"),
            ("tuned surface → meaning layer", "/diagnostics/L_surface_to_meaning_tuned"),
            ("tuned geometric crossover layer", "/diagnostics/L_geom_tuned"),
            ("tuned prompt top-K decay layer", "/diagnostics/L_topk_decay_tuned"))],
            ("tuned-lens audit", "value")))
    # prism
    doc.add(Heading(2, "Prism", "prism"))
    if not run.prism_present:
        doc.add(Para([Text("Absent: "), c.val("/diagnostics/prism_summary/mode", "prism_summary.mode"), Text(", "),
                      c.val("/diagnostics/prism_summary/present", "present"),
                      Text(". jaxlens has no Prism sidecar; nothing here depends on one.")]))
    else:
        parts = [Text("Prism sidecar: "), c.val("/diagnostics/prism_summary/k", "k"), Text(", "),
                 c.val("/diagnostics/prism_summary/layers", "layers")]
        verdict = run.j("/diagnostics/prism_summary/verdict/label")
        if not verdict.absent:
            parts += [Text("; verdict "), Val(verdict, "verdict.label"), Text(" with "),
                      c.val("/diagnostics/prism_summary/verdict/kl_gain_bits_median", "kl_gain_bits_median"),
                      Text(" (KL of the norm lens minus KL of Prism, median over the 25/50/75% depth layers)")]
        doc.add(Para(parts + [Text(".")]))
        leaves = _scalar_leaves(run.json.value("/diagnostics/prism_summary/metrics"),
                                "/diagnostics/prism_summary/metrics")
        if leaves:
            doc.add(_kv_table([(ptr[len("/diagnostics/prism_summary/metrics/"):], c.val(ptr)) for ptr in leaves[:60]],
                              ("prism_summary.metrics", "value")))
        prism_rows = run.pass_rows(run.pure("prism"), c.key)
        if prism_rows:
            doc.add(Para([Text("Per-layer next-token prediction of the primary prompt through the Prism lens:")]))
            doc.add(_csv_row_table(prism_rows, PER_LAYER_COLUMNS, None))
    # raw vs norm
    doc.add(Heading(2, "Raw vs norm lens", "raw-vs-norm"))
    samples = run.json.value("/raw_lens_check/samples") or []
    worst = None
    for i, s in enumerate(samples):
        if isinstance(s, dict) and finite(s.get("kl_norm_vs_raw_bits")):
            if worst is None or s["kl_norm_vs_raw_bits"] > samples[worst]["kl_norm_vs_raw_bits"]:
                worst = i
    parts = [Text("Full sweep: "), c.val("/diagnostics/raw_lens_full/score/tier", "tier"), Text(" ("),
             c.val("/diagnostics/raw_lens_full/score/lens_artifact_score_v2", "lens_artifact_score_v2"),
             Text("), JS divergence median "), c.val("/diagnostics/raw_lens_full/js_divergence_percentiles/p50", "p50"),
             Text(", L1 median "), c.val("/diagnostics/raw_lens_full/l1_prob_diff_percentiles/p50", "p50"),
             Text(", top-50 Jaccard median "),
             c.val("/diagnostics/raw_lens_full/topk_overlap/jaccard_raw_norm_p50", "jaccard_raw_norm_p50"), Text(".")]
    if worst is not None:
        sp = f"/raw_lens_check/samples/{worst}/"
        parts += [Text(" Largest sampled discrepancy: "), c.val(sp + "layer", "layer"), Text(", "),
                  c.val(sp + "kl_norm_vs_raw_bits", "kl_norm_vs_raw_bits"), Text(", "),
                  c.val(sp + "top1_agree", "top1_agree"), Text(".")]
    doc.add(Para(parts))
    lc = "/diagnostics/lens_consistency/"
    items = [[Text("norm vs raw at the targets (median): "), c.val(lc + "norm_vs_raw/p50/jaccard@10", "jaccard@10"),
              Text(", "), c.val(lc + "norm_vs_raw/p50/spearman_top50", "spearman_top50")]]
    if not run.j(lc + "norm_vs_tuned").absent:
        items.append([Text("norm vs tuned: "), c.val(lc + "norm_vs_tuned/p50/jaccard@10", "jaccard@10"), Text(", "),
                      c.val(lc + "norm_vs_tuned/p50/spearman_top50", "spearman_top50")])
    items.append([Text("decoding point (post-attention norm vs next block's norm): "),
                  c.val("/diagnostics/decoding_point/gate/decoding_point_consistent", "decoding_point_consistent")])
    items.append([Text("position window: "), c.val("/summary/position_window/rank1_frac", "rank1_frac"), Text(" of "),
                  c.val("/summary/position_window/n_positions", "n_positions"), Text(" grid positions")])
    items.append([Text("gate stability: "), c.val("/diagnostics/gate_stability_small_scale/min_both_gates_pass_frac",
                                                  "min_both_gates_pass_frac")])
    doc.add(Bullets(items))


def _qualitative(c: _Ctx, doc: Doc) -> None:
    run = c.run
    doc.add(Heading(1, "5. Qualitative Patterns & Anomalies", "qualitative"))
    Ls = c.int_at("/diagnostics/L_semantic")
    rs = c.pure_by_layer.get(Ls) if Ls is not None else None
    fin = c.pure_by_layer.get(c.n)
    if rs is not None and Ls == c.n:
        doc.add(Para([Text(f"At the next-token position the gold answer becomes rank 1 only at the last layer ({Ls}), "
                           "i.e. in the model's own output and in no intermediate layer: "),
                      Val(rs.get("top1"), "top1"), Text(", "), Val(rs.get("p_answer"), "p_answer"), Text(", "),
                      Val(rs.get("entropy_bits"), "entropy_bits"), Text(".")]))
    elif rs is not None and fin is not None:
        doc.add(Para([Text(f"At the next-token position the gold answer first becomes rank 1 at layer {Ls}: "),
                      Val(rs.get("top1"), "top1"), Text(", "), Val(rs.get("p_answer"), "p_answer"), Text(", "),
                      Val(rs.get("kl_to_final_bits"), "kl_to_final_bits"), Text("; the final layer gives "),
                      Val(fin.get("top1"), "top1"), Text(", "), Val(fin.get("p_top1"), "p_top1"), Text(", "),
                      Val(fin.get("kl_to_final_bits"), "kl_to_final_bits"), Text(".")]))
    elif fin is not None:
        doc.add(Para([Text("The gold answer never becomes rank 1 under the norm lens; the final layer gives "),
                      Val(fin.get("top1"), "top1"), Text(", "), Val(fin.get("answer_rank"), "answer_rank"), Text(".")]))
    cos2 = c.j("/diagnostics/cos_milestones/norm/ge_0.2")
    kl1 = c.j("/diagnostics/first_kl_below_1.0")
    if cos2.ok and kl1.ok:
        if cos2.value == 0:
            verdict = (" — the embedding layer itself already points that way, so this milestone says little about "
                       "the blocks; see the cosine panel of the trajectories figure.")
        elif cos2.value < kl1.value - 1:
            verdict = " — an early direction calibrated late."
        else:
            verdict = " — direction and calibration arrive together."
        doc.add(Para([Text("Direction vs calibration: the cosine to the final logits first reaches 0.2 at "),
                      Val(cos2, "ge_0.2"), Text(" and KL to final falls to 1 bit at "),
                      Val(kl1, "first_kl_below_1.0"), Text(verdict)]))
    # the reverse question (the test prompt of the reference's negative control)
    tps = run.json.value("/test_prompts") or []
    if tps and isinstance(tps[0], dict) and tps[0].get("topk"):
        items = []
        for k in range(min(5, len(tps[0]["topk"]))):
            items.append([c.val(f"/test_prompts/0/topk/{k}/0"), Text(" "), c.val(f"/test_prompts/0/topk/{k}/1")])
        doc.add(Para([Text("Reverse question "), c.val("/test_prompts/0/prompt"), Text(", top-5 of the model: ")]
                     + _join(items, ", ") + [Text(".")]))
    # neighbouring positions at the semantic layer (records)
    recs = run.pass_rows(run.records("norm"), c.key)
    gold = str(run.json.value("/gold_answer/string") or "").strip()
    if recs and Ls is not None and gold:
        at = [r for r in recs if r["layer"] == Ls and str(r["top1"] or "").strip() == gold]
        last_pos = max(r["pos"] for r in recs if isinstance(r["pos"], int))
        others = [r for r in at if r["pos"] != last_pos]
        if others:
            items = [[Text(f"position {r['pos']} ("), Val(r.get("token"), "token"), Text(") "), Val(r.get("prob1"), "prob1")]
                     for r in others[:4]]
            doc.add(Para([Text(f"At layer {Ls} the gold answer is also the top-1 token at earlier positions of the "
                               "prompt (records CSV): ")] + _join(items) + [Text(".")]))
        else:
            doc.add(Para([Text(f"At layer {Ls} no earlier position of the prompt has the gold answer as its top-1 token "
                               "(records CSV "), Text(_rows_cite([r for r in recs if r["layer"] == Ls]).text()
                                                     if any(r["layer"] == Ls for r in recs) else ""), Text(").")]))
    # rest mass
    if rs is not None and fin is not None and Ls != c.n:
        doc.add(Para([Text("Rest mass (top-k coverage, not fidelity): "), Val(rs.get("rest_mass"), f"rest_mass(L{Ls})"),
                      Text(", "), Val(fin.get("rest_mass"), f"rest_mass(L{c.n})"), Text(".")]))
    # temperature exploration
    te = run.json.value("/temperature_exploration") or []
    items = []
    for i, t in enumerate(te):
        if isinstance(t, dict) and t.get("topk"):
            items.append([c.val(f"/temperature_exploration/{i}/temperature", "T"), Text(": "),
                          c.val(f"/temperature_exploration/{i}/topk/0/0"), Text(" "),
                          c.val(f"/temperature_exploration/{i}/topk/0/1"), Text(", "),
                          c.val(f"/temperature_exploration/{i}/entropy", "entropy")])
    if items:
        doc.add(Para([Text("Temperature robustness (top-1 of the final distribution): ")] + _join(items) + [Text(".")]))
    doc.add(Para([Text("Head calibration: "), c.val("/diagnostics/last_layer_consistency/kl_to_final_bits",
                                                     "kl_to_final_bits"), Text(", "),
                  c.val("/diagnostics/last_layer_consistency/temp_est", "temp_est"), Text(", "),
                  c.val("/diagnostics/last_layer_consistency/cfg_transform", "cfg_transform"), Text(".")]))


def _check(ok: Optional[bool], text: str, parts: list, rule: str) -> list:
    return [Mark(ok), Text(f" {text} — ")] + parts + [Text(f" (rule: {rule})")]


def _checklist(c: _Ctx, doc: Doc) -> None:
    from jaxlens.probe.metrics import is_pure_ws_punct

    run = c.run
    J = run.j
    doc.add(Heading(2, "Checklist", "checklist"))
    items = []
    t1, t2 = J("/diagnostics/first_block_ln1_type"), J("/diagnostics/final_ln_type")
    rms = (t1.ok and t2.ok) and "RMS" in str(t1.value) and "RMS" in str(t2.value)
    items.append(_check(rms if (t1.ok and t2.ok) else None, "RMS lens?", [Val(t1), Text(", "), Val(t2)],
                        "both normalisers are RMSNorm"))
    ub = J("/diagnostics/unembed_bias/present")
    items.append(_check(None if ub.absent else (ub.value is False), "Unembedding bias absent (bias-free cosine)?",
                        [Val(ub, "present"), Text(", "), c.val("/diagnostics/layernorm_bias_fix")],
                        "unembed_bias.present is false"))
    Ls = c.int_at("/diagnostics/L_semantic")
    fin = c.pure_by_layer.get(c.n)
    rs = c.pure_by_layer.get(Ls) if Ls is not None else None
    if fin is not None and rs is not None and Ls != c.n and finite(fin["entropy_bits"]) and finite(rs["entropy_bits"]):
        items.append(_check(fin["entropy_bits"] > rs["entropy_bits"], "Entropy rise at the unembedding?",
                            [Val(rs.get("entropy_bits"), f"entropy_bits(L{Ls})"), Text(", "),
                             Val(fin.get("entropy_bits"), f"entropy_bits(L{c.n})")],
                            "final-layer entropy above the entropy at L_semantic"))
    else:
        items.append(_check(None, "Entropy rise at the unembedding?",
                            [c.val("/diagnostics/L_semantic", "L_semantic"), Text(" "),
                             Text("(no semantic layer before the last one to compare with)")],
                            "final-layer entropy above the entropy at L_semantic; – when L_semantic is null or n"))
    ud = J("/diagnostics/unembed_dtype")
    items.append(_check(None if ud.absent else ("float32" in str(ud.value)), "FP32 unembedding?", [Val(ud)],
                        "unembed_dtype is float32"))
    early = [r for r in c.pure if isinstance(r["layer"], int) and r["layer"] < (Ls if Ls is not None else c.n)]
    punct = [r for r in early if is_pure_ws_punct(r["top1"])]
    items.append(_check(bool(punct) if early else None, "Punctuation / markup anchoring before semantics?",
                        ([Text(f"{len(punct)} of {len(early)} layers before L_semantic have a whitespace/punctuation "
                               f"top-1 ")] + ([Text(_rows_cite(early).text())] if early else [])),
                        "the probe's whitespace/punctuation guard on the top-1 token"))
    e03 = [r for r in c.pure if isinstance(r["layer"], int) and r["layer"] <= 3]
    soft_cols = [k for k in (run.json.value("/copy_flag_columns") or []) if k.startswith("copy_soft")]
    copy_hits = [r for r in e03 if r["copy_collapse"] is True or any(r[k] is True for k in soft_cols)]
    items.append(_check(bool(copy_hits), "Copy reflex (layers 0–3)?",
                        [Text(f"{len(copy_hits)} of {len(e03)} rows flagged ")] + ([Text(_rows_cite(e03).text())]
                                                                                   if e03 else []),
                        "copy_collapse or a soft copy flag is True in layers 0–3"))
    first = [r for r in c.pure if isinstance(r["layer"], int) and r["layer"] <= min(5, (Ls - 1) if Ls else 5)]
    fill = [r for r in first if str(r["top1"] or "").strip().lower() in FILLER_WORDS]
    items.append(_check(bool(first) and 2 * len(fill) > len(first) if first else None,
                        "Grammatical filler anchoring?",
                        [Text(f"{len(fill)} of {len(first)} early layers have a filler top-1 ")]
                        + ([Text(_rows_cite(first).text())] if first else []),
                        f"most of layers 0…min(5, L_semantic − 1) have a top-1 in {{{', '.join(FILLER_WORDS)}}}"))
    pref = J("/measurement_guidance/preferred_lens_for_reporting")
    shown = {"norm"} | ({"tuned"} if run.tuned_loaded else set())
    items.append(_check(pref.ok and pref.value in shown, "Preferred lens honoured in the milestones?",
                        [Val(pref, "preferred_lens_for_reporting")],
                        "the preferred lens's milestones are in the tables above"))
    conf = J("/diagnostics/confirmed_semantics/L_semantic_confirmed")
    items.append(_check(True if conf.ok else None, "Confirmed semantics reported when available?",
                        [Val(conf, "L_semantic_confirmed"), Text(", "),
                         c.val("/diagnostics/confirmed_semantics/confirmed_source", "confirmed_source")],
                        "a confirmed layer exists and is the bold row"))
    full = "/diagnostics/raw_lens_full/"
    have_full = all(J(full + k).cite is not None for k in ("pct_layers_kl_ge_1.0", "n_norm_only_semantics_layers",
                                                           "earliest_norm_only_semantic", "score/tier"))
    items.append(_check(have_full, "Full dual-lens metrics cited?", [c.val(full + "score/tier", "tier")],
                        "raw_lens_full has the KL shares, norm-only counts and the score tier"))
    att = J("/tuned_lens/attribution")
    items.append(_check(None if not run.tuned_loaded else (not att.absent), "Tuned-lens attribution done?",
                        [c.val("/diagnostics/tuned_lens/status", "status")] if not run.tuned_loaded else
                        [Text("ΔKL tuned / temperature / rotation at p25, p50, p75 "),
                         Text(att.cite.text() if att.cite else "")],
                        "tuned_lens.attribution is present (– without a tuned lens)"))
    npl = len(run.json.value("/diagnostics/normalization_provenance/per_layer", []) or [])
    pl = "/diagnostics/normalization_provenance/per_layer/"
    last_src = J(pl + f"{npl - 1}/ln_source") if npl else ABSENT
    items.append(_check(npl == c.n + 1 and last_src.value in ("ln_final", "raw"), "normalization_provenance present?",
                        [c.val(pl + "0/ln_source"), Text(", "), Val(last_src)],
                        "one entry per layer 0…n, the last one ln_final"))
    spike = J("/diagnostics/flags/normalization_spike")
    items.append(_check(not spike.ok, "Per-layer normaliser effect without spikes?",
                        [c.val("/diagnostics/norm_trajectory/n_spikes", "n_spikes"), Text(", "),
                         c.val("/diagnostics/norm_trajectory/shape", "shape")],
                        "flag normalization_spike not raised"))
    items.append(_check(None if ub.absent else True, "Unembedding bias audited?", [c.val("/diagnostics/unembed_bias/l2_norm",
                                                                                    "l2_norm")],
                        "unembed_bias block present"))
    det = J("/provenance/env/deterministic_algorithms")
    items.append(_check(None if det.absent else det.value is True, "deterministic_algorithms = true?", [Val(det)],
                        "provenance.env.deterministic_algorithms"))
    nh = "/diagnostics/numeric_health/"
    clean = (J(nh + "any_nan").value is False and J(nh + "any_inf").value is False
             and J(nh + "layers_flagged").value == [])
    items.append(_check(clean, "numeric_health clean?", [c.val(nh + "any_nan", "any_nan"), Text(", "),
                                                          c.val(nh + "any_inf", "any_inf"), Text(", "),
                                                          c.val(nh + "layers_flagged", "layers_flagged")],
                        "no NaN / Inf and no layer flagged"))
    cm = J("/diagnostics/copy_mask/size")
    items.append(_check(cm.ok and isinstance(cm.value, int) and cm.value > 0, "copy_mask present & plausible?",
                        [Val(cm, "size")], "a non-empty whitespace/punctuation mask"))
    lm = J("/diagnostics/layer_map")
    items.append(_check(isinstance(lm.value, list) and len(lm.value) == c.n + 1, "layer_map present?",
                        [Text(f"{len(lm.value) if isinstance(lm.value, list) else 0} entries "),
                         Text(lm.cite.text() if lm.cite else "")], "one entry per layer 0…n"))
    ga = J("/diagnostics/gold_alignment_rate")
    items.append(_check(ga.ok and ga.value == 1.0, "Gold answer aligned for every prompt?", [Val(ga, "gold_alignment_rate")],
                        "gold_alignment_rate = 1.0 (flag gold_alignment_partial otherwise)"))
    warn = J("/diagnostics/last_layer_consistency/warn_high_last_layer_kl")
    items.append(_check(None if warn.absent else warn.value is False, "Last-layer head reproduced (KL < 0.25 bit)?",
                        [Val(warn, "warn_high_last_layer_kl")], "the diagnostics' warn_high_last_layer_kl"))
    for flag, text in (("low_lens_consistency_at_semantic", "Lenses agree at the semantic layer?"),
                       ("pos_window_low_stability", "Answer stable across prompt positions?"),
                       ("decoding_point_sensitive", "Decoding point insensitive?"),
                       ("repeatability_variance_high", "Re-decode repeatable?")):
        fv = J(f"/diagnostics/flags/{flag}")
        items.append(_check(not fv.ok, text, [Val(fv, flag) if not fv.absent else Text(f"flag {flag} not raised ")]
                            + ([] if not fv.absent else [Text(J("/diagnostics/flags").cite.text()
                                                              if J("/diagnostics/flags").cite else "")]),
                            f"diagnostics.flags.{flag} not raised"))
    doc.add(Para([Text("✓ yes, ✗ no, – not applicable or not recorded. Each rule is the one stated in brackets.")]))
    doc.add(Bullets(items))


def _limitations(c: _Ctx, doc: Doc) -> None:
    run = c.run
    doc.add(Heading(1, "6. Limitations & Data Quirks", "limitations"))
    items = []
    reasons = run.json.value("/measurement_guidance/reasons") or []
    for i, r in enumerate(reasons):
        items.append([c.val(f"/measurement_guidance/reasons/{i}"), Text(": "
                                                                        + REASON_TEXT.get(str(r), "see docs/probe_metrics.md")
                                                                        + ".")])
    if not reasons:
        items.append([Text("No measurement-guidance reason is raised "), c.val("/measurement_guidance/reasons"),
                      Text(".")])
    items.append([Text("Guidance: "), c.val("/measurement_guidance/prefer_ranks", "prefer_ranks"), Text(", "),
                  c.val("/measurement_guidance/suppress_abs_probs", "suppress_abs_probs"), Text(". "),
                  c.val("/measurement_guidance/notes", quote=False), Text(" "),
                  c.val("/measurement_guidance/notes_append", quote=False)])
    if run.j("/diagnostics/tau_norm_calibration/in_sample").value is True:
        items.append([Text("Norm-lens temperatures are fitted in-sample ("),
                      c.val("/diagnostics/tau_norm_calibration/in_sample", "in_sample"),
                      Text("), so the temperature-only KL gains are optimistic.")])
    fin = c.pure_by_layer.get(c.n)
    if fin is not None:
        items.append([Text("Rest mass is top-k coverage, not lens fidelity: "), Val(fin.get("rest_mass"),
                                                                                   f"rest_mass(L{c.n})"), Text(".")])
    if not run.tuned_loaded:
        items.append([Text("Without a tuned lens the conclusions rest on the norm and raw lenses only.")])
    if not run.prism_present:
        items.append([Text("No Prism sidecar: Prism-based checks are not available.")])
    n = c.n
    if n < 12:
        items.append([Text("A small model: "), c.val("/model_stats/num_layers", "num_layers"),
                      Text(" layers make every depth fraction coarse (one layer = "), Text(f"1/{n} of depth)."),
                      ])
    doc.add(Bullets(items))


def fingerprint(run: Run) -> list:
    """The one-line model fingerprint (inline parts, every number cited)."""
    return _fingerprint(_Ctx(run))


def _fingerprint(c: _Ctx) -> list:
    run = c.run
    conf = c.j("/diagnostics/confirmed_semantics/L_semantic_confirmed")
    parts = [c.val("/diagnostics/model", quote=False), Text(" ("), c.val("/model_stats/num_layers", "layers"),
             Text("): collapse at "), c.val("/diagnostics/L_semantic", "L_semantic")]
    if conf.ok:
        parts += [Text(" (confirmed by "), c.val("/diagnostics/confirmed_semantics/confirmed_source", quote=False),
                  Text(")")]
    else:
        parts += [Text(" (not confirmed)")]
    parts += [Text(", "), c.val("/diagnostics/depth_fractions/L_semantic_frac", "L_semantic_frac"), Text("; "),
              c.val("/diagnostics/first_rank_le_5", "first_rank_le_5"), Text("; "),
              c.val("/diagnostics/first_kl_below_1.0", "first_kl_below_1.0"), Text("; final-layer "),
              c.val("/diagnostics/last_layer_consistency/kl_to_final_bits", "KL"), Text("; cosine "),
              c.val("/diagnostics/cos_milestones/norm/ge_0.2", "ge_0.2"), Text("; raw-vs-norm "),
              c.val("/diagnostics/raw_lens_full/score/tier", "tier")]
    if run.tuned_loaded:
        parts += [Text("; tuned "), c.val("/tuned_lens/summaries/0/L_semantic", "L_semantic"), Text(", "),
                  c.val("/tuned_lens/summaries/0/first_kl_below_1.0", "first_kl_below_1.0")]
    parts.append(Text("."))
    return parts


def _figures(run: Run, doc: Doc) -> None:
    from jaxlens.report.figures import figure_specs

    doc.add(Heading(1, "2. Figures", "figures"))
    doc.add(Para([Text("The PNGs are drawn at paper size (every text ≥ 8 pt); report.html has the same figures "
                       "with the value and its CSV line under the pointer.")]))
    keys = {"fig-trajectories.png": "trajectories", "fig-fact-ranks.png": "fact-ranks",
            "fig-raw-vs-norm.png": "raw-vs-norm"}
    for name, caption, _ in figure_specs(run):
        key = keys.get(name, name[len("fig-"):-len(".png")])
        doc.add(Figure(name, caption, svg_key=key))


def _sources(run: Run, doc: Doc) -> None:
    doc.add(Heading(1, "8. Sources", "sources"))
    doc.add(Para([Text("Files read (names relative to the run directory). A citation [file:line key] names the file, "
                       "the 1-based line and the JSON Pointer or CSV column; [file:a-b] a block of lines.")]))
    doc.add(Table(["file", "lines", "sha256"], [Row([Code(f), Text(str(n)), Code(h)]) for f, h, n in run.files],
                  mode="plain"))


def build_document(run: Run) -> Doc:
    c = _Ctx(run)
    doc = Doc(f"Evaluation Report: {run.model}")
    doc.add(Para([Text("Written by jaxlens report from the probe output alone; no language model is involved. Every "
                       "number is cited as [file:line key]: the file in the run directory, its line, and the JSON "
                       "Pointer or CSV column.")]))
    _overview(c, doc)
    _figures(run, doc)
    _sanity(c, doc)
    _quantitative(c, doc)
    _qualitative(c, doc)
    _checklist(c, doc)
    _limitations(c, doc)
    doc.add(Heading(1, "7. Model Fingerprint", "fingerprint"))
    doc.add(Para(_fingerprint(c)))
    _sources(run, doc)
    return doc
