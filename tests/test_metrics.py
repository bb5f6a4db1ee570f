"""jaxlens.probe.metrics: every expected number below is worked out by hand (in the comments) or computed
independently with numpy in float64; the last group re-derives the published Qwen3-14B summaries
from the reference pure next-token CSV (tests/data/reference)."""
from __future__ import annotations

import csv
import dataclasses
import json
import math

import numpy as np
import pytest

from jaxlens.probe import metrics as M
from jaxlens.probe.suite import CopyThresholds, SurfaceThresholds, Thresholds, load_suite
from jaxlens.probe import summaries as SU
from reference_data import HEADERS_JSON, MILESTONES_CSV, PURE_CSV, REF_DIR, SKELETON  # noqa: F401



# ---------------------------------------------------------------------------------------------
# primitives
# ---------------------------------------------------------------------------------------------

def test_percentile_matches_numpy_linear():
    rng = np.random.default_rng(0)
    for m in (2, 3, 7, 41, 100):
        x = rng.normal(size=m)
        for q in (0.0, 0.01, 0.25, 0.5, 0.75, 0.99, 1.0):
            assert M.percentile(x.tolist(), q) == pytest.approx(np.percentile(x, 100 * q, method="linear"),
                                                                 rel=0, abs=1e-12)
    assert M.percentile([], 0.5) is None
    assert M.percentile([None, None], 0.5) is None
    assert M.percentile([3.5], 0.25) == 3.5
    # hand-worked: sorted [1, 2, 4, 8]; q=0.25 -> rank 0.75 -> 1 + 0.75*(2-1) = 1.75
    assert M.percentile([8, 1, 4, 2], 0.25) == 1.75
    # q=0.5 -> rank 1.5 -> 2 + 0.5*(4-2) = 3
    assert M.percentile([8, 1, None, 4, 2], 0.5) == 3.0


def test_first_layer_and_depth_fraction():
    assert M.first_layer([False, None, True, True]) == 2
    assert M.first_layer([False, False]) is None
    assert M.first_layer([True, False, True], layers=[5, 3, 4]) == 4  # ascending layer order
    assert M.depth_fraction(36, 40) == 0.9
    assert M.depth_fraction(2, 7) == 0.286
    assert M.depth_fraction(None, 40) is None
    assert M.depth_fraction(3, 0) is None


def test_entropy_and_kl_bits():
    z = np.array([1.0, 1.0, 1.0, 1.0])
    assert M.entropy_bits_from_logits(z) == pytest.approx(2.0, abs=1e-6)  # uniform over 4 -> 2 bits
    z = np.array([0.0, -200.0, 3.0])  # one exp underflows to 0 in fp32: the term is dropped, no NaN
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    ref = -sum(pi * math.log2(pi) for pi in p if pi > 0)
    assert M.entropy_bits_from_logits(z) == pytest.approx(ref, rel=1e-5)
    p, q = np.array([0.5, 0.5]), np.array([0.25, 0.75])
    assert M.kl_bits(p, q) == pytest.approx(0.5 * math.log2(2) + 0.5 * math.log2(0.5 / 0.75), abs=1e-9)
    assert M.kl_bits(p, p) == pytest.approx(0.0, abs=1e-12)


def test_teacher_entropy_and_cosines():
    z = np.array([3.0, 1.0, 0.0, -2.0])
    q = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert M.teacher_entropy_bits(z) == pytest.approx(float(-(q * np.log2(q)).sum()), rel=1e-6)
    # cos to final: v = (1, 0, 1) vs f - b = (2, 0, 0): cos = 1/sqrt(2); v2 = -f: cos = -1
    c = M.cosine_to_final(np.array([[1.0, 0.0, 1.0], [-3.0, 0.0, 0.0]]), np.array([2.5, 0.0, 0.0]), bias=[0.5, 0, 0])
    np.testing.assert_allclose(c, [2 ** -0.5, -1.0], rtol=1e-6)
    # geometry: W_U columns e0, e1, (1,1)/sqrt2 (unnormalised here) and h = (1, 0)
    W = np.array([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0]])
    ca, cp = M.geom_cosines(np.array([[1.0, 0.0], [0.0, 1.0]]), W, 2, [0, 1])
    np.testing.assert_allclose(ca, [2 ** -0.5, 2 ** -0.5], rtol=1e-6)
    np.testing.assert_allclose(cp, [[1.0, 0.0], [0.0, 1.0]], atol=1e-6)
    assert M.geom_cosines(np.ones((2, 2)), W, None, [])[1].shape == (2, 0)


def test_rest_mass():
    tp = np.array([[0.5, 0.25, 0.125], [0.7, 0.2, 0.2]])
    np.testing.assert_allclose(M.rest_mass(tp), [0.125, 0.0])  # second row would be -0.1 -> clipped


def test_answer_logit_gaps_logits_equal_logprobs():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(5, 30)) * 3
    a = 7
    z[2, a] = z[2].max() + 1.25       # answer is the arg-max at layer 2: gap = 1.25 exactly
    lse = np.log(np.exp(z).sum(axis=1))
    logp = z - lse[:, None]
    order = np.argsort(-z, axis=1, kind="stable")
    top_ids = order[:, :5]
    rank = 1 + (z > z[:, [a]]).sum(axis=1)
    g1, v1 = M.answer_logit_gaps(rank.tolist(), a, top_ids, np.take_along_axis(z, top_ids, 1), z[:, a])
    g2, v2 = M.answer_logit_gaps(rank.tolist(), a, top_ids, np.take_along_axis(logp, top_ids, 1), logp[:, a])
    assert g1[2] == pytest.approx(1.25, abs=1e-12)
    for i in range(5):
        if rank[i] == 1:
            assert v1[i] is None and g1[i] == pytest.approx(g2[i], abs=1e-9)
        else:
            assert g1[i] is None
            assert v1[i] == pytest.approx(z[i, a] - z[i].max(), abs=1e-12)
            assert v2[i] == pytest.approx(v1[i], abs=1e-9)
    # rank 1 through a tie, but another id is the arg-max: the gap is undefined (reference rule)
    g, v = M.answer_logit_gaps([1], 3, np.array([[2, 3]]), np.array([[5.0, 5.0]]), np.array([5.0]))
    assert g == [None] and v == [None]


# ---------------------------------------------------------------------------------------------
# copy detectors (§2.3)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("s,expected", [
    ("", True), ("   ", True), ("\n", True), (",", True), (" ,", True), ("...", True), ('"', True),
    ("\u2581", True), ("\u0120", True), ("\u010a", True), ("\u0120,", True), ("\u2581.", True),
    ("Berlin", False), (" Berlin", False), ("\u2581the", False), ("\u0120Berlin", False),
    ("\u2019", False),  # typographic apostrophe is not ASCII punctuation
    (None, False),
])
def test_ws_punct_guard(s, expected):
    assert M.is_pure_ws_punct(s) is expected


def test_id_subsequence():
    hay = [10, 11, 12, 13]
    assert M.is_id_subseq([11, 12], hay)
    assert M.is_id_subseq([13], hay)
    assert not M.is_id_subseq([12, 11], hay)
    assert not M.is_id_subseq([11, 13], hay)
    assert not M.is_id_subseq([], hay)
    assert not M.is_id_subseq([10, 11, 12, 13, 14], hay)


def test_labels_and_copy_flag_columns():
    assert M.copy_flag_columns() == ["copy_strict@0.95", "copy_strict@0.7", "copy_strict@0.8", "copy_strict@0.9",
                                     "copy_soft_k1@0.5", "copy_soft_k2@0.5", "copy_soft_k3@0.5"]
    cfg = CopyThresholds(soft_threshold=0.33, soft_extra_thresholds=(0.9, 0.25), soft_window_ks=(2, 1))
    assert M.copy_flag_columns(cfg) == [
        "copy_strict@0.95", "copy_strict@0.7", "copy_strict@0.8", "copy_strict@0.9",
        "copy_soft_k2@0.33", "copy_soft_k1@0.33",
        "copy_soft_k1@0.25", "copy_soft_k2@0.25", "copy_soft_k1@0.9", "copy_soft_k2@0.9"]
    assert M.format_threshold(0.70, 2) == "0.7" and M.format_threshold(1.0, 2) == "1"
    assert M.copy_strict_label(0.955) == "copy_strict@0.955"
    assert M.copy_strict_label(0.901, sweep=True) == "copy_strict@0.9"


CTX = [10, 11, 12, 13, 14]
NAMES = {10: "Give", 11: " the", 12: " capital", 13: " simply", 14: ","}
TOP1 = [5, 11, 12, 13, 14, 7, 13, 12]
P1 = [0.99, 0.97, 0.60, 0.96, 0.99, 0.99, 0.92, 0.40]
P2 = [0.005, 0.90, 0.30, 0.02, 0.005, 0.005, 0.01, 0.30]


def _decode(i):
    return NAMES.get(int(i), f"tok{int(i)}")


def test_copy_detectors_on_constructed_sequence():
    strs = [_decode(i) for i in TOP1]
    f = M.copy_flags(TOP1, P1, P2, CTX, strs)
    F, T = False, True
    # strict@0.95 (margin 0.10): L1 margin 0.07 too small; L3 hit; L4 "," is guarded; L6 p1 0.92 < 0.95
    assert f["copy_collapse"] == [F, F, F, T, F, F, F, F]
    assert f["copy_strict@0.95"] == f["copy_collapse"]
    assert f["copy_strict@0.9"] == [F, F, F, T, F, F, T, F]
    assert f["copy_strict@0.8"] == f["copy_strict@0.9"]
    assert f["copy_strict@0.7"] == f["copy_strict@0.9"]      # L2 (p1 0.60) stays below 0.7
    # soft k1 @0.5: top-1 in ctx and p1 > 0.5, no guard (L4 "," counts), no margin (L1 counts)
    assert f["copy_soft_k1@0.5"] == [F, T, T, T, T, F, T, F]
    # k2 windows: [5] [5,11] [11,12] [12,13] [13,14] [14,7] [7,13] [13,12]
    assert f["copy_soft_k2@0.5"] == [F, F, T, T, T, F, F, F]
    # k3 windows: .. [5,11,12] [11,12,13] [12,13,14] [13,14,7] [14,7,13] [7,13,12]
    assert f["copy_soft_k3@0.5"] == [F, F, F, T, T, F, F, F]
    assert list(f) == ["copy_collapse"] + M.copy_flag_columns()
    # Prism: no strict sweep
    assert set(M.copy_flags(TOP1, P1, P2, CTX, strs, sweep=False)) == {
        "copy_collapse", "copy_strict@0.95", "copy_soft_k1@0.5", "copy_soft_k2@0.5", "copy_soft_k3@0.5"}
    assert M.top1_windows([1, 2, 3, 4], 3) == [[1], [1, 2], [1, 2, 3], [2, 3, 4]]


def test_copy_summary_and_stability():
    strs = [_decode(i) for i in TOP1]
    cols = {"layer": list(range(8)), **M.copy_flags(TOP1, P1, P2, CTX, strs),
            "is_answer": [False] * 6 + [True, True], "answer_rank": [9, 9, 9, 9, 9, 9, 1, 1]}
    s = SU.summarize_pass(cols, n_layers=7)
    assert s["L_copy"] == 3 and s["L_semantic"] == 6 and s["delta_layers"] == 3
    assert s["L_copy_soft"] == {1: 1, 2: 2, 3: 3}
    assert s["delta_layers_soft"] == {1: 5, 2: 4, 3: 3}
    assert s["copy_detector"]["soft"]["L_copy_soft"] == {"k1": 1, "k2": 2, "k3": 3}
    assert s["copy_detector"]["deltas"]["\u0394_sem_minus_copy_soft"] == {"k1": 5, "k2": 4, "k3": 3}
    ct = s["copy_thresholds"]
    assert ct["L_copy_strict"] == {"0.7": 3, "0.8": 3, "0.9": 3, "0.95": 3}
    assert ct["L_copy_strict_frac"]["0.95"] == round(3 / 7, 3)
    assert ct["stability"] == "stable"
    assert s["depth_fractions"]["L_copy_soft_k2_frac"] == round(2 / 7, 3)
    # the reference bug N1 makes every non-empty sweep "mixed"
    assert SU.summarize_pass(cols, n_layers=7, quirks=M.ReferenceQuirks(copy_stability_key_bug=True)
                            )["copy_thresholds"]["stability"] == "mixed"
    # stability rule on its own (n = 40)
    st = SU.copy_stability
    assert st({0.7: None, 0.95: None}, 40) == "none"
    assert st({0.7: None, 0.95: 5}, 40) == "mixed"
    assert st({0.7: 3, 0.95: 5}, 40) == "stable"          # Δ = 2
    assert st({0.7: 3, 0.95: 8}, 100) == "stable"         # Δ = 5 but Δ/n = 0.05
    assert st({0.7: 3, 0.95: 9}, 40) == "fragile"         # Δ = 6
    assert st({0.7: 3, 0.95: 8}, 40) == "mixed"           # Δ = 5, Δ/n = 0.125
    assert st({0.7: 3, 0.95: 8}, 30) == "fragile"         # Δ/n = 0.167
    # norm-only flags from the raw window rows
    rows = [{"layer": 5, "lens": "raw", "copy_strict@0.95": True}, {"layer": 3, "lens": "norm", "copy_strict@0.7": True}]
    assert SU.copy_norm_only_flags({"0.7": 3, "0.95": 3, "0.8": None}, rows, radius=2) == {
        "0.7": True, "0.95": False, "0.8": None}


def test_copy_ignore_mask_and_prompt_vocab():
    vocab = {0: "!", 1: "a", 2: " ", 3: "\u0120", 4: "Paris", 5: ",", 6: "\u2581x"}
    m = M.copy_ignore_mask(lambda i: vocab[i], 7, sample=2)
    assert m == {"ignored_token_ids": [0, 2, 3, 5], "ignored_token_str_sample": ["!", " "], "size": 4}
    assert M.prompt_vocab([4, 5, 1, 4, 6, 1, 0], lambda i: vocab[i]) == [4, 1, 6]


def test_verbose_positions():
    words = ["Germany", "Berlin", "capital", "Answer", "word", "simply"]
    toks = ["Give", " the", " city", " word", " Capital", ".", " Germany", "'s", " simply"]
    assert M.is_verbose_position(" GERMANY.", words)
    assert M.is_verbose_position("swords", words)      # substring rule
    assert not M.is_verbose_position(" German", words)
    assert M.verbose_positions(toks, words) == [False, False, False, True, True, False, True, False, True]
    assert M.verbose_positions(["a", "b"], words) == [False, True]  # the last position always


# ---------------------------------------------------------------------------------------------
# semantic collapse and gates (§2.4, §2.5, §2.9)
# ---------------------------------------------------------------------------------------------

def _semantic_cols():
    V = 1000
    rank = [900, 40, 1, 3, 1, 1, 1, 1]
    p = [1e-4, 1e-3, 0.0015, 0.2, 0.5, 0.6, 0.7, 0.9]
    amu = [x - 1.0 / V for x in p]
    gap = [None, None, 0.8, None, 0.3, 0.7, 0.9, 2.0]
    margin = [r == 1 and a >= 0.002 for r, a in zip(rank, amu)]
    return {"layer": list(range(8)), "answer_rank": rank, "p_answer": p, "answer_minus_uniform": amu,
            "answer_logit_gap": gap, "semantic_margin_ok": margin, "is_answer": [r == 1 for r in rank],
            "kl_to_final_bits": [9.0, 4.0, 1.2, 1.0, 0.6, 0.5, 0.1, 0.0],
            "entropy_collapse": [False, False, False, True, False, True, True, True]}, V


def test_semantic_gates_fixed_q1():
    cols, V = _semantic_cols()
    s = SU.summarize_pass(cols, n_layers=7, p_uniform=1.0 / V)
    assert s["L_semantic"] == 2 and s["first_rank_le_1"] == 2
    assert s["first_rank_le_5"] == 2 and s["first_rank_le_10"] == 2
    assert s["first_kl_below_1.0"] == 3 and s["first_kl_below_0.5"] == 5   # "<=" at 1.0 and 0.5
    assert s["L_copy_H"] == 3
    assert s["L_semantic_margin_ok"] == 4           # layer 2: p - 1/V = 0.0005 < 0.002
    sm = s["semantic_margin"]
    assert sm == {"delta_abs": 0.002, "p_uniform": 0.001, "L_semantic_margin_ok_norm": 4,
                  "margin_ok_at_L_semantic_norm": False, "p_answer_at_L_semantic_norm": 0.0015}
    sg = s["semantic_gate"]
    assert sg["L_semantic_top2_ok_norm"] == 2 and sg["L_semantic_top2_ok_norm_frac"] == 0.286
    assert sg["gap_at_L_semantic_norm"] == 0.8
    assert sg["L_semantic_run2"] == 4               # rank 1 at 4 and 5 (3 breaks 2->3)
    assert sg["L_semantic_strong"] == 5             # 2: margin fails; 4: gap 0.3 fails
    assert sg["L_semantic_strong_run2"] == 5
    assert list(sg) == ["delta_top2_logit", "L_semantic_top2_ok_norm", "L_semantic_top2_ok_norm_frac",
                        "gap_at_L_semantic_norm", "delta_abs", "L_semantic_run2", "L_semantic_strong",
                        "L_semantic_strong_run2"]
    assert s["answer_margin_thresholds"] == {"gap_ge_0.5": 2, "gap_ge_1.0": 7}
    df = s["depth_fractions"]
    assert df["L_semantic_strong_frac"] == round(5 / 7, 3) and df["L_semantic_run2_frac"] == round(4 / 7, 3)


def test_semantic_gates_reference_q1():
    cols, V = _semantic_cols()
    s = SU.summarize_pass(cols, n_layers=7, p_uniform=1.0 / V, quirks=M.ReferenceQuirks(q1_gap_not_in_summaries=True))
    sg = s["semantic_gate"]
    assert (sg["L_semantic_top2_ok_norm"], sg["L_semantic_top2_ok_norm_frac"], sg["gap_at_L_semantic_norm"],
            sg["L_semantic_strong"], sg["L_semantic_strong_run2"]) == (None,) * 5
    assert sg["L_semantic_run2"] == 4 and s["L_semantic_margin_ok"] == 4
    assert s["answer_margin_thresholds"] == {"gap_ge_0.5": None, "gap_ge_1.0": None}
    assert s["depth_fractions"]["L_semantic_strong_frac"] is None


def test_run_of_two_needs_the_next_layer():
    # tuned lens: layers 1..4, rank 1 only at the last layer -> no run of two
    cols = {"layer": [1, 2, 3, 4], "answer_rank": [5, 2, 3, 1], "is_answer": [False, False, False, True]}
    s = SU.summarize_pass(cols, n_layers=4, lens="tuned")
    assert s["L_semantic"] == 4 and s["semantic_gate"]["L_semantic_run2"] is None
    assert "depth_fractions" not in s and "L_surface_to_meaning_tuned" in s
    assert s["cos_milestones"] == {"tuned": {"ge_0.2": None, "ge_0.4": None, "ge_0.6": None}}


def test_add_confirmed_fields():
    cols, V = _semantic_cols()
    s = SU.summarize_pass(cols, n_layers=7, p_uniform=1.0 / V)
    SU.add_confirmed_fields(s, 4)   # run2 = 4 lies in [2-2, 2+2]; confirmed 4 == margin-ok layer 4
    assert s["semantic_margin"]["L_semantic_confirmed_margin_ok_norm"] == 4
    assert s["semantic_gate"]["run2_overlaps_confirmed_window"] is True
    SU.add_confirmed_fields(s, None)
    assert s["semantic_margin"]["L_semantic_confirmed_margin_ok_norm"] is None
    assert s["semantic_gate"]["run2_overlaps_confirmed_window"] is None


# ---------------------------------------------------------------------------------------------
# surface, geometry, top-K decay, cosines, entropy gap (§2.2, §2.6-2.8)
# ---------------------------------------------------------------------------------------------

def test_surface_geom_topk_cos_entropy_summary():
    ent = [12.0, 9.5, 3.25, 1.0]
    cols = {
        "layer": [0, 1, 2, 3],
        "answer_mass": [0.0, 0.01, 0.25, 0.6], "echo_mass_prompt": [0.3, 0.2, 0.15, 0.01],
        # L_geom: 0.01 < 0.22; 0.05 < 0.06; 0.10 >= 0.07 + 0.02 -> 2
        "cos_to_answer": [0.01, 0.05, 0.10, 0.3], "cos_to_prompt_max": [0.2, 0.04, 0.07, 0.1],
        "topk_prompt_mass@50": [0.9, 0.5, 0.33, 0.1],     # 0.33 <= 0.33 -> 2
        "cos_to_final": [-0.1, 0.25, 0.45, 0.99],
        "entropy_bits": ent, "teacher_entropy_bits": [1.0] * 4,
    }
    s = SU.summarize_pass(cols, n_layers=3)
    assert (s["L_surface_to_meaning_norm"], s["answer_mass_at_L_surface_norm"], s["echo_mass_at_L_surface_norm"]) == (2, 0.25, 0.15)
    assert (s["L_geom_norm"], s["cos_to_answer_at_L_geom_norm"], s["cos_to_prompt_max_at_L_geom_norm"]) == (2, 0.10, 0.07)
    assert (s["L_topk_decay_norm"], s["topk_prompt_mass_at_L_norm"]) == (2, 0.33)
    assert (s["topk_prompt_tau_norm"], s["surface_delta_norm"], s["geom_gamma_norm"]) == (0.33, 0.05, 0.02)
    assert s["cos_milestones"] == {"norm": {"ge_0.2": 1, "ge_0.4": 2, "ge_0.6": 3}}
    gaps = np.array(ent) - 1.0
    for k, q in (("p25", 25), ("p50", 50), ("p75", 75)):
        assert s["entropy_gap_bits_percentiles"][k] == pytest.approx(np.percentile(gaps, q), abs=1e-12)
    assert s["entropy_gap_samples"] == 4
    assert s["L_semantic"] is None and s["first_rank_le_1"] is None


def _softmax64(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_pure_next_token_metrics_independent():
    rng = np.random.default_rng(3)
    L, V = 4, 12
    z = rng.normal(size=(L, V)) * 2.0
    a, ctl_foil = 7, 9
    z[3, a] = z[3].max() + 2.0          # answer rank 1 at layer 3
    z[2, a] = z[2].max() + 0.001        # rank 1 with a tiny gap at layer 2
    zf = z[3] * 1.5                     # teacher logits
    p = _softmax64(z)
    q = _softmax64(zf)
    order = np.lexsort((np.tile(np.arange(V), (L, 1)), -p), axis=1)   # prob desc, ties -> lower id
    top_ids = order[:, :8]
    top_probs = np.take_along_axis(p, top_ids, 1)
    rank = 1 + (p > p[:, [a]]).sum(axis=1)
    ent = -(p * np.log2(p)).sum(axis=1)
    kl = (p * (np.log2(p) - np.log2(q))).sum(axis=1)
    teacher = float(-(q * np.log2(q)).sum())
    ctx = [3, 4, 5, 4]
    names = {3: "Ger", 4: "many", 5: ","}
    decode = lambda i: names.get(int(i), f"t{int(i)}")  # noqa: E731
    pv = M.prompt_vocab(ctx, decode)
    assert pv == [3, 4]
    cos_ans = np.array([0.0, 0.1, 0.3, 0.5])
    cos_prompt = np.array([[0.2, 0.1], [0.05, 0.09], [0.25, 0.1], [0.1, 0.2]])
    th = dataclasses.replace(Thresholds(), surface=SurfaceThresholds(topk_prompt_k=5))
    cols = M.pure_next_token_metrics(
        entropy_bits=ent, kl_to_final_bits=kl, top_ids=top_ids, top_probs=top_probs,
        teacher_entropy_bits=teacher, vocab_size=V, ctx_ids=ctx, decode=decode, gold_id=a,
        gold_rank=rank, gold_prob=p[:, a], answer_score=z[:, a], top_scores=np.take_along_axis(z, top_ids, 1),
        cos_to_final=np.array([0.1, 0.2, 0.3, 0.9]), cos_to_answer=cos_ans, cos_to_prompt=cos_prompt,
        prompt_probs=p[:, pv], control_probs=(p[:, a], p[:, ctl_foil]), thresholds=th)
    assert cols["layer"] == [0, 1, 2, 3]
    assert cols["top1_id"] == top_ids[:, 0].tolist()
    np.testing.assert_allclose(cols["p_top1"], p.max(axis=1))
    np.testing.assert_allclose(cols["p_top5"], np.sort(p, axis=1)[:, ::-1][:, :5].sum(axis=1), rtol=1e-6)
    np.testing.assert_allclose(cols["rest_mass"], 1 - np.sort(p, axis=1)[:, ::-1][:, :5].sum(axis=1), atol=1e-12)
    assert cols["answer_rank"] == rank.tolist()
    assert cols["is_answer"] == [bool(r == 1) for r in rank]
    np.testing.assert_allclose(cols["answer_minus_uniform"], p[:, a] - 1.0 / V)
    exp_margin = [bool(r == 1 and pa - 1.0 / V >= 0.002) for r, pa in zip(rank, p[:, a])]
    assert cols["semantic_margin_ok"] == exp_margin
    assert cols["teacher_entropy_bits"] == [teacher] * L
    np.testing.assert_allclose(cols["kl_to_final_bits"], kl)
    assert cols["entropy_collapse"] == [bool(e <= 1.0) for e in ent]
    # gaps: z_a - second logit where rank 1, z_a - max logit elsewhere
    zs = np.sort(z, axis=1)[:, ::-1]
    for i in range(L):
        if rank[i] == 1:
            assert cols["answer_logit_gap"][i] == pytest.approx(z[i, a] - zs[i, 1], abs=1e-12)
            assert cols["answer_vs_top1_gap"][i] is None
        else:
            assert cols["answer_logit_gap"][i] is None
            assert cols["answer_vs_top1_gap"][i] == pytest.approx(z[i, a] - zs[i, 0], abs=1e-12)
    assert cols["answer_logit_gap"][3] == pytest.approx(2.0, abs=1e-12)
    assert cols["control_top2_logit_gap"] == cols["answer_logit_gap"]
    np.testing.assert_allclose(cols["control_margin"], p[:, a] - p[:, ctl_foil])
    # surface
    echo = p[:, 3] + p[:, 4]
    np.testing.assert_allclose(cols["echo_mass_prompt"], echo)
    np.testing.assert_allclose(cols["answer_mass"], p[:, a])
    np.testing.assert_allclose(cols["answer_minus_echo_mass"], p[:, a] - echo)
    np.testing.assert_allclose(cols["mass_ratio_ans_over_prompt"], p[:, a] / (echo + 1e-9))
    top5 = order[:, :5]
    exp_topk = [sum(p[i, t] for t in top5[i] if t in (3, 4)) for i in range(L)]
    np.testing.assert_allclose(cols["topk_prompt_mass@50"], exp_topk, atol=1e-15)
    # geometry: max prompt cosine [0.2, 0.09, 0.25, 0.2]; crossover: 0.3 >= 0.27, 0.5 >= 0.22
    np.testing.assert_allclose(cols["cos_to_prompt_max"], [0.2, 0.09, 0.25, 0.2])
    assert cols["geom_crossover"] == [False, False, True, True]
    # without logits the gaps come from log-probabilities: same numbers
    cols2 = M.pure_next_token_metrics(
        entropy_bits=ent, kl_to_final_bits=kl, top_ids=top_ids, top_probs=top_probs, teacher_entropy_bits=teacher,
        vocab_size=V, ctx_ids=ctx, decode=decode, gold_id=a, gold_rank=rank, gold_prob=p[:, a], lens="tuned",
        layers=[1, 2, 3, 4])
    for g1, g2 in zip(cols["answer_logit_gap"] + cols["answer_vs_top1_gap"],
                      cols2["answer_logit_gap"] + cols2["answer_vs_top1_gap"]):
        assert (g1 is None and g2 is None) or g1 == pytest.approx(g2, abs=1e-9)
    assert cols2["semantic_margin_ok"] == [None] * L and cols2["layer"] == [1, 2, 3, 4]
    assert cols2["echo_mass_prompt"] == [None] * L and cols2["topk_prompt_mass@50"] == [None] * L
    # position axis accepted: [L, T] / [L, T, k] arrays sliced at t* = -1
    cols3 = M.pure_next_token_metrics(
        entropy_bits=np.stack([ent * 0, ent], 1), kl_to_final_bits=np.stack([kl, kl], 1),
        top_ids=np.stack([top_ids, top_ids], 1), top_probs=np.stack([top_probs, top_probs], 1),
        teacher_entropy_bits=teacher, vocab_size=V, ctx_ids=ctx, decode=decode)
    np.testing.assert_allclose(cols3["entropy_bits"], ent)
    # no gold id: string fallback (top-1 string stripped == gold string)
    assert cols3["is_answer"] == [False] * L and cols3["answer_rank"] == [None] * L
    cols4 = M.pure_next_token_metrics(
        entropy_bits=ent, kl_to_final_bits=kl, top_ids=top_ids, top_probs=top_probs, teacher_entropy_bits=teacher,
        vocab_size=V, ctx_ids=ctx, decode=lambda i: " Berlin " if int(i) == int(top_ids[1, 0]) else "x",
        gold_string="Berlin")
    assert cols4["is_answer"] == [i == 1 or int(top_ids[i, 0]) == int(top_ids[1, 0]) for i in range(L)]
    # summary from these columns is consistent with the hand-derived ones
    s = SU.summarize_pass(cols, n_layers=3, p_uniform=1.0 / V, thresholds=th)
    assert s["L_semantic"] == M.first_layer([r == 1 for r in rank])
    assert s["L_geom_norm"] == 2


# ---------------------------------------------------------------------------------------------
# control, ablation, micro-suite, final-head probes, bias audit (§2.10, 2.11, 2.22, 2.24, 2.25)
# ---------------------------------------------------------------------------------------------

def test_control_summary():
    PARIS = 42
    cols = {"layer": [0, 1, 2, 3, 4],
            "control_margin": [-0.1, 0.02, 0.3, 0.9, 0.5],
            "control_top2_logit_gap": [None, 0.2, None, 3.5, 0.7],
            "top1_id": [7, PARIS, 8, PARIS, PARIS]}
    s = SU.control_summary(cols, control_answer_id=PARIS)
    # layer 1: gap 0.2 < 0.5; layer 3: margin > 0, gap 3.5, top-1 Paris
    assert s == {"first_control_margin_pos": 1, "max_control_margin": 0.9, "first_control_strong_pos": 3,
                 "max_control_top2_logit_gap": 3.5, "delta_top2_logit_ctl": 0.5}
    cols["top1_id"][3] = 8
    assert SU.control_summary(cols, control_answer_id=PARIS)["first_control_strong_pos"] == 4


def test_ablation_summary():
    assert SU.ablation_summary({"L_copy": 3, "L_semantic": 30}, {"L_copy": None, "L_semantic": 28}) == {
        "L_copy_orig": 3, "L_sem_orig": 30, "L_copy_nf": None, "L_sem_nf": 28, "delta_L_copy": None, "delta_L_sem": -2}


def test_micro_suite_hand_worked():
    def summ(Lc, soft, Ls, Lm):
        return {"L_copy": Lc, "copy_detector": {"strict": {"L_copy_strict": Lc}}, "L_copy_soft": soft,
                "L_semantic": Ls, "L_semantic_margin_ok": Lm}
    n = 40
    facts = [
        {"fact_key": "A", "fact_index": 0, "summary": summ(2, {1: 1, 2: None, 3: None}, 30, 31), "row_offset": 0,
         "L_semantic_confirmed": 30},
        {"fact_key": "B", "fact_index": 1, "summary": summ(None, {1: None, 2: 5, 3: 4}, 25, 25), "row_offset": 82},
        {"fact_key": "C", "fact_index": 2, "summary": summ(None, {1: None, 2: None, 3: None}, 33, None), "row_offset": 164},
        {"fact_key": "D", "fact_index": 3, "summary": summ(None, {1: None, 2: None, 3: None}, None, None), "row_offset": 246},
    ]
    ms = SU.micro_suite(facts, n_layers=n, notes="note")
    f = ms["facts"]
    assert [x["delta_hat"] for x in f] == [28 / 40, 21 / 40, None, None]   # B: earliest soft layer 4
    assert [x["row_index"] for x in f] == [30, 107, 197, None]
    assert ms["citations"] == {"fact_rows": {"A": 30, "B": 107, "C": 197, "D": None}}
    ag = ms["aggregates"]
    assert ag["n"] == 4 and ag["n_missing"] == 1
    assert ag["L_copy_strict_median"] == 2 and ag["L_copy_soft_k1_median"] == 1
    assert ag["L_semantic_norm_median"] == 30                # [25, 30, 33] -> 30
    assert ag["L_semantic_margin_ok_norm_median"] == 28      # median(25, 31) = 28.0
    assert ag["L_semantic_confirmed_median"] == 30
    assert ag["delta_hat_median"] == round((0.7 + 0.525) / 2, 4)
    assert ag["L_semantic_norm_iqr"] == [round(27.5), round(31.5)]  # p25 27.5 -> 28, p75 31.5 -> 32 (half-even)
    assert ag["L_semantic_norm_iqr"] == [28, 32]
    assert ag["notes"] == "note"


def test_final_head_probe():
    z = np.array([2.0, 1.0, 2.0, -1.0, 0.5])
    names = ["a", "b", "c", "d", "e"]
    rec = SU.final_head_probe(z, lambda i: names[i], top_k=3)
    p = _softmax64(z)
    assert [t for t, _ in rec["topk"]] == ["a", "c", "b"]       # tie 0/2 -> lower id first
    np.testing.assert_allclose([x for _, x in rec["topk"]], p[[0, 2, 1]], rtol=1e-6)
    assert rec["entropy"] == pytest.approx(float(-(p * np.log2(p)).sum()), rel=1e-6)
    assert list(rec) == ["type", "entropy", "topk"] and rec["type"] == "final_prediction"
    rec = SU.final_head_probe(z, lambda i: names[i], top_k=2, kind="temperature_exploration", temperature=2.0)
    p2 = _softmax64(z / 2.0)
    assert list(rec) == ["type", "temperature", "entropy", "topk"] and rec["temperature"] == 2.0
    assert rec["entropy"] == pytest.approx(float(-(p2 * np.log2(p2)).sum()), rel=1e-6)
    rec = SU.final_head_probe(z, lambda i: names[i], top_k=1, kind="test_prompt", prompt="Berlin is")
    assert list(rec) == ["type", "prompt", "entropy", "topk"] and rec["topk"][0][0] == "a"


def test_unembed_bias_audit():
    assert SU.unembed_bias_audit(None) == {"present": False, "l2_norm": 0.0, "max_abs": 0.0}
    assert SU.unembed_bias_audit(np.zeros(5)) == {"present": False, "l2_norm": 0.0, "max_abs": 0.0}
    assert SU.unembed_bias_audit(np.array([3.0, -4.0])) == {"present": True, "l2_norm": 5.0, "max_abs": 4.0}


# ---------------------------------------------------------------------------------------------
# regression against the published Qwen3-14B outputs (reference pure CSV -> reference JSON)
# ---------------------------------------------------------------------------------------------



def _conv(v):
    if v == "":
        return None
    if v in ("True", "False"):
        return v == "True"
    for f in (int, float):
        try:
            return f(v)
        except ValueError:
            pass
    return v


@pytest.fixture(scope="module")
def ref():
    with open(PURE_CSV, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    sk = json.loads(SKELETON.read_text(encoding="utf-8"))

    def cols(pid, var, fi):
        rs = [r for r in rows if r["prompt_id"] == pid and r["prompt_variant"] == var
              and (fi is None or r["fact_index"] == str(fi))]
        return {k: [_conv(r[k]) for r in rs] for k in rs[0]}
    return rows, sk, cols


def test_reference_primary_summary(ref):
    rows, sk, cols = ref
    dg = sk["diagnostics"]
    V, n = 151936, 40
    s = SU.summarize_pass(cols("pos", "orig", 0), n_layers=n, p_uniform=1.0 / V, quirks=M.ReferenceQuirks.reference())
    SU.add_confirmed_fields(s, dg["L_semantic_confirmed"])
    # every scalar / fully listed field equals the published JSON (the skeleton elides some lists)
    for key in ["L_copy", "L_copy_H", "L_semantic", "delta_layers", "copy_thresh", "copy_window_k", "copy_match_level",
                "first_kl_below_0.5", "first_kl_below_1.0", "first_rank_le_1", "first_rank_le_5", "first_rank_le_10",
                "copy_soft_threshold", "delta_layers_soft", "answer_margin_thresholds", "entropy_gap_bits_percentiles",
                "entropy_gap_samples", "L_surface_to_meaning_norm", "answer_mass_at_L_surface_norm",
                "echo_mass_at_L_surface_norm", "L_geom_norm", "cos_to_answer_at_L_geom_norm",
                "cos_to_prompt_max_at_L_geom_norm", "L_topk_decay_norm", "topk_prompt_mass_at_L_norm",
                "topk_prompt_tau_norm", "surface_delta_norm", "geom_gamma_norm", "cos_milestones", "depth_fractions",
                "L_semantic_margin_ok", "semantic_margin", "semantic_gate"]:
        assert json.loads(json.dumps(s[key])) == dg[key], key
    assert json.loads(json.dumps(s["L_copy_soft"])) == dg["L_copy_soft"]
    assert s["copy_thresholds"]["L_copy_strict"] == dg["copy_thresholds"]["L_copy_strict"]
    assert s["copy_thresholds"]["stability"] == dg["copy_thresholds"]["stability"]
    # key order of the summary block inside diagnostics
    order = [k for k in dg if k in s]
    assert order == [k for k in s if k in dg]
    assert sk["summary"]["semantic_gate"] == dg["semantic_gate"]


def test_reference_q1_fix_reaches_summary(ref):
    _, _, cols = ref
    s = SU.summarize_pass(cols("pos", "orig", 0), n_layers=40, p_uniform=1.0 / 151936)
    sg = s["semantic_gate"]
    # CSV: rank 1 at 36 (gap 3.1427), 39 (1.8668), 40 (0.3631); rank 4 at 37
    assert sg["L_semantic_top2_ok_norm"] == 36 and sg["L_semantic_top2_ok_norm_frac"] == 0.9
    assert sg["gap_at_L_semantic_norm"] == pytest.approx(3.142721176147461)
    assert sg["L_semantic_strong"] == 36 and sg["L_semantic_strong_run2"] is None
    assert s["answer_margin_thresholds"] == {"gap_ge_0.5": 36, "gap_ge_1.0": 36}


def test_reference_row_level_recomputation(ref):
    rows, _, cols = ref
    c = cols("pos", "orig", 0)
    V = 151936
    tp = np.array([[c[f"prob{j}"][i] for j in range(1, 6)] for i in range(41)])
    np.testing.assert_array_equal(M.rest_mass(tp), np.array(c["rest_mass"]))
    np.testing.assert_allclose(np.array(c["p_top5"]), tp.astype(np.float32).sum(axis=1, dtype=np.float32), rtol=5e-7)
    np.testing.assert_array_equal([None if p is None else p - 1.0 / V for p in c["p_answer"]], c["answer_minus_uniform"])
    # the logit gaps from log-probabilities agree with the reference's logit gaps
    for i in range(41):
        if c["answer_logit_gap"][i] is not None:
            assert math.log(c["p_answer"][i] / c["prob2"][i]) == pytest.approx(c["answer_logit_gap"][i], abs=2e-5)
        if c["answer_vs_top1_gap"][i] is not None:
            assert math.log(c["p_answer"][i] / c["prob1"][i]) == pytest.approx(c["answer_vs_top1_gap"][i], abs=2e-5)
        assert c["entropy_collapse"][i] == (c["entropy_bits"][i] <= 1.0)
        assert c["semantic_margin_ok"][i] == (c["answer_rank"][i] == 1 and c["answer_minus_uniform"][i] >= 0.002)
        ans, echo = c["answer_mass"][i], c["echo_mass_prompt"][i]
        assert c["mass_ratio_ans_over_prompt"][i] == pytest.approx(ans / (echo + 1e-9), rel=1e-12)
        assert c["geom_crossover"][i] == (c["cos_to_answer"][i] >= c["cos_to_prompt_max"][i] + 0.02)


def test_reference_control_ablation_micro_suite(ref):
    _, sk, cols = ref
    c = cols("ctl", "orig", None)
    c["control_top2_logit_gap"] = c["answer_logit_gap"]   # the control's gold is Paris: same definition
    c["top1_id"] = [12095 if (t or "").strip() == "Paris" else -1 for t in c["top1"]]
    assert SU.control_summary(c, control_answer_id=12095) == sk["control_summary"]
    n, V = 40, 151936
    orig = SU.summarize_pass(cols("pos", "orig", 0), n_layers=n, p_uniform=1.0 / V)
    nf = SU.summarize_pass(cols("pos", "no_filler", 0), n_layers=n, p_uniform=1.0 / V)
    assert SU.ablation_summary(orig, nf) == sk["ablation_summary"]
    suite = load_suite("reference")
    facts = []
    for f in suite.facts:
        s = SU.summarize_pass(cols("pos", "orig", f.index), n_layers=n, p_uniform=1.0 / V)
        facts.append({"fact_key": f.key, "fact_index": f.index, "summary": s,
                      "row_offset": 2 * f.index * (n + 1), "L_semantic_confirmed": 36 if f.index == 0 else None})
    ms = SU.micro_suite(facts, n_layers=n, notes=suite.micro_suite_notes)
    ref_ms = sk["diagnostics"]["micro_suite"]
    assert ms["citations"] == ref_ms["citations"]
    assert ms["facts"][0] == ref_ms["facts"][0]
    agg = dict(ms["aggregates"])
    assert agg.pop("L_semantic_norm_iqr") == [35, 36]
    ref_agg = dict(ref_ms["aggregates"])
    ref_agg.pop("L_semantic_norm_iqr")
    assert agg == ref_agg
    assert [f["L_semantic_norm"] for f in ms["facts"]] == [36, 35, 36, 33, 39]
