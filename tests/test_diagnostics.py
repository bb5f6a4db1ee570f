"""jaxlens.probe.diagnostics (spec §2.12-2.20, §2.23, §2.26, §2.28) against independent computations.

* Pure functions: hand-worked numbers (in the comments) or numpy float64 re-derivations, plus regressions
  against the published Qwen3-14B outputs in tests/data/reference.
* The fused decodes and the pipeline: a tiny Qwen3 checkpoint whose primary gold answer is the model's own
  top-1 token (so every semantic milestone exists), recomputed in float64 from the transformers model:
  raw-lens KL / JS / L1 / entropies / Jaccards per layer, the normalisation geometry, the norm-lens
  temperatures and tempered KLs, the decoding-point ablation (post-attention norm vs next-block norm) and
  the lens-consistency metrics; and a tiny Gemma-2 whose final softcap the lens must apply (Q4).
"""
from __future__ import annotations

import csv
import json
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest

import hf_factory as F
from jaxlens.probe import diagnostics as D
from jaxlens.probe import metrics as M
from jaxlens.lens import multi as LM
from jaxlens.probe import summaries as SU
from reference_data import HEADERS_JSON, MILESTONES_CSV, PURE_CSV, REF_DIR, SKELETON  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
LN2 = math.log(2.0)


def _lsm(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _kl(zp, zq):
    lp, lq = _lsm(zp), _lsm(zq)
    return (np.exp(lp) * (lp - lq)).sum(-1) / LN2


# ==================================================================================================
# §2.12 last-layer consistency, §2.13 temperatures
# ==================================================================================================

def test_temperature_probe_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    zf = rng.normal(scale=3.0, size=257).astype(np.float32)
    grid = D.temperature_grid(0.1, 10.0, 25)
    assert grid[0] == 0.1 and grid[12] == 1.0 and grid[-1] == 10.0 and len(grid) == 25
    for i in (3, 12, 19):
        s0 = grid[i]
        # softmax(z/s) == softmax(zf) exactly at s = s0 when the lens logits are zf * s0
        est, kl = D.temperature_probe(zf * s0, zf, grid)
        assert est == pytest.approx(s0) and kl == pytest.approx(0.0, abs=1e-9)
    # between grid points the estimate is the closest point in KL
    est, kl = D.temperature_probe(zf * 1.3, zf, grid)
    klg = [_kl(zf * 1.3 / s, zf) for s in grid]
    assert est == grid[int(np.argmin(klg))] and kl == pytest.approx(min(klg), rel=1e-9)


def test_last_layer_consistency_gate_and_transforms():
    rng = np.random.default_rng(1)
    zf = rng.normal(scale=2.0, size=300).astype(np.float32)
    a = int(np.argsort(-zf)[3])                      # the answer is the model's 4th token
    same = D.last_layer_consistency(zf, zf, a)
    assert same["kl_to_final_bits"] == pytest.approx(0.0, abs=1e-12) and same["top1_agree"]
    assert same["answer_rank_lens"] == 4 and same["temp_est"] == 1.0
    assert not same["warn_high_last_layer_kl"] and same["gates"]["threshold_bits"] == 0.25
    assert same["p_answer_lens"] == pytest.approx(np.exp(_lsm(zf))[a])
    # a lens that is the head at temperature 1/2.61: KL >= 0.25 and the temperature probe removes it
    z = zf * 2.61
    r = D.last_layer_consistency(z, zf, a)
    assert r["kl_to_final_bits"] == pytest.approx(_kl(z, zf), rel=1e-9) and r["kl_to_final_bits"] >= 0.25
    assert r["warn_high_last_layer_kl"] and r["temp_est"] == pytest.approx(2.610157215682537, rel=1e-6)
    assert r["gates"]["delta_kl_temp_bits"] == pytest.approx(r["kl_to_final_bits"] - r["kl_after_temp_bits"])
    # just below / above the 0.25-bit gate, with a temperature the grid cannot undo (a permutation)
    base = np.array([3.0, 0.0, 0.0, 0.0], np.float32)
    for x, warn in ((0.85, False), (0.90, True)):          # KL 0.244 / 0.284 bits
        zl = np.array([3.0 - x, x, 0.0, 0.0], np.float32)     # mass moves from token 0 to token 1
        rr = D.last_layer_consistency(zl, base, 0)
        kl = rr["kl_to_final_bits"]
        assert (kl >= 0.25 or kl - rr["kl_after_temp_bits"] >= 0.25) == warn == rr["warn_high_last_layer_kl"]
    # head transforms: softcap c = 6 on pre-cap logits; the softcapped lens is the head
    zp = (rng.normal(scale=8.0, size=300)).astype(np.float32)
    zc = (6.0 * np.tanh(zp / 6.0)).astype(np.float32)
    t = D.last_layer_consistency(zc, zc, None, z_pre=zp, transforms={"scale": None, "softcap": 6.0},
                                 softcap_in_lens=6.0)
    assert t["kl_after_transform_bits"]["softcap"] == pytest.approx(0.0, abs=1e-9)
    assert t["kl_after_transform_bits"]["scale"] is None and t["kl_after_transform_bits"]["scale_then_softcap"] is None
    assert t["lens_head_transform"]["kl_to_final_bits_without_softcap"] == pytest.approx(_kl(zp, zc), rel=1e-6)
    t2 = D.last_layer_consistency(zc, zc, None, z_pre=zp, transforms={"scale": 2.0, "softcap": 6.0})
    assert t2["kl_after_transform_bits"]["scale"] == pytest.approx(_kl(zp / 2.0, zc), rel=1e-6)
    want = _kl(6 * np.tanh(zp / 2 / 6), zc)
    assert t2["kl_after_transform_bits"]["scale_then_softcap"] == pytest.approx(want, rel=1e-6)


def test_head_transform_detection():
    assert D.head_transforms({"final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}) == \
        {"scale": None, "softcap": 30.0}
    # Q4: the reference's names miss HF's Gemma-2 attribute
    assert D.head_transforms({"final_logit_softcapping": 30.0}, reference_names_only=True) == \
        {"scale": None, "softcap": None}
    assert D.head_transforms({"logit_scale": 2, "softcap": "30", "final_logit_softcap": True}) == \
        {"scale": 2.0, "softcap": None}                 # strings / booleans are not numbers
    assert D.head_transforms({"text_config": {"final_logits_softcap": 15}}) == {"scale": None, "softcap": 15.0}
    assert D.head_transforms({}, model_attrs={"final_logits_scale": 0.5, "logit_softcap": 20.0}) == \
        {"scale": 0.5, "softcap": 20.0}
    assert D.head_transforms(None) == {"scale": None, "softcap": None}


def test_fit_norm_temperatures_hand_worked():
    grid = np.array([0.5, 1.0, 2.0])
    # 2 prompts x 2 layers x 3 temperatures; layer 0 means [2, 1.5, 3] -> 1.0; layer 1 means [1, 1, 2] ->
    # tie between 0.5 and 1.0 -> the first (0.5)
    ce = np.array([[[1.0, 2.0, 3.0], [1.0, 0.0, 2.0]],
                   [[3.0, 1.0, 3.0], [1.0, 2.0, 2.0]]])
    np.testing.assert_array_equal(D.fit_norm_temperatures(ce, grid), [1.0, 0.5])
    np.testing.assert_array_equal(D.fit_norm_temperatures(np.zeros((0, 4, 3)), grid), np.ones(4))
    g = D.temperature_grid(0.2, 5.0, 25)
    assert g[0] == 0.2 and g[12] == 1.0 and g[-1] == 5.0 and g[18] == pytest.approx(math.sqrt(5.0))


def test_calibration_grid_kernel_matches_dense_float64():
    rng = np.random.default_rng(2)
    M_, d, V, P = 7, 16, 1000, 3
    h = rng.normal(size=(M_, d)).astype(np.float32)
    W = rng.normal(scale=0.7, size=(d, V)).astype(np.float32)
    b = rng.normal(scale=0.1, size=(V,)).astype(np.float32)
    zf = rng.normal(scale=2.0, size=(P, V)).astype(np.float32)
    row_pass = np.array([0, 0, 1, 1, 2, 2, 0])
    temps = D.temperature_grid(0.2, 5.0, 9)
    for cap in (None, 4.0):
        out = LM.calibration_grid_stats(h, W, zf, row_pass, temps, bias=b, softcap=cap, chunk=256)  # 4 chunks, ragged
        z = h.astype(np.float64) @ W.astype(np.float64) + b
        if cap:
            z = cap * np.tanh(z / cap)
        q = np.exp(_lsm(zf))[row_pass]
        lq = np.log(q + 1e-30)
        for j, t in enumerate(temps):
            lp = _lsm(z / t)
            ce = -(q * lp).sum(-1) / LN2
            kl = (np.exp(lp) * (lp - lq)).sum(-1) / LN2
            np.testing.assert_allclose(out["ce_bits"][:, j], ce, rtol=2e-5, atol=2e-5)
            np.testing.assert_allclose(out["kl_bits"][:, j], kl, rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(out["max_logit"], z.max(-1), rtol=1e-5)
        np.testing.assert_allclose(out["min_logit"], z.min(-1), rtol=1e-5)
        assert (out["n_nonfinite"] == 0).all()
    h2 = h.copy()
    h2[3, 0] = np.nan
    out = LM.calibration_grid_stats(h2, W, zf, row_pass, temps, bias=b, chunk=256)    # the first kernel again
    assert out["n_nonfinite"][3] == out["n_nan"][3] == V and (np.delete(out["n_nonfinite"], 3) == 0).all()


def test_reference_norm_temp_snapshots_and_spikes():
    with open(PURE_CSV, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["prompt_id"] == "pos" and r["prompt_variant"] == "orig"
                and r["fact_index"] == "0"]
    sk = json.loads(SKELETON.read_text(encoding="utf-8"))["diagnostics"]
    snaps = D.norm_temp_snapshots([float(r["kl_to_final_bits_norm_temp"]) for r in rows], 40)
    for k in ("kl_to_final_bits_norm_temp@25%", "kl_to_final_bits_norm_temp@50%", "kl_to_final_bits_norm_temp@75%"):
        assert snaps[k] == sk[k], k
    # the trajectory's spike count from the CSV's resid_norm_ratio / delta_resid_cos (L_semantic = 36)
    per = [{"layer": int(r["layer"]), "resid_norm_ratio": float(r["resid_norm_ratio"]),
            "delta_resid_cos": float(r["delta_resid_cos"]), "raw_resid_norm": None} for r in rows]
    tr = D.norm_trajectory(per, 36)
    assert tr["n_spikes"] == sk["norm_trajectory"]["n_spikes"] == 14 and tr["shape"] == "spike"


# ==================================================================================================
# §2.14 provenance, layer map, trajectory
# ==================================================================================================

def test_norm_trajectory_shapes_on_synthetic_series():
    def entries(norms, ratio=1.0, cos=0.99):
        return [{"layer": i, "resid_norm_ratio": ratio, "delta_resid_cos": cos, "raw_resid_norm": v}
                for i, v in enumerate(norms)]
    mono = D.norm_trajectory(entries(np.exp(0.1 * np.arange(11))), None)
    assert mono["shape"] == "monotonic" and mono["slope"] == pytest.approx(0.1) and mono["r2"] == pytest.approx(1.0)
    flat = D.norm_trajectory(entries([5.0] * 11), None)
    assert flat == {"shape": "plateau", "slope": 0.0, "r2": 1.0, "n_spikes": 0, "sampled_layers": 11}
    # zig-zag around a slope of 0.05 per layer: r^2 well below 0.7
    zz = np.exp(0.05 * np.arange(11) + np.where(np.arange(11) % 2, 1.0, -1.0))
    nm = D.norm_trajectory(entries(zz), None)
    assert nm["shape"] == "non_monotonic" and nm["r2"] < 0.7 and nm["slope"] == pytest.approx(0.05, abs=0.03)
    # a spike (ratio > 3 or cos < 0.8) counts only up to L_semantic
    e = entries(np.exp(0.1 * np.arange(11)))
    e[2]["resid_norm_ratio"] = 3.5
    e[8]["delta_resid_cos"] = 0.5
    assert D.norm_trajectory(e, 5)["n_spikes"] == 1 and D.norm_trajectory(e, 5)["shape"] == "spike"
    assert D.norm_trajectory(e, None)["n_spikes"] == 2
    assert D.norm_trajectory(e, 1)["shape"] == "monotonic"
    none = D.norm_trajectory([{"layer": 0, "resid_norm_ratio": None, "delta_resid_cos": None, "raw_resid_norm": None}],
                             None)
    assert none["shape"] is None and none["slope"] is None and none["sampled_layers"] == 0


def test_resid_geometry_layer_map_and_sources():
    from jaxlens.models.spec import spec_from_config

    h = np.array([[3.0, 4.0], [1.0, 0.0]], np.float32)
    g = np.array([[6.0, 8.0], [0.0, 2.0]], np.float32)
    geo = D.resid_geometry(h, g)
    np.testing.assert_allclose(geo["raw_resid_norm"], [5.0, 1.0])
    np.testing.assert_allclose(geo["resid_norm_ratio"], [2.0, 2.0])
    np.testing.assert_allclose(geo["delta_resid_cos"], [1.0, 0.0], atol=1e-12)
    cfg = F.make_config("qwen3").to_dict()
    spec = spec_from_config(cfg)
    n = spec.n_layers
    lm = D.layer_map(spec)
    assert lm[0] == {"layer": 0, "block": "blocks[0]", "stream": "pre_block", "norm": "blocks[0].ln1"}
    assert lm[1] == {"layer": 1, "block": "blocks[0]", "stream": "post_block", "norm": "blocks[1].ln1"}
    assert lm[n] == {"layer": n, "block": "final", "stream": "unembed_head", "norm": "ln_final"}
    olmo = spec_from_config(F.make_config("olmo2").to_dict())
    assert [D.ln_source(olmo, i) for i in range(olmo.n_layers + 1)] == ["raw"] * olmo.n_layers + ["ln_final"]
    prov = D.normalization_provenance(spec, {k: np.ones(n + 1) for k in ("resid_norm_ratio", "delta_resid_cos",
                                                                         "raw_resid_norm")}, ablation_ran=True)
    assert prov["strategy"] == {"primary": "next_ln1", "ablation": "post_ln2_vs_next_ln1@targets"}
    assert prov["per_layer"][n]["ln_source"] == "ln_final" and prov["per_layer"][0]["eps_inside_sqrt"] is True


# ==================================================================================================
# §2.15 raw-vs-norm
# ==================================================================================================

def test_raw_sampling_windows_and_risk():
    assert D.raw_sample_layers(40, "sample") == [0, 11, 21, 31]
    assert D.raw_sample_layers(3, "sample") == [0, 1, 2, 3]
    assert D.raw_sample_layers(3, "full") == [0, 1, 2, 3] and D.raw_sample_layers(3, "off") == []
    with pytest.raises(Exception):
        D.raw_sample_layers(3, "sometimes")

    def smp(layer, kl, n_ans, r_ans):
        return {"layer": layer, "kl_norm_vs_raw_bits": kl, "is_answer_norm": n_ans, "is_answer_raw": r_ans}
    assert D.raw_sample_summary([smp(0, 0.1, False, False), smp(5, 0.4, False, False)])["lens_artifact_risk"] == "low"
    assert D.raw_sample_summary([smp(0, 0.1, False, False),
                                 smp(5, 0.5, False, False)])["lens_artifact_risk"] == "medium"
    s = D.raw_sample_summary([smp(0, 0.1, False, False), smp(7, 0.2, True, False), smp(3, 0.3, True, False)])
    assert s == {"first_norm_only_semantic_layer": 7, "max_kl_norm_vs_raw_bits": 0.3, "lens_artifact_risk": "high"}
    assert D.raw_sample_summary([]) is None
    assert D.window_radius(None) == 4 and D.window_radius(s) == 8
    assert D.window_radius({"lens_artifact_risk": "low", "max_kl_norm_vs_raw_bits": 1.0}) == 8
    # Qwen3-14B: centres 33 (rank<=5), 36 (semantic), 40 (KL<=1) -> radius 4 -> 29..40
    summ = {"L_semantic": 36, "first_rank_le_5": 33, "first_kl_below_1.0": 40, "L_copy": None,
            "L_copy_soft": {1: None, 2: None, 3: None}}
    c = D.window_centres(summ, 40)
    assert c == [33, 36, 40] and D.window_layers(c, 4, 40) == list(range(29, 41))
    assert D.window_centres(dict(summ, L_copy=2, L_copy_soft={1: 5, 2: 1, 3: None}), 40) == [1, 2, 33, 36, 40]


def test_window_rows_copy_flags_and_norm_only():
    def layer(pn, pr, rn, rr, idn, idr, p2=0.0):
        return {"p_top1_norm": pn, "p_top2_norm": p2, "top1_token_id_norm": idn, "top1_token_str_norm": "x",
                "p_answer_norm": 0.1, "answer_rank_norm": rn, "p_top1_raw": pr, "p_top2_raw": p2,
                "top1_token_id_raw": idr, "top1_token_str_raw": "y", "p_answer_raw": 0.2, "answer_rank_raw": rr,
                "kl_norm_vs_raw_bits": 1.5}
    data = {"layers": {0: layer(0.96, 0.75, 3, 1, 5, 6), 1: layer(0.5, 0.99, 1, 2, 7, 5),
                       2: layer(0.9, 0.9, 1, 1, 9, 9)}}
    rows = D.window_rows(data, [0, 1, 2], {"fact_key": "k"}, ctx_ids=[5, 6])
    assert [(r["layer"], r["lens"]) for r in rows] == [(0, "norm"), (0, "raw"), (1, "norm"), (1, "raw"), (2, "norm"),
                                                       (2, "raw")]
    # norm at 0: id 5 in context, p 0.96 -> every sweep threshold; raw at 0: id 6, p 0.75 -> only 0.7
    assert [rows[0][f"copy_strict@{t}"] for t in ("0.7", "0.8", "0.9", "0.95")] == [True] * 4
    assert [rows[1][f"copy_strict@{t}"] for t in ("0.7", "0.8", "0.9", "0.95")] == [True, False, False, False]
    assert not rows[4]["copy_strict@0.7"]                  # id 9 is not in the context
    ws = D.window_summary(rows, [1], [0, 1, 2], 4)
    assert ws["norm_only_semantics_layers"] == [1] and ws["max_kl_norm_vs_raw_bits_window"] == 1.5
    # the norm-only copy flags of copy_thresholds (metrics.copy_norm_only_flags) read the raw rows
    # (raw at layer 1 copies at 0.99: within radius 1 of layer 0 nothing is norm-only, within radius 0 the 0.95 one is)
    assert SU.copy_norm_only_flags({"0.7": 0, "0.95": 0}, rows, 1) == {"0.7": False, "0.95": False}
    assert SU.copy_norm_only_flags({"0.7": 0, "0.95": 0}, rows, 0) == {"0.7": False, "0.95": True}


def _full_row(layer, kl, js, l1, jr, jc, rank_n, rank_r, kl_rev=0.5):
    return {"layer": layer, "kl_norm_vs_raw_bits": kl, "kl_raw_to_norm_bits": kl_rev, "js_divergence": js,
            "l1_prob_diff": l1, "topk_jaccard_raw_norm@50": jr, "topk_jaccard_consecutive@50": jc,
            "norm_only_semantics": rank_n == 1 and rank_r != 1}


def test_full_summary_and_artifact_score_hand_worked():
    rows = [_full_row(0, 0.2, 0.30, 1.2, 0.40, None, 9, 9), _full_row(1, 1.5, 0.05, 0.9, 0.60, 0.3, 1, 2),
            _full_row(2, 0.7, 0.20, 0.4, 0.10, 0.5, 1, 1, kl_rev=2.0), _full_row(3, 6.0, 0.08, 0.2, 0.55, 0.7, 1, 1)]
    s = D.full_summary(rows, n_layers=3, teacher_entropy_bits=2.0)
    assert s["pct_layers_kl_ge_1.0"] == 0.5 and s["pct_layers_kl_ge_0.5"] == 0.75
    assert s["n_norm_only_semantics_layers"] == 1 and s["earliest_norm_only_semantic"] == 1
    assert s["max_kl_norm_vs_raw_bits"] == 6.0 and s["first_js_le_0.1"] == 1 and s["first_l1_le_0.5"] == 2
    # JS sorted [0.05, 0.08, 0.2, 0.3]: p25 at rank 0.75 -> 0.05 + 0.75*0.03 = 0.0725; p50 -> 0.14
    assert s["js_divergence_percentiles"]["p25"] == pytest.approx(0.0725)
    assert s["js_divergence_percentiles"]["p50"] == pytest.approx(0.14)
    to = s["topk_overlap"]
    assert to["jaccard_raw_norm_p50"] == pytest.approx(0.475) and to["first_jaccard_raw_norm_ge_0.5"] == 1
    assert to["per_layer_consecutive_norm"] == {"0": None, "1": 0.3, "2": 0.5, "3": 0.7}
    # score: 0.6*0.5 + 0.3*1 + 0.1*min(1, 6/5) = 0.7 -> high; v2 adds 0.1*min(1, 0.14/0.1) + 0.05*min(1, 0.65/0.5)
    sc = D.artifact_score(0.5, 1, 6.0, 0.14, 0.65)
    assert sc["lens_artifact_score"] == pytest.approx(0.7) and sc["tier"] == "high"
    assert sc["lens_artifact_score_v2"] == pytest.approx(0.85)
    assert D.artifact_score(0.1, 0, 1.0)["tier"] == "low"                  # 0.06 + 0.02 = 0.08
    assert D.artifact_score(0.3, 0, 1.0)["lens_artifact_score"] == pytest.approx(0.2)
    assert D.artifact_score(0.3, 0, 1.0)["tier"] == "medium"               # 0.2 is not < 0.2
    assert D.artifact_score(1.0, 1, 50.0, 5.0, 5.0)["lens_artifact_score_v2"] == 1.0    # clipped
    assert D.artifact_score(None, None, None)["tier"] is None
    assert D.artifact_score(None, 1, None)["lens_artifact_score"] == pytest.approx(0.3)


def test_reference_artifact_score_and_topk_overlap():
    sk = json.loads(SKELETON.read_text(encoding="utf-8"))["diagnostics"]
    full = sk["raw_lens_full"]
    sc = D.artifact_score(full["pct_layers_kl_ge_1.0"], full["n_norm_only_semantics_layers"],
                          full["max_kl_norm_vs_raw_bits"], full["js_divergence_percentiles"]["p50"],
                          full["l1_prob_diff_percentiles"]["p50"])
    assert sc["lens_artifact_score"] == pytest.approx(full["score"]["lens_artifact_score"], rel=1e-12)
    assert sc["lens_artifact_score_v2"] == pytest.approx(full["score"]["lens_artifact_score_v2"], rel=1e-12)
    assert sc["tier"] == full["score"]["tier"] == "high"
    assert D.artifact_score_config() == sk["config"]
    per = full["topk_overlap"]["per_layer_raw_norm"]
    rows = [_full_row(int(k), 0.0, 0.0, 0.0, v, None, 9, 9) for k, v in per.items()]
    s = D.full_summary(rows, n_layers=40, teacher_entropy_bits=None)
    assert s["topk_overlap"]["jaccard_raw_norm_p50"] == full["topk_overlap"]["jaccard_raw_norm_p50"]
    assert s["topk_overlap"]["first_jaccard_raw_norm_ge_0.5"] == full["topk_overlap"]["first_jaccard_raw_norm_ge_0.5"]


def test_topk_jaccard_np():
    assert D.topk_jaccard_np([1, 2, 3, 4], [3, 4, 5, 6]) == pytest.approx(2 / 6)
    assert D.topk_jaccard_np([1, 2, -1], [2, 1, -1]) == 1.0
    np.testing.assert_allclose(D.topk_jaccard_np([[1, 2], [3, 4]], [[2, 5], [6, 7]]), [1 / 3, 0.0])


# ==================================================================================================
# §2.16-2.19
# ==================================================================================================

def test_confirmed_semantics():
    raw = {30: 3, 32: 1, 35: 2, 36: 4, 38: 1}
    c = D.confirmed_semantics(36, raw)
    assert c == {"L_semantic_norm": 36, "L_semantic_raw": 32, "L_semantic_tuned": None, "\u0394_window": 2,
                 "L_semantic_confirmed": 36, "confirmed_source": "raw"}           # 38 is inside [34, 38]
    assert D.confirmed_semantics(36, {32: 1, 39: 1})["confirmed_source"] == "none"
    both = D.confirmed_semantics(36, raw, {37: 1, 39: 1})
    assert both["confirmed_source"] == "both" and both["L_semantic_tuned"] == 37 and both["L_semantic_confirmed"] == 36
    assert D.confirmed_semantics(36, {36: 2}, {35: 1})["confirmed_source"] == "tuned"
    assert D.confirmed_semantics(None, raw)["L_semantic_confirmed"] is None


def test_consistency_metrics_and_lens_consistency():
    rng = np.random.default_rng(3)
    z = rng.normal(size=500)
    same = D.consistency_metrics(z, z)
    assert same == {"jaccard@10": 1.0, "jaccard@50": 1.0, "spearman_top50": pytest.approx(1.0)}
    rev = D.consistency_metrics(z, -z)          # A's top-50 are B's bottom-50, in reverse order
    assert rev["jaccard@50"] == 0.0 and rev["spearman_top50"] == pytest.approx(-1.0)
    # B swaps A's 1st and 2nd tokens: top-k sets equal, ranks (2, 1, 3, ..., 50)
    order = np.argsort(-z, kind="stable")
    zb = z.copy()
    zb[order[0]], zb[order[1]] = z[order[1]], z[order[0]]
    sw = D.consistency_metrics(z, zb)
    x = np.arange(1, 51)
    y = x.copy()
    y[:2] = [2, 1]
    assert sw["jaccard@10"] == 1.0 and sw["spearman_top50"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    np.testing.assert_array_equal(D.rank_in_order(np.array([1.0, 3.0, 3.0, 0.0]), [2, 1, 3]), [2, 1, 4])
    lc = D.lens_consistency([("first_rank_le_10", 4), ("L_semantic_norm", 6)], {4: z, 6: z},
                            {"raw": {4: zb, 6: -z}}, L_semantic_confirmed=6)
    assert lc["targets"] == ["first_rank_le_10", "L_semantic_norm", "L_semantic_confirmed"]
    at = lc["norm_vs_raw"]["at_targets"]
    assert [e["layer"] for e in at] == [4, 6, 6] and at[2] == at[1]
    assert lc["norm_vs_raw"]["p50"]["jaccard@10"] == 0.0       # median of [1, 0, 0]
    assert lc["low_lens_consistency_at_semantic"] is True
    ok = D.lens_consistency([("L_semantic_norm", 4)], {4: z}, {"raw": {4: zb}})
    assert ok["low_lens_consistency_at_semantic"] is False


def test_decoding_point_entry_and_gate():
    rng = np.random.default_rng(4)
    z = rng.normal(size=300)
    a = int(np.argmax(z))
    e = D.decoding_point_entry("L_semantic_norm", 5, z, z, a)
    assert e["rank1_agree"] and e["delta_answer_rank"] == 0 and e["top1_token_agree"] and e["status"] == "ok"
    assert e["jaccard@10"] == 1.0 and e["spearman_top50"] == pytest.approx(1.0)
    z2 = z.copy()
    z2[a] = np.sort(z)[-5] - 1e-3                              # the answer drops to rank 5 under post_ln2
    e2 = D.decoding_point_entry("first_rank_le_5", 4, z2, z, a)
    assert e2["answer_rank_post_ln2"] == 5 and e2["answer_rank_next_ln1"] == 1 and e2["delta_answer_rank"] == 4
    assert e2["rank1_agree"] is False and not e2["top1_token_agree"]
    e3 = D.decoding_point_entry("x", 3, z, z, None)
    assert e3["rank1_agree"] is None and e3["p_answer_post_ln2"] is None and e3["answer_rank_next_ln1"] is None
    tg = [("L_semantic_norm", 5), ("first_rank_le_5", 4)]
    assert D.decoding_point([e, e2], tg, tested=True)["gate"]["decoding_point_consistent"] is False
    g = D.decoding_point([e], tg[:1], tested=True)
    assert g["gate"]["decoding_point_consistent"] is True and g["preferred_target"] == {"name": "L_semantic_norm",
                                                                                         "layer": 5}
    low = dict(e, name="L_semantic_strong", **{"jaccard@10": 0.4})
    g = D.decoding_point([e, low], tg, tested=True)
    assert g["gate"]["decoding_point_consistent"] is False and g["preferred_target"]["name"] == "L_semantic_strong"
    g = D.decoding_point([e], tg[:1], tested=True, L_semantic_confirmed=5)
    assert g["preferred_target"]["name"] == "L_semantic_confirmed"
    assert D.decoding_point([{"name": "L_semantic_norm", "layer": 0, "status": "missing_block"}], tg, tested=False
                            )["gate"]["decoding_point_consistent"] is None
    summ = {"L_semantic": 36, "semantic_gate": {"L_semantic_strong": 36, "L_semantic_strong_run2": 39},
            "first_rank_le_5": 33}
    assert D.decoding_point_targets(summ, 40) == [("L_semantic_norm", 36), ("L_semantic_strong", 36),
                                                  ("L_semantic_strong_run2", 39), ("L_semantic_strong_run2+1", 40),
                                                  ("first_rank_le_5", 33)]
    assert D.decoding_point_targets(dict(summ, semantic_gate={"L_semantic_strong_run2": 40}), 40)[-2:] == [
        ("L_semantic_strong_run2", 40), ("first_rank_le_5", 33)]


def test_gate_stability_hand_worked():
    V = 1000
    z = np.full(V, -5.0)
    z[0], z[1] = 4.0, 3.5                    # answer 0, gap 0.5: s*0.5 >= 0.5 only for s >= 1
    z2 = z.copy()
    z2[0] = 6.0                              # gap 2.5: every scale passes
    gs = D.gate_stability([("L_semantic_norm", 3), ("L_semantic_strong_run2", 3)], {3: z, 4: z2}, 0, vocab_size=V)
    t = gs["per_target"]["L_semantic_norm"]
    assert t == {"layer": 3, "uniform_margin_pass_frac": 1.0, "top2_gap_pass_frac": 0.5, "both_gates_pass_frac": 0.5}
    assert gs["per_target"]["L_semantic_strong_run2"] == {"layer": 3, "both_gates_pass_frac": 0.5}
    assert gs["min_both_gates_pass_frac"] == 0.5 and gs["scales"] == [0.9, 0.95, 1.05, 1.1]
    # uniform margin: p_a - 1/V >= 0.002 fails for a flat row
    flat = np.zeros(V)
    flat[0] = 0.5
    g2 = D.gate_stability([("L_semantic_norm", 0)], {0: flat}, 0, vocab_size=V)
    assert g2["per_target"]["L_semantic_norm"]["uniform_margin_pass_frac"] == 0.0
    assert D.gate_stability([("L_semantic_norm", 0)], {0: flat}, None, vocab_size=V)["min_both_gates_pass_frac"] is None


# ==================================================================================================
# §2.20, §2.23, position window
# ==================================================================================================

def test_numeric_health_and_repeatability():
    nh = D.numeric_health([0, 1, 2, 3], nan_flags=[False, False, True, False], inf_flags=[False] * 4,
                          max_abs_logit=[1.0, 2.0, 3.0, 4.0], min_prob=[1e-3, 1e-5, 1e-4, 1e-6], L_copy=None,
                          L_semantic=3)
    assert nh["any_nan"] and not nh["any_inf"] and nh["layers_flagged"] == [
        {"layer": 2, "lens": "norm", "any_nan": True, "any_inf": False}]
    assert nh["max_abs_logit_p99"] == pytest.approx(3.97) and nh["_caution"]
    assert nh["min_prob_p01"] == pytest.approx(1e-6 + 0.03 * (1e-5 - 1e-6))
    assert not D.numeric_health([0, 5], nan_flags=[False, True], inf_flags=[False, False], max_abs_logit=[1, 1],
                                min_prob=[0.1, 0.1], L_semantic=3)["_caution"]      # flagged layer 5 > 3
    assert D.numeric_health([5], nan_flags=[False], inf_flags=[True], max_abs_logit=[1], min_prob=[0.1])["_caution"]
    a = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 2, 3]])
    r = D.repeatability(a, a)
    assert r == {"status": "ok", "layers_checked": 4, "max_rank_dev": 0.0, "p95_rank_dev": 0.0, "top1_flip_rate": 0.0,
                 "deterministic_algorithms": True}
    b = a.copy()
    b[1] = [5, 4, 6]                          # flip: old top-1 (4) is now 2nd
    b[2] = [8, 9, 0]                          # old top-1 (7) fell out of the top-3: deviation >= 3
    r = D.repeatability(a, b)
    assert r["top1_flip_rate"] == 0.5 and r["max_rank_dev"] == 3.0
    assert D.repeatability_flag(r) and not D.repeatability_flag(D.repeatability(a, a))


def test_forward_gate_and_preferred_milestone():
    s = {"L_semantic": 36, "L_semantic_strong": None, "L_semantic_strong_run2": None}
    assert D.preferred_milestone(s) == ("L_semantic_norm", 36)
    assert D.preferred_milestone(s, 36) == ("L_semantic_confirmed", 36)
    assert D.preferred_milestone(dict(s, L_semantic_strong=37), 36) == ("L_semantic_strong", 37)
    assert D.preferred_milestone({"L_semantic": 36, "semantic_gate": {"L_semantic_strong": 37}}) == \
        ("L_semantic_strong", 37)
    assert D.preferred_milestone(dict(s, L_semantic_strong_run2=38, L_semantic_strong=37)) == \
        ("L_semantic_strong_run2", 38)
    assert D.preferred_milestone({"L_semantic": None}) == (None, None)
    ok = D.forward_gate("ran", pass1=("L_semantic_norm", 36), pass2=("L_semantic_norm", 37),
                        topk1=list("abcde"), topk2=list("abcdf"))
    assert ok["gate"]["repeatability_forward_pass"] is True and ok["milestones"]["delta_layers"] == 1
    assert ok["topk_jaccard_at_primary_layer"] == pytest.approx(4 / 6)
    far = D.forward_gate("ran", pass1=("L_semantic_norm", 36), pass2=("L_semantic_norm", 38), topk1=["a"], topk2=["a"])
    assert far["gate"]["repeatability_forward_pass"] is False
    low = D.forward_gate("ran", pass1=("L_semantic_norm", 36), pass2=("L_semantic_norm", 36), topk1=list("abc"),
                         topk2=list("cde"))
    assert low["gate"]["repeatability_forward_pass"] is False           # Jaccard 1/5
    other = D.forward_gate("ran", pass1=("L_semantic_norm", 36), pass2=("L_semantic_strong", 36), topk1=["a"],
                           topk2=["a"])
    assert other["gate"]["repeatability_forward_pass"] is False
    missing = D.forward_gate("ran", pass1=("L_semantic_norm", 36), pass2=(None, None), topk1=["a"], topk2=["a"])
    assert missing["gate"]["repeatability_forward_pass"] is False
    sk = D.forward_gate("skipped_deterministic", pass1=("L_semantic_norm", 36))
    assert sk == {"milestones": {"primary": "L_semantic_norm", "pass1": {"layer": 36}, "pass2": {"layer": None},
                                 "delta_layers": None}, "topk_jaccard_at_primary_layer": None,
                  "gate": {"repeatability_forward_pass": None}, "enabled": True, "mode": "skipped_deterministic",
                  "tolerance_layers": 1, "topk_k": 10}
    assert D.forward_gate("disabled")["enabled"] is False


def test_position_window_q3():
    # T = 16: fractions 0.2..1.0 -> positions 3, 6, 9, 12, 14, 14 (dropped), 15, 15 (dropped)
    assert D.position_grid(16) == [(0.2, 3), (0.4, 6), (0.6, 9), (0.8, 12), (0.92, 14), (0.98, 15)]
    ranks = np.full((5, 16), 7)
    ranks[3, [13, 14, 15]] = 1
    ranks[4, [14, 15]] = 1
    pw = D.position_window(ranks, 16, L_semantic=3, L_strong_run2=3)
    assert pw["rank1_frac"] == pytest.approx(2 / 6) and pw["n_positions"] == 6
    assert pw["rank1_frac_strong_run2"] == pytest.approx(2 / 6)
    assert pw["grid"] == [0.2, 0.4, 0.6, 0.8, 0.92, 0.98] and pw["positions"] == [3, 6, 9, 12, 14, 15]
    q3 = D.position_window(ranks, 16, L_semantic=3, last_position_only=True)
    assert q3["rank1_frac"] == pytest.approx(1 / 6)          # the reference: never more than 1/n_positions
    assert D.position_window(ranks, 16, L_semantic=None)["rank1_frac"] is None


# ==================================================================================================
# §2.26 guidance, §2.28 evaluation pack and its CSVs
# ==================================================================================================

def test_measurement_guidance_reasons_and_flags():
    raised = {"high_lens_artifact_score": True, "pos_window_low_stability": True, "normalization_spike": True,
              "decoding_point_sensitive": True, "high_lens_artifact_risk": True, "warn_high_last_layer_kl": False}
    g = D.measurement_guidance(raised, prefer_tuned=True, tuned_hint="tuned", L_semantic_confirmed=36)
    # Qwen3-14B's published reasons, in the reference order
    assert g["reasons"] == ["high_lens_artifact_risk", "high_lens_artifact_score", "normalization_spike",
                            "decoding_point_sensitive", "pos_window_low_stability"]
    assert g["prefer_ranks"] and g["suppress_abs_probs"] and g["preferred_lens_for_reporting"] == "tuned"
    assert g["preferred_semantics_lens_hint"] == "tuned" and g["use_confirmed_semantics"]
    assert g["notes_append"] == "Prism is diagnostic-only; treat probabilities comparatively within model."
    calib = D.measurement_guidance({}, prefer_tuned=True, tuned_hint="tuned_for_calibration_only")
    assert calib["preferred_lens_for_reporting"] == "norm" and calib["reasons"] == [] and not calib["prefer_ranks"]
    nd = D.measurement_guidance({"nondeterministic_env": True}, nondeterministic=True)
    assert nd["reasons"] == ["nondeterministic_env"] and nd["notes_append"].endswith(calib["notes_append"])
    assert nd["notes_append"] != calib["notes_append"]
    flags = D.diagnostic_flags({"normalization_spike": True, "pos_window_low_stability": True,
                                "repeatability_forward_skipped": "deterministic_env", "decoding_point_sensitive": True,
                                "numeric_health_caution": False})
    assert list(flags.items()) == [("decoding_point_sensitive", True),
                                   ("repeatability_forward_skipped", "deterministic_env"),
                                   ("pos_window_low_stability", True), ("normalization_spike", True)]


def test_reference_milestones_csv():
    from jaxlens.writers import render_csv

    with open(PURE_CSV, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["prompt_id"] == "pos" and r["prompt_variant"] == "orig"
                and r["fact_index"] == "0"]
    pure = {int(r["layer"]): {"answer_rank": int(r["answer_rank"]), "p_answer": float(r["p_answer"]),
                              "kl_to_final_bits": float(r["kl_to_final_bits"]),
                              "entropy_bits": float(r["entropy_bits"])} for r in rows}
    summary = {"L_copy": None, "L_copy_soft": {1: None, 2: None, 3: None}, "L_semantic": 36}
    out = D.milestone_rows(summary, {"L_semantic_confirmed": 36, "confirmed_source": "raw"}, pure)
    assert render_csv("milestones", out) == MILESTONES_CSV.read_text(encoding="utf-8")


def test_milestones_artifact_audit_and_pack_hand_worked():
    pure = {2: {"answer_rank": 9, "p_answer": 0.01, "kl_to_final_bits": 3.0, "entropy_bits": 5.0},
            4: {"answer_rank": 1, "p_answer": 0.9, "kl_to_final_bits": 0.1, "entropy_bits": 0.5}}
    summ = {"L_copy": 2, "L_copy_soft": {1: 3, 2: 2, 3: None}, "L_semantic": 4,
            "entropy_gap_bits_percentiles": {"p25": 1.0, "p50": 2.0, "p75": 3.0}}
    conf = {"L_semantic_confirmed": None, "confirmed_source": "none"}
    rows = D.milestone_rows(summ, conf, pure)
    assert [r["layer"] for r in rows] == [2, 2, 4, None]
    assert rows[0]["is_copy_strict"] and rows[1]["is_copy_soft_k"] == 2 and not rows[1]["is_copy_strict"]
    assert rows[2]["is_semantic_norm"] and rows[2]["answer_rank"] == 1 and not rows[3]["is_semantic_confirmed"]
    assert rows[3]["lens"] == "none" and rows[0]["csv_row_index"] == 2
    full = [_full_row(i, 0.1, 0.1 * i, 0.2, 0.5, None, 9, 9, kl_rev=float(i)) for i in range(5)]
    fs = D.full_summary(full, n_layers=4, teacher_entropy_bits=1.0)
    sc = D.artifact_score(0.0, 0, 0.1, 0.2, 0.2)
    au = D.artifact_audit_rows(full, fs, sc)
    assert au[0] == {"layer": "_summary", "js_divergence": pytest.approx(0.2), "kl_raw_to_norm_bits": 2.0,
                     "l1_prob_diff": 0.2, "topk_jaccard_raw_norm@50": 0.5,
                     "lens_artifact_score_v2": sc["lens_artifact_score_v2"], "risk_tier": "low"}
    assert [r["layer"] for r in au[1:]] == [0, 1, 2, 3, 4] and "risk_tier" not in au[1]
    pack = D.evaluation_pack(model_name="m", n_layers=8, summary=summ, confirmed=conf, artifact={"risk_tier": "low"},
                             repeat={"max_rank_dev": 0.0, "p95_rank_dev": 0.0, "top1_flip_rate": 0.0},
                             repeat_flag="ok", gold_rate=1.0, gold_variant="with_space",
                             trajectory={"shape": "plateau", "slope": 0.0, "r2": 1.0, "n_spikes": 0,
                                         "sampled_layers": 9},
                             tuned_audit=None, files={"pure_csv": "p.csv"}, micro=None, preferred_lens="norm",
                             use_confirmed=False)
    ms = pack["milestones"]
    assert ms["L_copy_soft"] == {"k": 2, "layer": 2} and ms["depth_fractions"] == {
        "copy_strict_frac": 0.25, "semantic_frac": 0.5, "delta_hat": 0.25}
    assert pack["entropy"] == {"entropy_gap_bits_p25": 1.0, "entropy_gap_bits_p50": 2.0, "entropy_gap_bits_p75": 3.0}
    assert pack["citations"]["layers"] == {"L_copy_strict_row": 2, "L_copy_soft_row": 2, "L_semantic_norm_row": 4,
                                           "L_semantic_confirmed_row": None}


# ==================================================================================================
# The pipeline on a tiny Qwen3 against transformers (float64)
# ==================================================================================================

QWEN_SEED = 22           # with this seed the tiny Qwen3's own top-1 for the Germany prompt is " Turkey"


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    import jaxlens
    from jaxlens.probe.pipeline import run_probe
    from jaxlens.probe.suite import suite_from_dict

    path = str(tmp_path_factory.mktemp("diag-qwen3"))
    tm = F.build_checkpoint("qwen3", path, seed=QWEN_SEED)
    model = jaxlens.load_model(path)
    with open(REPO / "configs" / "probe" / "reference.toml", "rb") as fh:
        data = tomllib.load(fh)
    data["facts"][0]["answer"] = "Turkey"
    suite = suite_from_dict(data)
    res = run_probe(model, suite=suite, out_dir=None)
    return dict(model=model, tm=tm, suite=suite, result=res)


def _torch_lenses(tm, ids):
    """float64: raw residuals, norm-lens rows and logits, raw-lens logits, model logits, post-attention-norm
    logits (block l-1's ln2 on the residual l) at the last position; W [d, V]."""
    import torch

    layers, in_norms, final_norm, head = F._parts(tm)
    ref = F.torch_reference(tm, np.asarray(ids)[None])
    res = torch.as_tensor(ref["residuals"][:, 0, -1])                 # [n+1, d] fp32
    n = len(layers)
    with torch.no_grad():
        W = head.weight.double().T
        bias = None if head.bias is None else head.bias.double()
        normed = torch.stack([(final_norm if i == n else in_norms[i])(res[i]) for i in range(n + 1)]).double()
        post = torch.stack([layers[i - 1].post_attention_layernorm(res[i]) for i in range(1, n + 1)]).double()

        def logits(x):
            z = x @ W
            return (z + bias if bias is not None else z).numpy()
        return {"raw_h": res.double().numpy(), "norm_h": normed.numpy(), "norm": logits(normed),
                "raw": logits(res.double()), "post": logits(post), "final": ref["logits"][0, -1].astype(np.float64),
                "W": W.numpy()}


def _topk_sets(z, k=50):
    return [set(np.argsort(-r, kind="stable")[:k].tolist()) for r in z]


def _pass(res, fact_index, variant="orig", pid="pos"):
    return next(p for p in res.passes if p.inp.spec.prompt_id == pid and p.inp.spec.variant == variant
                and (pid == "ctl" or p.inp.spec.fact_index == fact_index))


def test_pipeline_primary_has_its_milestones(probe_run):
    res = probe_run["result"]
    prim = res.passes[0]
    n = probe_run["model"].spec.n_layers
    assert prim.inp.gold.ok and prim.summary["L_semantic"] is not None and prim.summary["L_semantic"] <= n
    dg = res.json["diagnostics"]
    assert dg["last_layer_consistency"]["top1_agree"] and dg["last_layer_consistency"]["answer_rank_lens"] == 1
    assert dg["last_layer_consistency"]["kl_to_final_bits"] == pytest.approx(0.0, abs=1e-6)
    assert dg["repeatability"]["max_rank_dev"] == 0.0 and dg["repeatability"]["top1_flip_rate"] == 0.0
    assert dg["repeatability_forward"]["mode"] == "skipped_deterministic"
    assert dg["flags"]["repeatability_forward_skipped"] == "deterministic_env"
    assert dg["decoding_point"]["tested"] and dg["decoding_point"]["per_target"][0]["name"] == "L_semantic_norm"
    assert dg["normalization_provenance"]["strategy"]["ablation"] == "post_ln2_vs_next_ln1@targets"
    assert "L_semantic_norm" in dg["gate_stability_small_scale"]["per_target"]
    assert dg["lens_consistency"]["targets"][:3] == ["first_rank_le_10", "first_rank_le_5", "L_semantic_norm"]
    # guidance reasons are exactly the raised conditions
    g = res.json["measurement_guidance"]
    assert set(g["reasons"]) <= set(D.REASON_ORDER)
    dp_gate = dg["decoding_point"]["gate"]["decoding_point_consistent"]
    assert ("decoding_point_sensitive" in g["reasons"]) == (dp_gate is False)
    assert ("normalization_spike" in g["reasons"]) == (dg["norm_trajectory"]["n_spikes"] > 0)
    assert ("high_lens_artifact_score" in g["reasons"]) == (dg["raw_lens_full"]["score"]["tier"] == "high")
    # the evaluation pack and the milestones CSV cite the primary pure rows
    pack = res.json["evaluation_pack"]
    assert pack["milestones"]["L_semantic_norm"] == prim.summary["L_semantic"]
    ms = res.sidecars["milestones"]
    L = prim.summary["L_semantic"]
    assert ms[2]["layer"] == L and ms[2]["answer_rank"] == 1 and ms[2]["p_answer"] == prim.pure["p_answer"][L]
    # confirmed semantics agree with the raw sweep
    raw_rows = [r for r in res.sidecars["pure-next-token-rawlens"]
                if r["fact_index"] == 0 and r["prompt_variant"] == "orig"]
    cs = dg["confirmed_semantics"]
    assert cs["L_semantic_raw"] == next((r["layer"] for r in raw_rows if r["answer_rank_raw"] == 1), None)
    win = any(abs(r["layer"] - L) <= 2 and r["answer_rank_raw"] == 1 for r in raw_rows)
    assert (cs["L_semantic_confirmed"] == L) == win and dg["L_semantic_confirmed"] == cs["L_semantic_confirmed"]
    # sampled check: 5 orig passes x sample layers
    rc = res.json["raw_lens_check"]
    assert rc["mode"] == "sample" and len(rc["samples"]) == 5 * len(D.raw_sample_layers(n, "sample"))


def test_raw_vs_norm_sweep_matches_torch(probe_run):
    from jaxlens.probe.gold import model_input_ids

    res, tm, model = probe_run["result"], probe_run["tm"], probe_run["model"]
    for p in (_pass(res, 0), _pass(res, None, pid="ctl"), _pass(res, 3, "no_filler")):
        t = _torch_lenses(tm, model_input_ids(model.tokenizer, p.inp.spec.text))
        zn, zr = t["norm"], t["raw"]
        lpn, lpr = _lsm(zn), _lsm(zr)
        pn, pr = np.exp(lpn), np.exp(lpr)
        mid = 0.5 * (pn + pr)
        exp = {"kl_norm_vs_raw_bits": (pn * (lpn - lpr)).sum(-1) / LN2,
               "kl_raw_to_norm_bits": (pr * (lpr - lpn)).sum(-1) / LN2,
               "js_divergence": 0.5 * ((pn * (lpn - np.log(mid))).sum(-1) + (pr * (lpr - np.log(mid))).sum(-1)) / LN2,
               "l1_prob_diff": np.abs(pn - pr).sum(-1),
               "entropy_bits_norm": -(pn * lpn).sum(-1) / LN2, "entropy_bits_raw": -(pr * lpr).sum(-1) / LN2,
               "p_top1_raw": pr.max(-1), "p_top1_norm": pn.max(-1)}
        a = p.inp.gold.first_id
        exp["answer_rank_raw"] = 1 + (zr > zr[:, [a]]).sum(-1)
        exp["p_answer_raw"] = pr[:, a]
        sn, sr = _topk_sets(zn), _topk_sets(zr)
        exp["topk_jaccard_raw_norm@50"] = np.array([len(x & y) / len(x | y) for x, y in zip(sn, sr)])
        exp["topk_jaccard_consecutive@50"] = np.array([np.nan] + [len(sn[i] & sn[i - 1]) / len(sn[i] | sn[i - 1])
                                                                  for i in range(1, len(sn))])
        k = p.inp.spec
        rows = [r for r in res.sidecars["pure-next-token-rawlens"] if (r["prompt_id"], r["prompt_variant"],
                                                                       r["fact_index"]) == (k.prompt_id, k.variant,
                                                                                            k.fact_index)]
        assert [r["layer"] for r in rows] == list(range(len(zn)))
        for col, want in exp.items():
            got = np.array([np.nan if r[col] is None else r[col] for r in rows], np.float64)
            if col.startswith(("answer_rank", "topk")):
                np.testing.assert_array_equal(got, want, err_msg=col)
            else:
                np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5, err_msg=col)
        assert [r["top1_token_id_raw"] for r in rows] == list(np.argmax(zr, -1))
        # the pure rows carry the same Jaccards (N2 fixed) and the normalisation geometry
        pure = [r for r in res.pure_rows if (r["prompt_id"], r["prompt_variant"], r["fact_index"])
                == (k.prompt_id, k.variant, k.fact_index)]
        assert [r["topk_jaccard_raw_norm@50"] for r in pure] == [r["topk_jaccard_raw_norm@50"] for r in rows]
        hr, hn = t["raw_h"], t["norm_h"]
        ratio = np.linalg.norm(hn, axis=-1) / np.linalg.norm(hr, axis=-1)
        cos = (hr * hn).sum(-1) / (np.linalg.norm(hr, axis=-1) * np.linalg.norm(hn, axis=-1))
        np.testing.assert_allclose([r["resid_norm_ratio"] for r in pure], ratio, rtol=1e-5)
        np.testing.assert_allclose([r["delta_resid_cos"] for r in pure], cos, rtol=1e-5, atol=1e-6)


def test_norm_temperatures_match_torch(probe_run):
    from jaxlens.probe.gold import model_input_ids

    res, tm, model, suite = probe_run["result"], probe_run["tm"], probe_run["model"], probe_run["suite"]
    grid = D.temperature_grid(0.2, 5.0, 25)
    ce = []
    for p in suite.calibration_passes:
        t = _torch_lenses(tm, model_input_ids(model.tokenizer, p.text))
        q = np.exp(_lsm(t["final"]))
        ce.append([[-(q * _lsm(z / s)).sum() for s in grid] for z in t["norm"]])
    ce = np.mean(ce, axis=0)                                             # [n+1, G]
    tau = np.array(res.json["diagnostics"]["tau_norm_per_layer"])
    np.testing.assert_array_equal(tau, grid[np.argmin(ce, -1)])
    assert res.json["diagnostics"]["tau_norm_calibration"]["in_sample"] is True
    for p in (_pass(res, 0), _pass(res, 2)):                     # a calibration pass and an evaluated-only one
        t = _torch_lenses(tm, model_input_ids(model.tokenizer, p.inp.spec.text))
        want = [_kl(z / s, t["final"]) for z, s in zip(t["norm"], tau)]
        np.testing.assert_allclose(p.pure["kl_to_final_bits_norm_temp"], want, rtol=2e-4, atol=2e-5)
    n = model.spec.n_layers
    snap = res.json["diagnostics"]["kl_to_final_bits_norm_temp@50%"]
    assert snap == {"layer": round(n * 0.5), "value": res.passes[0].pure["kl_to_final_bits_norm_temp"][round(n * 0.5)]}


def test_decoding_point_and_lens_consistency_match_torch(probe_run):
    from jaxlens.probe.gold import model_input_ids

    res, tm, model = probe_run["result"], probe_run["tm"], probe_run["model"]
    n = model.spec.n_layers
    prim = res.passes[0]
    ids = model_input_ids(model.tokenizer, prim.inp.spec.text)
    t = _torch_lenses(tm, ids)
    fw = model.forward(np.asarray(ids)[None])
    L = list(range(n + 1))
    tz = LM.target_logits(model, fw, 0, len(ids) - 1, norm_layers=L, raw_layers=L, post_layers=L[1:])
    scale = np.abs(t["norm"]).max()
    for kind, want in (("norm", t["norm"]), ("raw", t["raw"])):
        np.testing.assert_allclose(np.stack([tz[kind][i] for i in L]), want, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(np.stack([tz["post_ln2"][i] for i in L[1:]]), t["post"], rtol=1e-5, atol=1e-5 * scale)
    a = prim.inp.gold.first_id
    for layer in L[1:]:
        ours = D.decoding_point_entry("x", layer, tz["post_ln2"][layer], tz["norm"][layer], a)
        ref = D.decoding_point_entry("x", layer, t["post"][layer - 1], t["norm"][layer], a)
        for k in ("rank1_agree", "delta_answer_rank", "answer_rank_post_ln2", "answer_rank_next_ln1",
                  "top1_id_post_ln2", "top1_id_next_ln1", "jaccard@10", "jaccard@50"):
            assert ours[k] == ref[k], (layer, k)
        for k in ("p_answer_post_ln2", "p_answer_next_ln1", "p_top1_post_ln2", "spearman_top50"):
            assert ours[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-7), (layer, k)
        # lens consistency (norm vs raw) on the same rows
        c1 = D.consistency_metrics(tz["norm"][layer], tz["raw"][layer])
        c2 = D.consistency_metrics(t["norm"][layer], t["raw"][layer])
        assert c1["jaccard@10"] == c2["jaccard@10"] and c1["jaccard@50"] == c2["jaccard@50"]
        # ranks deep in the raw tail can swap between fp32 near-ties: a few rank positions of ~1000
        assert c1["spearman_top50"] == pytest.approx(c2["spearman_top50"], abs=5e-3)
    # the pipeline's own decoding-point block at its targets
    for e in res.json["diagnostics"]["decoding_point"]["per_target"]:
        layer = e["layer"]
        ref = D.decoding_point_entry(e["name"], layer, t["post"][layer - 1], t["norm"][layer], a)
        assert e["answer_rank_post_ln2"] == ref["answer_rank_post_ln2"] and e["rank1_agree"] == ref["rank1_agree"]
        assert e["p_answer_post_ln2"] == pytest.approx(ref["p_answer_post_ln2"], rel=1e-4)


def test_forward_gate_reference_quirks_and_repeat(probe_run):
    from jaxlens.probe.pipeline import run_probe

    model, suite, base = probe_run["model"], probe_run["suite"], probe_run["result"]
    r = run_probe(model, suite=suite, out_dir=None, repeat_forward="always")
    rf = r.json["diagnostics"]["repeatability_forward"]
    s0 = base.passes[0].summary
    assert rf["mode"] == "ran" and rf["gate"]["repeatability_forward_pass"] is True
    assert rf["milestones"]["delta_layers"] == 0 and rf["topk_jaccard_at_primary_layer"] == 1.0
    sg = s0["semantic_gate"]
    assert rf["milestones"]["pass1"]["layer"] == {"L_semantic_strong_run2": sg["L_semantic_strong_run2"],
                                                  "L_semantic_strong": sg["L_semantic_strong"],
                                                  "L_semantic_confirmed": s0["L_semantic"],
                                                  "L_semantic_norm": s0["L_semantic"]}[rf["milestones"]["primary"]]
    # everything else is unchanged by the gate
    assert r.pure_rows == base.pure_rows and r.sidecars == base.sidecars
    q = run_probe(model, suite=suite, out_dir=None, quirks=M.ReferenceQuirks.reference())
    fixed = q.json["provenance"]["fixed_reference_bugs"]
    assert not {"Q1", "N1", "Q3", "Q5", "Q13", "N2"} & set(fixed) and "Q4" in fixed
    # N2: every pos row of a variant carries the last fact's Jaccards
    rows = [x for x in q.pure_rows if x["prompt_id"] == "pos" and x["prompt_variant"] == "orig"]
    last = [x["topk_jaccard_raw_norm@50"] for x in rows if x["fact_index"] == 4]
    for f in range(4):
        assert [x["topk_jaccard_raw_norm@50"] for x in rows if x["fact_index"] == f] == last
    # Q5: the primary's window keeps radius 4
    assert q.json["diagnostics"]["raw_lens_window"]["radius"] == 4
    # Q3: only the last grid position can count
    pw = q.json["diagnostics"]["position_window"]
    assert pw["rank1_frac"] <= 1.0 / pw["n_positions"]
    assert base.json["diagnostics"]["position_window"]["rank1_frac"] >= pw["rank1_frac"]


def test_gemma2_softcap_is_in_the_lens(tmp_path):
    """Q4: the lens applies Gemma-2's final softcap, so its last layer is the head (KL 0); the reference's
    un-capped lens gives the ~1-bit KL it publishes, reported as kl_to_final_bits_without_softcap."""
    import torch

    import jaxlens

    tm = F.build_checkpoint("gemma2", str(tmp_path), seed=3)
    model = jaxlens.load_model(str(tmp_path))
    ids = model.tokenizer("The capital of France is Paris, and the capital of Germany is",
                          add_special_tokens=True)["input_ids"]
    fw = model.forward(np.asarray(ids)[None])
    n = model.spec.n_layers
    tz = LM.target_logits(model, fw, 0, len(ids) - 1, norm_layers=[n])
    llc = D.last_layer_consistency(tz["norm"][n], np.asarray(fw.logits[0, -1]), None, z_pre=tz["norm_pre"][n],
                                   transforms=D.head_transforms(model.config), softcap_in_lens=model.spec.final_softcap)
    assert llc["cfg_transform"] == {"scale": None, "softcap": 6.0}
    assert llc["kl_to_final_bits"] == pytest.approx(0.0, abs=1e-6) and llc["temp_est"] == 1.0
    assert llc["kl_after_transform_bits"]["softcap"] == pytest.approx(0.0, abs=1e-6)
    layers, _, final_norm, head = F._parts(tm)
    ref = F.torch_reference(tm, np.asarray(ids)[None])
    with torch.no_grad():
        z_uncapped = head(final_norm(torch.as_tensor(ref["residuals"][n, 0, -1]))).double().numpy()
    want = _kl(z_uncapped, ref["logits"][0, -1])
    assert want > 0.05
    assert llc["lens_head_transform"]["kl_to_final_bits_without_softcap"] == pytest.approx(want, rel=1e-4)
