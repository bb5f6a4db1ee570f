"""The diagnostics stage of the probe: the fused decode stage (before ``pass_metrics``) and the summary
stage (after it), wiring the pure functions of the sibling modules together.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from jaxlens.errors import JaxlensError
from jaxlens.lens import pairwise as PW
from jaxlens.lens.multi import TemperedLens, calibration_grid_stats, multi_lens_stats, target_logits
from jaxlens.models.decoder import unembedding
from jaxlens.probe import metrics as M
from jaxlens.probe import summaries as SU
from jaxlens.probe.diagnostics.calibration import (
    fit_norm_temperatures,
    head_transforms,
    last_layer_consistency,
    norm_temp_snapshots,
    temperature_grid,
)
from jaxlens.probe.diagnostics.geometry import layer_map, norm_trajectory, normalization_provenance, resid_geometry
from jaxlens.probe.diagnostics.guidance import (
    artifact_audit_rows,
    diagnostic_flags,
    evaluation_pack,
    measurement_guidance,
    milestone_rows,
)
from jaxlens.probe.diagnostics.health import (
    forward_gate,
    numeric_health,
    position_window,
    preferred_milestone,
    repeatability,
    repeatability_flag,
)
from jaxlens.probe.diagnostics.raw_vs_norm import (
    _is_answer,
    artifact_score,
    artifact_score_config,
    full_rows,
    full_summary,
    raw_sample_layers,
    raw_sample_summary,
    raw_samples,
    topk_jaccard_np,
    window_centres,
    window_layers,
    window_radius,
    window_rows,
    window_summary,
)
from jaxlens.probe.diagnostics.semantics import (
    confirmed_semantics,
    decoding_point,
    decoding_point_entry,
    decoding_point_targets,
    gate_stability,
    lens_consistency,
    semantic_milestones,
)

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
    pair = PW.pair_stats(h_norm, h_raw, W, bias, spec.final_softcap, norm.lse[:, :, 0], raw.lse[:, :, 0])
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
            ct["norm_only_flags"] = SU.copy_norm_only_flags(ct["L_copy_strict"], rows, R_b)
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
    SU.add_confirmed_fields(s0, L_conf, window=th.semantic.confirm_window)

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
