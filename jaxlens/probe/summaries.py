"""Per-pass summaries of the probe (spec §2.4-2.11, 2.22, 2.24, 2.25, 2.27): milestones, copy stability,
semantic gates, control / ablation summaries, the micro-suite and the run-level probes.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from jaxlens.probe.metrics import (
    ReferenceQuirks,
    _log_softmax32,
    copy_soft_label,
    copy_strict_label,
    depth_fraction,
    entropy_bits_from_logits,
    first_layer,
    format_threshold,
    percentile,
)
from jaxlens.probe.suite import CopyThresholds, SemanticThresholds, Thresholds

# ==============================================================================================
# Summaries of one pass
# ==============================================================================================

def _col(cols: Mapping, name: str, n: int) -> list:
    v = cols.get(name)
    return [None] * n if v is None else list(v)


def rank_milestones(answer_rank: Sequence, layers: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict:
    """``first_rank_le_{k}``: first layer with answer_rank <= k."""
    return {f"first_rank_le_{k}": first_layer([r is not None and int(r) <= k for r in answer_rank], layers)
            for k in ks}


def kl_milestones(kl: Sequence, layers: Sequence[int], thresholds: Sequence[float] = (0.5, 1.0)) -> dict:
    """``first_kl_below_{x}``: first layer with KL <= x (note "<=")."""
    return {f"first_kl_below_{float(x)}": first_layer([v is not None and float(v) <= x for v in kl], layers)
            for x in thresholds}


def cos_milestones(cos: Sequence, layers: Sequence[int], thresholds: Sequence[float] = (0.2, 0.4, 0.6)) -> dict:
    """``cos_milestones[lens]``: {ge_x: first layer with cos_to_final >= x} (thresholds sorted)."""
    out = {}
    for t in sorted(set(float(x) for x in thresholds)):
        out[f"ge_{format_threshold(t, 3)}"] = first_layer([c is not None and float(c) >= t for c in cos], layers)
    return out


def entropy_gap_summary(entropy_bits: Sequence, teacher_entropy_bits) -> tuple:
    """(``entropy_gap_bits_percentiles`` {p25, p50, p75}, ``entropy_gap_samples``): percentiles of
    entropy_bits - teacher_entropy_bits over the layers of the pass."""
    if not isinstance(teacher_entropy_bits, (list, tuple, np.ndarray)):
        teacher_entropy_bits = [teacher_entropy_bits] * len(entropy_bits)
    gaps = [float(e) - float(t) for e, t in zip(entropy_bits, teacher_entropy_bits)
            if e is not None and t is not None]
    return {"p25": percentile(gaps, 0.25), "p50": percentile(gaps, 0.50), "p75": percentile(gaps, 0.75)}, len(gaps)


def copy_stability(L_by_tau: Mapping[float, Optional[int]], n_layers: int,
                   cfg: Optional[CopyThresholds] = None, *, quirk: bool = False) -> str:
    """§2.3 stability of the strict-copy sweep: "none" if every L is null; "mixed" if L(max tau) or
    L(min tau) is null; else with Δ = |L(max) - L(min)|: "stable" if Δ <= 2 or Δ/n <= 0.05, "fragile" if
    Δ >= 6 or Δ/n >= 0.15, else "mixed". ``quirk`` reproduces reference bug N1."""
    cfg = cfg or CopyThresholds()
    if all(v is None for v in L_by_tau.values()):
        return "none"
    if quirk:
        return "mixed"
    taus = sorted(L_by_tau)
    hi, lo = L_by_tau[taus[-1]], L_by_tau[taus[0]]
    if hi is None or lo is None:
        return "mixed"
    d = abs(int(hi) - int(lo))
    frac = d / float(n_layers) if n_layers and n_layers > 0 else 0.0
    if d <= cfg.stability_stable_layers or frac <= cfg.stability_stable_frac:
        return "stable"
    if d >= cfg.stability_fragile_layers or frac >= cfg.stability_fragile_frac:
        return "fragile"
    return "mixed"


def copy_thresholds_summary(cols: Mapping, layers: Sequence[int], n_layers: int,
                            cfg: Optional[CopyThresholds] = None, *, quirk: bool = False) -> dict:
    """``copy_thresholds`` {tau_list, L_copy_strict, L_copy_strict_frac, norm_only_flags (None until
    :func:`copy_norm_only_flags` fills them), stability}. Keys are the 2-decimal stripped labels."""
    cfg = cfg or CopyThresholds()
    taus = sorted(set(float(x) for x in cfg.strict_sweep))
    n = len(layers)
    L_map, L_by_tau = {}, {}
    for t in taus:
        key = format_threshold(t, 2)
        L = first_layer(_col(cols, copy_strict_label(t, sweep=True), n), layers)
        L_map[key] = L
        L_by_tau[t] = L
    return {
        "tau_list": [float(t) for t in taus],
        "L_copy_strict": L_map,
        "L_copy_strict_frac": {k: depth_fraction(v, n_layers) for k, v in L_map.items()},
        "norm_only_flags": {k: None for k in L_map},
        "stability": copy_stability(L_by_tau, n_layers, cfg, quirk=quirk),
    }


def copy_norm_only_flags(L_copy_strict: Mapping[str, Optional[int]], window_rows: Iterable[Mapping],
                         radius: int) -> dict:
    """``copy_thresholds.norm_only_flags`` after the windowed raw-lens check (§2.15 b): for each non-null
    L(tau), True iff no raw-lens window row (``lens == "raw"``) within ±radius of L has
    ``copy_strict@tau`` true; None where L(tau) is null."""
    rows = [r for r in window_rows if r.get("lens") == "raw"]
    out = {}
    for key, L in L_copy_strict.items():
        if L is None:
            out[key] = None
            continue
        label = f"copy_strict@{key}"
        hit = any(bool(r.get(label)) for r in rows
                  if r.get("layer") is not None and abs(int(r["layer"]) - int(L)) <= radius)
        out[key] = not hit
    return out


def semantic_summary(cols: Mapping, layers: Sequence[int], n_layers: int, *, p_uniform: Optional[float],
                     cfg: Optional[SemanticThresholds] = None,
                     quirks: ReferenceQuirks = ReferenceQuirks()) -> dict:
    """Semantic collapse and gates (§2.5, §2.9) from the pure columns.

    Returns {L_semantic, L_semantic_margin_ok, answer_margin_thresholds, semantic_margin,
    semantic_gate, L_semantic_run2, L_semantic_strong, L_semantic_strong_run2, L_semantic_top2_ok}.
    Strong = rank 1 ∧ answer_minus_uniform >= δ_abs ∧ answer_logit_gap >= δ_top2; run-of-two needs the
    flag at ℓ and at ℓ + 1 (a missing ℓ + 1 row counts as False).
    """
    cfg = cfg or SemanticThresholds()
    n = len(layers)
    rank = _col(cols, "answer_rank", n)
    amu = _col(cols, "answer_minus_uniform", n)
    gap = [None] * n if quirks.q1_gap_not_in_summaries else _col(cols, "answer_logit_gap", n)
    margin_ok = _col(cols, "semantic_margin_ok", n)
    p_ans = _col(cols, "p_answer", n)
    is_ans = _col(cols, "is_answer", n)

    rank1 = [r is not None and int(r) == 1 for r in rank]
    strong = [r1 and a is not None and float(a) >= cfg.margin_delta_abs and g is not None
              and float(g) >= cfg.top2_delta_logit for r1, a, g in zip(rank1, amu, gap)]
    top2_ok = [r1 and g is not None and float(g) >= cfg.top2_delta_logit for r1, g in zip(rank1, gap)]
    by_layer = {l: i for i, l in enumerate(layers)}

    def run2(flags):
        for l in sorted(layers):
            j = by_layer.get(l + 1)
            if flags[by_layer[l]] and j is not None and flags[j]:
                return l
        return None

    L_sem = first_layer(is_ans, layers)
    L_margin = first_layer([bool(m) if m is not None else False for m in margin_ok], layers)
    L_top2 = first_layer(top2_ok, layers)
    i_sem = by_layer.get(L_sem) if L_sem is not None else None
    margin_at_sem = None
    if i_sem is not None:
        if margin_ok[i_sem] is not None:
            margin_at_sem = bool(margin_ok[i_sem])
        elif rank[i_sem] is not None and amu[i_sem] is not None:
            margin_at_sem = bool(int(rank[i_sem]) == 1 and float(amu[i_sem]) >= cfg.margin_delta_abs)
    gap_thr = {f"gap_ge_{float(x)}": first_layer([g is not None and float(g) >= x for g in gap], layers)
               for x in cfg.answer_gap_thresholds}
    L_run2, L_strong, L_strong_run2 = run2(rank1), first_layer(strong, layers), run2(strong)
    return {
        "L_semantic": L_sem,
        "L_semantic_margin_ok": L_margin,
        "answer_margin_thresholds": gap_thr,
        "semantic_margin": {
            "delta_abs": float(cfg.margin_delta_abs),
            "p_uniform": None if p_uniform is None else float(p_uniform),
            "L_semantic_margin_ok_norm": L_margin,
            "margin_ok_at_L_semantic_norm": margin_at_sem,
            "p_answer_at_L_semantic_norm": None if i_sem is None or p_ans[i_sem] is None else float(p_ans[i_sem]),
        },
        "semantic_gate": {
            "delta_top2_logit": float(cfg.top2_delta_logit),
            "L_semantic_top2_ok_norm": L_top2,
            "L_semantic_top2_ok_norm_frac": depth_fraction(L_top2, n_layers),
            "gap_at_L_semantic_norm": None if i_sem is None or gap[i_sem] is None else float(gap[i_sem]),
            "delta_abs": float(cfg.margin_delta_abs),
            "L_semantic_run2": L_run2,
            "L_semantic_strong": L_strong,
            "L_semantic_strong_run2": L_strong_run2,
        },
        "L_semantic_run2": L_run2,
        "L_semantic_strong": L_strong,
        "L_semantic_strong_run2": L_strong_run2,
        "L_semantic_top2_ok": L_top2,
    }


def summarize_pass(cols: Mapping[str, Sequence], *, n_layers: int, lens: str = "norm",
                   p_uniform: Optional[float] = None, thresholds: Optional[Thresholds] = None,
                   quirks: ReferenceQuirks = ReferenceQuirks()) -> dict:
    """The per-pass summary (the primary pass's is merged into ``diagnostics``; tuned ones go to
    ``tuned_lens.summaries``), keys in reference order.

    ``cols`` are pure next-token columns keyed by CSV name (from :func:`pure_next_token_metrics`, or
    parsed from a pure CSV), with a ``layer`` column. Surface keys carry the ``_{lens}`` suffix;
    ``cos_milestones`` is keyed by lens; ``depth_fractions`` exists for the norm lens only (reference).
    ``p_uniform`` = 1/V.
    """
    th = thresholds or Thresholds()
    cc, sc, su = th.copy, th.semantic, th.surface
    layers = [int(x) for x in cols["layer"]]
    n = len(layers)
    soft_ks = list(dict.fromkeys(int(k) for k in cc.soft_window_ks))

    L_copy = first_layer(_col(cols, "copy_collapse", n), layers)
    L_copy_H = first_layer(_col(cols, "entropy_collapse", n), layers)
    sem = semantic_summary(cols, layers, n_layers, p_uniform=p_uniform, cfg=sc, quirks=quirks)
    L_sem = sem["L_semantic"]
    L_soft = {k: first_layer(_col(cols, copy_soft_label(k, cc.soft_threshold), n), layers) for k in soft_ks}
    d_soft = {k: (None if L_sem is None or v is None else L_sem - v) for k, v in L_soft.items()}
    delta = None if L_copy is None or L_sem is None else L_sem - L_copy

    s: dict = {
        "L_copy": L_copy,
        "L_copy_H": L_copy_H,
        "L_semantic": L_sem,
        "delta_layers": delta,
        "copy_thresh": float(cc.strict_threshold),
        "copy_window_k": int(cc.strict_window_k),
        "copy_match_level": "id_subsequence",
    }
    s.update(kl_milestones(_col(cols, "kl_to_final_bits", n), layers, sc.kl_milestones))
    s.update(rank_milestones(_col(cols, "answer_rank", n), layers, sc.rank_milestones))
    s["copy_soft_threshold"] = float(cc.soft_threshold)
    s["copy_soft_window_ks"] = soft_ks
    s["L_copy_soft"] = dict(L_soft)
    s["delta_layers_soft"] = dict(d_soft)
    s["copy_detector"] = {
        "strict": {"thresh": float(cc.strict_threshold), "k": int(cc.strict_window_k), "L_copy_strict": L_copy},
        "soft": {"thresh": float(cc.soft_threshold), "window_ks": list(soft_ks),
                 "L_copy_soft": {f"k{k}": L_soft[k] for k in soft_ks}},
        "deltas": {"\u0394_sem_minus_copy_strict": delta,
                   "\u0394_sem_minus_copy_soft": {f"k{k}": d_soft[k] for k in soft_ks}},
    }
    s["answer_margin_thresholds"] = sem["answer_margin_thresholds"]
    pct, count = entropy_gap_summary(_col(cols, "entropy_bits", n), _col(cols, "teacher_entropy_bits", n))
    s["entropy_gap_bits_percentiles"] = pct
    s["entropy_gap_samples"] = count
    s["copy_thresholds"] = copy_thresholds_summary(cols, layers, n_layers, cc, quirk=quirks.copy_stability_key_bug)

    # surface (§2.6), geometry (§2.7), top-K decay (§2.8)
    ans, echo = _col(cols, "answer_mass", n), _col(cols, "echo_mass_prompt", n)
    i_surf = next((i for i in sorted(range(n), key=lambda i: layers[i])
                   if ans[i] is not None and echo[i] is not None and float(ans[i]) >= float(echo[i]) + su.surface_delta),
                  None)
    ca, cp = _col(cols, "cos_to_answer", n), _col(cols, "cos_to_prompt_max", n)
    i_geom = next((i for i in sorted(range(n), key=lambda i: layers[i])
                   if ca[i] is not None and cp[i] is not None and float(ca[i]) >= float(cp[i]) + su.geom_gamma), None)
    tk = _col(cols, "topk_prompt_mass@50", n)
    i_tk = next((i for i in sorted(range(n), key=lambda i: layers[i])
                 if tk[i] is not None and float(tk[i]) <= su.topk_prompt_tau), None)
    sfx = f"_{lens}" if lens else ""
    s[f"L_surface_to_meaning{sfx}"] = None if i_surf is None else layers[i_surf]
    s[f"answer_mass_at_L_surface{sfx}"] = None if i_surf is None else float(ans[i_surf])
    s[f"echo_mass_at_L_surface{sfx}"] = None if i_surf is None else float(echo[i_surf])
    s[f"L_geom{sfx}"] = None if i_geom is None else layers[i_geom]
    s[f"cos_to_answer_at_L_geom{sfx}"] = None if i_geom is None else float(ca[i_geom])
    s[f"cos_to_prompt_max_at_L_geom{sfx}"] = None if i_geom is None else float(cp[i_geom])
    s[f"L_topk_decay{sfx}"] = None if i_tk is None else layers[i_tk]
    s[f"topk_prompt_mass_at_L{sfx}"] = None if i_tk is None else float(tk[i_tk])
    s[f"topk_prompt_tau{sfx}"] = float(su.topk_prompt_tau)
    s[f"surface_delta{sfx}"] = float(su.surface_delta)
    s[f"geom_gamma{sfx}"] = float(su.geom_gamma)
    s["cos_milestones"] = {lens or "norm": cos_milestones(_col(cols, "cos_to_final", n), layers, su.cos_milestones)}

    if (lens or "norm") == "norm" and n_layers and n_layers > 0:
        df = {"L_semantic_frac": depth_fraction(L_sem, n_layers),
              "first_rank_le_5_frac": depth_fraction(s.get("first_rank_le_5"), n_layers),
              "L_copy_strict_frac": depth_fraction(L_copy, n_layers)}
        for k in sorted(soft_ks):
            df[f"L_copy_soft_k{k}_frac"] = depth_fraction(L_soft[k], n_layers)
        df["L_semantic_run2_frac"] = depth_fraction(sem["L_semantic_run2"], n_layers)
        df["L_semantic_strong_frac"] = depth_fraction(sem["L_semantic_strong"], n_layers)
        df["L_semantic_strong_run2_frac"] = depth_fraction(sem["L_semantic_strong_run2"], n_layers)
        s["depth_fractions"] = df
    s["L_semantic_margin_ok"] = sem["L_semantic_margin_ok"]
    s["semantic_margin"] = sem["semantic_margin"]
    s["semantic_gate"] = sem["semantic_gate"]
    return s


def add_confirmed_fields(summary: dict, L_semantic_confirmed: Optional[int],
                         window: int = 2) -> dict:
    """The two fields run.py adds to the primary summary once confirmed semantics exist (§2.5):
    ``semantic_margin.L_semantic_confirmed_margin_ok_norm`` (= L_confirmed if it equals the margin-ok
    layer, else None) and ``semantic_gate.run2_overlaps_confirmed_window`` (True iff L_run2 or
    L_run2 + 1 lies in [L_sem - window, L_sem + window] when a confirmed layer exists, else None).
    Mutates and returns ``summary``."""
    sm, sg = summary["semantic_margin"], summary["semantic_gate"]
    L_margin = sm.get("L_semantic_margin_ok_norm")
    sm["L_semantic_confirmed_margin_ok_norm"] = (
        L_semantic_confirmed if (L_semantic_confirmed is not None and L_semantic_confirmed == L_margin) else None)
    L_sem, L_run2 = summary.get("L_semantic"), sg.get("L_semantic_run2")
    if L_semantic_confirmed is None or L_sem is None:
        sg["run2_overlaps_confirmed_window"] = None
    else:
        lo, hi = L_sem - window, L_sem + window
        sg["run2_overlaps_confirmed_window"] = bool(L_run2 is not None and (lo <= L_run2 <= hi or lo <= L_run2 + 1 <= hi))
    return summary


def control_summary(cols: Mapping[str, Sequence], *, control_answer_id: Optional[int],
                    delta_top2_logit: float = 0.5) -> dict:
    """``control_summary`` over the control pass's norm rows (§2.10): first layer with control_margin > 0,
    max margin, first "strong" layer (margin > 0 ∧ control_top2_logit_gap >= δ ∧ top-1 == control id),
    max top-2 gap, δ."""
    layers = [int(x) for x in cols["layer"]]
    n = len(layers)
    margin, gap, top1 = (_col(cols, "control_margin", n), _col(cols, "control_top2_logit_gap", n),
                         _col(cols, "top1_id", n))
    first_pos = first_strong = None
    max_m = max_g = None
    for i in sorted(range(n), key=lambda i: layers[i]):
        m, g = margin[i], gap[i]
        if m is not None:
            max_m = float(m) if max_m is None else max(max_m, float(m))
            if m > 0 and first_pos is None:
                first_pos = layers[i]
        if g is not None:
            max_g = float(g) if max_g is None else max(max_g, float(g))
            if (m is not None and m > 0 and g >= delta_top2_logit and first_strong is None
                    and (control_answer_id is None or (top1[i] is not None and int(top1[i]) == int(control_answer_id)))):
                first_strong = layers[i]
    return {"first_control_margin_pos": first_pos, "max_control_margin": max_m,
            "first_control_strong_pos": first_strong, "max_control_top2_logit_gap": max_g,
            "delta_top2_logit_ctl": float(delta_top2_logit)}


def ablation_summary(orig: Mapping, no_filler: Mapping) -> dict:
    """``ablation_summary`` (§2.11) from the primary fact's orig and no_filler pass summaries
    (``L_copy`` and ``L_semantic``); deltas are no_filler - orig, None when a side is missing."""
    lc_o, ls_o = orig.get("L_copy"), orig.get("L_semantic")
    lc_n, ls_n = no_filler.get("L_copy"), no_filler.get("L_semantic")
    return {"L_copy_orig": lc_o, "L_sem_orig": ls_o, "L_copy_nf": lc_n, "L_sem_nf": ls_n,
            "delta_L_copy": None if lc_o is None or lc_n is None else lc_n - lc_o,
            "delta_L_sem": None if ls_o is None or ls_n is None else ls_n - ls_o}


def _round_or_none(x: Optional[float], nd: Optional[int] = None):
    if x is None:
        return None
    return round(x) if nd is None else round(x, nd)


def micro_suite(facts: Sequence[Mapping], *, n_layers: int, notes: str) -> dict:
    """Micro-suite block (§2.24) from each fact's pos/orig norm summary.

    ``facts``: one mapping per fact with ``fact_key``, ``fact_index``, ``summary`` (from
    :func:`summarize_pass`), ``row_offset`` (index, among the data rows of the pure CSV of all passes,
    of that pass's first row, whose layer is ``first_layer`` - default 0) and optional
    ``L_semantic_confirmed`` (the reference sets it for fact 0 only, Q11).

    Per fact: L_copy_strict, L_copy_soft_k1, L_semantic_norm, L_semantic_confirmed,
    L_semantic_margin_ok_norm, delta_hat = (L_sem - (L_copy_strict, else the earliest soft copy
    layer)) / n, row_index. Aggregates: medians rounded to int (Python round), delta_hat median to 4 d.p.,
    L_semantic_norm IQR [p25, p75] rounded, n_missing = facts without L_semantic.
    Returns {facts, aggregates, citations {fact_rows}}.
    """
    rows, cites = [], {}
    for f in facts:
        s = f["summary"]
        L_sem = s.get("L_semantic")
        L_strict = s.get("copy_detector", {}).get("strict", {}).get("L_copy_strict", s.get("L_copy"))
        soft = s.get("L_copy_soft", {}) or {}
        soft_vals = [v for v in soft.values() if v is not None]
        base = L_strict if L_strict is not None else (min(soft_vals) if soft_vals else None)
        delta_hat = None if (L_sem is None or base is None or not n_layers) else (L_sem - base) / float(n_layers)
        row_index = None
        if L_sem is not None and f.get("row_offset") is not None:
            row_index = int(f["row_offset"]) + int(L_sem) - int(f.get("first_layer", 0))
        rows.append({"fact_key": f["fact_key"], "fact_index": f["fact_index"], "L_copy_strict": L_strict,
                     "L_copy_soft_k1": soft.get(1, soft.get("1")), "L_semantic_norm": L_sem,
                     "L_semantic_confirmed": f.get("L_semantic_confirmed"),
                     "L_semantic_margin_ok_norm": s.get("L_semantic_margin_ok"),
                     "delta_hat": delta_hat, "row_index": row_index})
        cites[f["fact_key"]] = row_index

    def med(key):
        return _round_or_none(percentile([r[key] for r in rows], 0.5))

    sems = [r["L_semantic_norm"] for r in rows]
    iqr = None
    if any(v is not None for v in sems):
        iqr = [_round_or_none(percentile(sems, 0.25)), _round_or_none(percentile(sems, 0.75))]
    agg = {"n": len(rows),
           "L_copy_strict_median": med("L_copy_strict"),
           "L_copy_soft_k1_median": med("L_copy_soft_k1"),
           "L_semantic_norm_median": med("L_semantic_norm"),
           "L_semantic_confirmed_median": med("L_semantic_confirmed"),
           "L_semantic_margin_ok_norm_median": med("L_semantic_margin_ok_norm"),
           "delta_hat_median": _round_or_none(percentile([r["delta_hat"] for r in rows], 0.5), 4),
           "L_semantic_norm_iqr": iqr,
           "n_missing": sum(1 for v in sems if v is None),
           "notes": notes}
    return {"facts": rows, "aggregates": agg, "citations": {"fact_rows": cites}}


# ==============================================================================================
# Run-level probes (§2.22, §2.25)
# ==============================================================================================

def unembed_bias_audit(b_U) -> dict:
    """``diagnostics.unembed_bias`` = {present: ‖b‖₂ > 0, l2_norm, max_abs} (no bias -> zeros)."""
    if b_U is None:
        return {"present": False, "l2_norm": 0.0, "max_abs": 0.0}
    b = np.asarray(b_U, dtype=np.float64)
    l2 = float(np.linalg.norm(b))
    return {"present": bool(l2 > 0), "l2_norm": l2, "max_abs": float(np.max(np.abs(b))) if b.size else 0.0}


def final_head_probe(logits, decode: Callable[[int], str], *, top_k: int, kind: str = "final_prediction",
                     temperature: Optional[float] = None, prompt: Optional[str] = None) -> dict:
    """A final-head probe record (§2.25) from one [V] logits vector of the model's real head:
    {type, [prompt], [temperature], entropy (bits), topk: [[token, prob], ...]}. Probabilities are the
    fp32 softmax of logits / temperature; the top-k is by largest logit (ties by lower id).
    ``kind`` is "final_prediction", "test_prompt" or "temperature_exploration"."""
    z = np.asarray(logits, dtype=np.float32).reshape(-1)
    if temperature is not None:
        z = (z / np.float32(temperature)).astype(np.float32)
    lp = _log_softmax32(z)
    p = np.exp(lp)
    order = np.lexsort((np.arange(z.size), -z))[: int(top_k)]
    rec: dict = {"type": kind}
    if prompt is not None:
        rec["prompt"] = prompt
    if temperature is not None:
        rec["temperature"] = float(temperature)
    rec["entropy"] = entropy_bits_from_logits(z)
    rec["topk"] = [[decode(int(i)), float(p[i])] for i in order]
    return rec
