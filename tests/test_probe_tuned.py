"""The tuned lens inside the probe (spec/probe.md §3.4-3.7, jaxlens.probe.tuned).

A random low-rank tuned lens (with temperatures) on a tiny Qwen3 checkpoint; the probe's tuned rows, audit
variants, position grid and skip-layers sanity are recomputed in float64 from the transformers model itself
(its hidden states, its input / final norms and lm_head, and the reference's translator formula
x + (x U) V^T + c written out in torch). The summary arithmetic (unified metrics, attribution, audit summary,
skip sanity, head mismatch) is checked against values worked by hand.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

import hf_factory as F
from reference_data import HEADERS_JSON, MILESTONES_CSV, PURE_CSV, REF_DIR, SKELETON  # noqa: F401



def _random_lens(n, d, rank=4, seed=5, scale=0.15, zero=False):
    import jax.numpy as jnp

    from jaxlens.lens.tuned import THETA_INIT, LowRankLens

    rng = np.random.default_rng(seed)
    shp = (n - 1, d, rank)
    if zero:
        U = V = np.zeros(shp, np.float32)
        c = np.zeros((n - 1, d), np.float32)
        theta = np.full(n - 1, THETA_INIT, np.float32)
    else:
        U = rng.normal(0, scale, shp).astype(np.float32)
        V = rng.normal(0, scale, shp).astype(np.float32)
        c = rng.normal(0, 0.05, (n - 1, d)).astype(np.float32)
        theta = rng.normal(0, 0.6, n - 1).astype(np.float32)
    return LowRankLens(U=jnp.asarray(U), V=jnp.asarray(V), c=jnp.asarray(c), theta=jnp.asarray(theta), n_layers=n)


def _tau(theta):
    theta = np.asarray(theta, np.float64)
    return np.log1p(np.exp(theta)) + 1e-3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import jaxlens
    from jaxlens.probe.pipeline import run_probe
    from jaxlens.lens.tuned import save_lens

    base = tmp_path_factory.mktemp("probe-tuned")
    path = str(base / "qwen3")
    tm = F.build_checkpoint("qwen3", path, seed=77)
    model = jaxlens.load_model(path)
    n, d = model.spec.n_layers, model.spec.d_model
    lens = _random_lens(n, d)
    lens_dir = save_lens(lens, str(base / "lens"))
    out = str(base / "out")
    res = run_probe(model, out_dir=out, tuned=lens_dir)
    return dict(tm=tm, model=model, lens=lens, lens_dir=lens_dir, res=res, out=out, path=path, base=base)


def _torch_views(tm, ids, lens):
    """float64 logits of every view at every position: norm lens [n+1, T, V], tuned / rot-only / temp-only
    [n, T, V] (layers 1..n), final [T, V]; and the tuned geometry vectors [n, T, d]."""
    import torch

    layers, in_norms, final_norm, head = F._parts(tm)
    n = len(layers)
    ref = F.torch_reference(tm, np.asarray(ids)[None])
    res = torch.as_tensor(ref["residuals"][:, 0])                                     # [n+1, T, d]
    U, V, c = (torch.as_tensor(np.array(a), dtype=torch.float32) for a in (lens.U, lens.V, lens.c))
    tau = _tau(lens.theta)
    norm_z, tuned_z, rot_z, temp_z, geom = [], [], [], [], []
    with torch.no_grad():
        for layer in range(n + 1):
            x = (in_norms[layer] if layer < n else final_norm)(res[layer])
            zn = F._head_logits(tm, head, x).double().numpy()
            norm_z.append(zn)
            if layer == 0:
                continue
            if layer < n:
                i = layer - 1
                y = x + (x @ U[i]) @ V[i].T + c[i]
                t = float(tau[i])
            else:
                y, t = x, 1.0
            zr = F._head_logits(tm, head, y).double().numpy()
            rot_z.append(zr)
            tuned_z.append(zr / t)
            temp_z.append(zn / t)
            geom.append(y.double().numpy())
    return dict(norm=np.stack(norm_z), tuned=np.stack(tuned_z), rot=np.stack(rot_z), temp=np.stack(temp_z),
                geom=np.stack(geom), final=ref["logits"][0].astype(np.float64))


def _probs(z):
    lp = F.log_softmax64(z)
    return np.exp(lp), lp


def _rank(z, a):
    return 1 + (z > z[..., [a]]).sum(-1)


def _pass_index(res, prompt_id, variant, fact_index):
    for b, r in enumerate(res.passes):
        s = r.inp.spec
        if (s.prompt_id, s.variant, s.fact_index) == (prompt_id, variant, fact_index):
            return b
    raise KeyError((prompt_id, variant, fact_index))


# ---------------------------------------------------------------------------------------------------
# against torch


def test_tuned_pure_rows_match_torch(setup):
    res, tm, lens = setup["res"], setup["tm"], setup["lens"]
    n = setup["model"].spec.n_layers
    tres = res.tuned
    assert tres is not None and tres.source.status == "loaded"
    for b in (0, _pass_index(res, "ctl", res.passes[-1].inp.spec.variant, None)):
        inp = res.passes[b].inp
        cols = tres.passes[b].pure
        assert cols["layer"] == list(range(1, n + 1))
        v = _torch_views(tm, inp.input_ids, lens)
        z = v["tuned"][:, -1]
        p, lp = _probs(z)
        pf, lpf = _probs(v["final"][-1])
        kl = (p * (lp - lpf)).sum(-1) / math.log(2)
        ent = -(p * lp).sum(-1) / math.log(2)
        np.testing.assert_allclose(cols["kl_to_final_bits"], kl, rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(cols["entropy_bits"], ent, rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(cols["p_top1"], p.max(-1), rtol=1e-5, atol=1e-7)
        a = inp.gold.first_id
        assert a is not None
        assert list(cols["answer_rank"]) == [int(r) for r in _rank(z, a)]
        np.testing.assert_allclose(cols["p_answer"], p[:, a], rtol=1e-5, atol=1e-8)
        # geometry on the translated vector, before the temperature (spec §3.4)
        W = np.asarray(setup["model"].unembedding()[0], np.float64)                   # [d, V]
        u = v["geom"][:, -1] @ W
        cos = (u @ v["final"][-1]) / (np.linalg.norm(u, axis=-1) * np.linalg.norm(v["final"][-1]))
        np.testing.assert_allclose(cols["cos_to_final"], cos, rtol=1e-4, atol=1e-5)
        # the last layer is the model's own output: KL exactly 0
        assert cols["kl_to_final_bits"][-1] == pytest.approx(0.0, abs=1e-6)
        # columns the reference leaves blank for the tuned lens
        for name in ("semantic_margin_ok", "kl_to_final_bits_norm_temp"):
            assert all(x is None for x in cols.get(name, [None] * n)), name


def test_tuned_records_match_torch(setup):
    res, tm, lens = setup["res"], setup["tm"], setup["lens"]
    n = setup["model"].spec.n_layers
    rows = [r for r in res.sidecars["records-tuned"] if (r["prompt_id"], r["prompt_variant"], r["fact_index"]) ==
            ("pos", res.passes[0].inp.spec.variant, 0)]
    inp = res.passes[0].inp
    T = len(inp.input_ids)
    assert len(rows) == n * T and sorted({r["layer"] for r in rows}) == list(range(1, n + 1))
    v = _torch_views(tm, inp.input_ids, lens)
    p, lp = _probs(v["tuned"])                                                         # [n, T, V]
    ent = -(p * lp).sum(-1) / math.log(2)
    for r in rows:
        li, t = r["layer"] - 1, r["pos"]
        assert r["entropy_bits"] == pytest.approx(ent[li, t], rel=1e-5, abs=2e-6)
        assert r["prob1"] == pytest.approx(p[li, t].max(), rel=1e-5, abs=1e-7)


def test_audit_variants_match_torch(setup):
    res, tm, lens = setup["res"], setup["tm"], setup["lens"]
    n = setup["model"].spec.n_layers
    inp = res.passes[0].inp                             # fix Q2: the audit describes the primary fact
    v = _torch_views(tm, inp.input_ids, lens)
    pf, lpf = _probs(v["final"][-1])
    a = inp.gold.first_id
    rows = res.sidecars["pure-next-token-tuned-variants"]
    assert [r["layer"] for r in rows] == list(range(1, n + 1))
    views = {"baseline": v["norm"][1:, -1], "tuned": v["tuned"][:, -1], "rot_only": v["rot"][:, -1],
             "temp_only": v["temp"][:, -1]}
    kl = {}
    for name, z in views.items():
        p, lp = _probs(z)
        kl[name] = (p * (lp - lpf)).sum(-1) / math.log(2)
        np.testing.assert_allclose([r[f"kl_bits_{name}"] for r in rows], kl[name], rtol=1e-5, atol=2e-6)
        assert [r[f"answer_rank_{name}"] for r in rows] == [int(x) for x in _rank(z, a)]
    for r, i in zip(rows, range(n)):
        for name in ("tuned", "rot_only", "temp_only"):
            # a difference of two KLs, each within rtol 1e-5 + atol 2e-6 of its oracle (above)
            tol = 2 * 2e-6 + 1e-5 * (abs(kl["baseline"][i]) + abs(kl[name][i]))
            assert r[f"delta_kl_bits_{name}"] == pytest.approx(kl["baseline"][i] - kl[name][i], abs=tol)
            assert r[f"rank_shift_{name}"] == r["answer_rank_baseline"] - r[f"answer_rank_{name}"]
        assert r["delta_kl_bits_interaction"] == pytest.approx(
            r["delta_kl_bits_tuned"] - r["delta_kl_bits_rot_only"] - r["delta_kl_bits_temp_only"], abs=1e-12)


def test_position_grid_matches_torch(setup):
    from jaxlens.probe.diagnostics import position_grid

    res, tm, lens = setup["res"], setup["tm"], setup["lens"]
    n = setup["model"].spec.n_layers
    inp = res.passes[0].inp
    T = len(inp.input_ids)
    grid = position_grid(T)
    rows = res.sidecars["positions-tuned-audit"]
    assert len(rows) == n * len(grid)
    v = _torch_views(tm, inp.input_ids, lens)
    a = inp.gold.first_id
    for r in rows:
        t, li = r["pos_index"], r["layer"]
        assert (r["pos_frac"], t) in grid
        pf, lpf = _probs(v["final"][t])
        for name, z in (("baseline", v["norm"][li, t]), ("tuned", v["tuned"][li - 1, t])):
            p, lp = _probs(z)
            assert r[f"kl_bits_{name}"] == pytest.approx((p * (lp - lpf)).sum() / math.log(2), rel=1e-5, abs=2e-6)
            if t == T - 1:
                assert r[f"answer_rank_{name}"] == int(_rank(z, a))
            else:
                assert r[f"answer_rank_{name}"] is None


def test_skip_layers_sanity_matches_torch(setup):
    res, tm, lens = setup["res"], setup["tm"], setup["lens"]
    n = setup["model"].spec.n_layers
    suite_passes = [("pos", "orig", 0), ("pos", "no_filler", 0)]
    losses_b, losses_t = [], []
    for key in suite_passes + [("ctl", res.passes[_pass_index(res, "ctl", res.passes[-1].inp.spec.variant, None)]
                                .inp.spec.variant, None)]:
        inp = res.passes[_pass_index(res, *key)].inp
        v = _torch_views(tm, inp.input_ids, lens)
        a = inp.gold.first_id
        losses_b.append(-F.log_softmax64(v["final"][-1])[a])
        L = n - 2                                       # fix Q9: skipping 2 blocks decodes layer n-2
        losses_t.append(-F.log_softmax64(v["tuned"][L - 1, -1])[a])
    pb, pt = math.exp(np.mean(losses_b)), math.exp(np.mean(losses_t))
    sk = res.json["diagnostics"]["skip_layers_sanity"]
    assert sk["m=2"] == pytest.approx((pt - pb) / pb, rel=1e-4)
    assert sk["m=4"] is None and sk["m=8"] is None                  # n = 3: nothing left to skip to
    assert res.json["diagnostics"]["tuned_lens_regression"] is (sk["m=2"] > 0.2)


# ---------------------------------------------------------------------------------------------------
# files and JSON


def test_files_headers_and_json(setup):
    res, out = setup["res"], Path(setup["out"])
    headers = json.loads((REF_DIR / "csv-headers.json").read_text())
    n = setup["model"].spec.n_layers
    n_pass = len(res.passes)
    expect_rows = {"records-tuned": sum(len(r.inp.input_ids) for r in res.passes) * n,
                   "pure-next-token-tuned": n_pass * n, "pure-next-token-tuned-variants": n,
                   "positions-tuned-audit": len(res.sidecars["positions-tuned-audit"])}
    for kind, nrows in expect_rows.items():
        f = out / f"output-{res.model_name}-{kind}.csv"
        with open(f, newline="", encoding="utf-8") as fh:
            lines = list(csv.reader(fh))
        assert lines[0] == headers[f"-{kind}.csv"], kind
        assert len(lines) - 1 == nrows, kind
    doc = json.loads((out / f"output-{res.model_name}.json").read_text(encoding="utf-8"))
    skel = json.loads((REF_DIR / "output-Qwen3-14B.skeleton.json").read_text(encoding="utf-8"))
    tl = doc["tuned_lens"]
    assert list(tl) == list(skel["tuned_lens"])
    assert tl["status"] == "loaded" and tl["path"] == os.path.abspath(setup["lens_dir"])
    assert len(tl["summaries"]) == n_pass
    assert list(tl["summary"]["metrics"]) == list(skel["tuned_lens"]["summary"]["metrics"])
    assert list(tl["audit_summary"]) == list(skel["tuned_lens"]["audit_summary"])
    assert list(tl["provenance_snapshot"]) == list(skel["tuned_lens"]["provenance_snapshot"])
    dg = doc["diagnostics"]
    assert dg["tuned_lens"]["status"] == "loaded" and dg["tuned_lens"]["mode"] == "require"
    mirrors = [k for k in skel["diagnostics"] if k.endswith("_tuned")]
    for k in mirrors:
        assert dg[k] == tl["summaries"][0][k], k
    files = doc["evaluation_pack"]["citations"]["files"]
    assert files["tuned_pure_csv"] == f"output-{res.model_name}-pure-next-token-tuned.csv"
    assert files["tuned_variants_csv"] and files["positions_audit_csv"]
    # confirmed semantics sees the tuned ranks
    assert doc["diagnostics"]["confirmed_semantics"]["L_semantic_tuned"] == tl["summaries"][0]["first_rank_le_1"]
    assert {"Q2", "Q9", "N3", "N4"} <= set(doc["provenance"]["fixed_reference_bugs"])


def test_unified_metrics_and_attribution_from_rows(setup):
    """The JSON blocks recomputed from the probe's own pure rows, by hand."""
    res = setup["res"]
    n = setup["model"].spec.n_layers
    base, tuned = res.passes[0].pure, res.tuned.passes[0].pure
    tl = res.json["tuned_lens"]
    m = tl["summary"]["metrics"]

    def first(cols, ok):
        for layer, v in zip(cols["layer"], cols["answer_rank"]):
            if ok(v):
                return layer
        return None

    for k in (1, 5, 10):
        assert m["rank_milestones"]["baseline"][f"le_{k}"] == first(base, lambda r: r <= k)
        assert m["rank_milestones"]["tuned"][f"le_{k}"] == first(tuned, lambda r: r <= k)
    for name, f in (("p25", .25), ("p50", .5), ("p75", .75)):
        L = round(n * f)
        kb = base["kl_to_final_bits"][L]
        kt = tuned["kl_to_final_bits"][L - 1] if L >= 1 else None
        assert m["kl_bits_at_percentiles"]["baseline"][name] == pytest.approx(kb)
        if kt is not None:
            assert m["kl_bits_at_percentiles"]["delta"][name] == pytest.approx(kb - kt)
            a = tl["attribution"]["percentiles"][name]
            assert a["ΔKL_tuned"] == pytest.approx(kb - kt)
            assert a["ΔKL_rot"] == pytest.approx(a["ΔKL_tuned"] - a["ΔKL_temp"])


def test_identity_lens_reproduces_norm_lens(setup):
    from jaxlens.probe.pipeline import run_probe

    model = setup["model"]
    n = model.spec.n_layers
    ident = _random_lens(n, model.spec.d_model, zero=True)
    res = run_probe(model, out_dir=None, tuned=ident)
    for norm_p, tuned_p in zip(res.passes, res.tuned.passes):
        for col in ("kl_to_final_bits", "entropy_bits", "p_top1", "p_answer", "cos_to_final"):
            a, b = norm_p.pure[col][1:], tuned_p.pure[col]
            if a[0] is None:
                continue
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7, err_msg=col)
        assert tuned_p.pure["answer_rank"] == norm_p.pure["answer_rank"][1:]
    for r in res.sidecars["pure-next-token-tuned-variants"]:
        for k in ("tuned", "rot_only", "temp_only"):
            assert r[f"kl_bits_{k}"] == pytest.approx(r["kl_bits_baseline"], rel=1e-6, abs=1e-7), k
    audit = res.json["tuned_lens"]["audit_summary"]
    assert audit["preferred_semantics_lens_hint"] == "norm"
    # no tuned gain: whatever the norm temperature did is booked as (negative) rotation, by definition
    for a in res.json["tuned_lens"]["attribution"]["percentiles"].values():
        assert a["ΔKL_tuned"] == pytest.approx(0.0, abs=1e-5)
        assert a["ΔKL_rot"] == pytest.approx(-a["ΔKL_temp"], abs=1e-5)


def test_reference_quirks_q2_q9(setup):
    from jaxlens.probe.metrics import ReferenceQuirks
    from jaxlens.probe.pipeline import run_probe

    model, lens = setup["model"], setup["lens"]
    n = model.spec.n_layers
    res = run_probe(model, out_dir=None, tuned=lens, quirks=ReferenceQuirks.reference())
    # Q2: the audit describes the last pos pass of the primary variant
    variant = res.passes[0].inp.spec.variant
    last_b = max(b for b, r in enumerate(res.passes) if r.inp.spec.prompt_id == "pos" and r.inp.spec.variant == variant)
    assert last_b != 0
    rows = res.sidecars["pure-next-token-tuned-variants"]
    np.testing.assert_allclose([r["kl_bits_tuned"] for r in rows], res.tuned.passes[last_b].pure["kl_to_final_bits"])
    # Q9: m=4 now decodes layer n-3 = 0 (which exists), m=8 still nothing
    sk = res.json["diagnostics"]["skip_layers_sanity"]
    assert sk["m=4"] is not None and sk["m=8"] is None
    assert not {"Q2", "Q9", "N3", "N4"} & set(res.json["provenance"]["fixed_reference_bugs"])
    assert n == 3


# ---------------------------------------------------------------------------------------------------
# CLI modes


def test_cli_modes(setup, capsys, tmp_path, monkeypatch):
    from jaxlens.cli import main

    path = setup["path"]
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bad"
    assert main(["probe", "--model", path, "--out", str(out), "--tuned", str(tmp_path / "nope"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such lens directory" in err[0]
    assert not out.exists()
    assert main(["probe", "--model", path, "--out", str(out), "--tuned", "require", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no tuned lens" in err[0] and not out.exists()
    # a lens for another model (one layer more): one line, no files
    from jaxlens.lens.tuned import save_lens

    m = setup["model"]
    wrong = save_lens(_random_lens(m.spec.n_layers + 1, m.spec.d_model), str(tmp_path / "wrong"))
    assert main(["probe", "--model", path, "--out", str(out), "--tuned", wrong, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "layers" in err[0] and not out.exists(), err
    # auto finds tuned_lenses/<name>/ in the working directory
    import shutil

    shutil.copytree(setup["lens_dir"], tmp_path / "tuned_lenses" / os.path.basename(path))
    good = tmp_path / "good"
    assert main(["probe", "--model", path, "--out", str(good), "--quiet"]) == 0
    doc = json.loads((good / f"output-{os.path.basename(path)}.json").read_text(encoding="utf-8"))
    assert doc["diagnostics"]["tuned_lens"]["mode"] == "auto" and doc["tuned_lens"]["status"] == "loaded"
    off = tmp_path / "off"
    assert main(["probe", "--model", path, "--out", str(off), "--tuned", "off", "--quiet"]) == 0
    doc = json.loads((off / f"output-{os.path.basename(path)}.json").read_text(encoding="utf-8"))
    assert doc["tuned_lens"] == {"status": "disabled", "mode": "off", "path": None}
    assert not list(off.glob("*tuned*"))


# ---------------------------------------------------------------------------------------------------
# pure functions, by hand


def test_attribution_and_n3_by_hand():
    from jaxlens.probe.tuned import attribution

    n = 8                                                   # depth layers 2, 4, 6
    base = {"layer": list(range(n + 1)), "kl_to_final_bits": [9, 8, 7, 6, 5, 4, 3, 2, 0]}
    tuned = {"layer": list(range(1, n + 1)), "kl_to_final_bits": [7, 5.5, 5, 4.9, 3, 2.5, 1, 0]}
    temp = {2: 6.9, 4: 4.95, 6: 2.0}
    a = attribution(base, tuned, temp, n, first_rank_le_5_baseline=4, first_rank_le_5_tuned=4)
    p50 = a["percentiles"]["p50"]                           # layer 4: 5 - 4.9 = 0.1; 5 - 4.95 = 0.05
    assert p50["ΔKL_tuned"] == pytest.approx(0.1) and p50["ΔKL_temp"] == pytest.approx(0.05)
    assert p50["ΔKL_rot"] == pytest.approx(0.05)
    assert a["prefer_tuned"] is False                       # rot 0.05 < 0.2 and no rank gain (fixed N3)
    ref = attribution(base, tuned, temp, n, first_rank_le_5_baseline=4, first_rank_le_5_tuned=4, strict_earlier=False)
    assert ref["prefer_tuned"] is True                      # reference: gain 0 >= round(0.4) = 0
    assert attribution(base, tuned, temp, n, first_rank_le_5_baseline=6,
                       first_rank_le_5_tuned=4)["prefer_tuned"] is True      # 2 layers earlier


def test_audit_summary_by_hand():
    from jaxlens.probe.tuned import audit_summary, variant_rows

    kl = {"baseline": [4.0, 3.0, 2.0], "tuned": [3.0, 2.0, 1.5], "rot_only": [3.9, 2.95, 1.9],
          "temp_only": [3.1, 2.1, 1.6]}
    rows = variant_rows([1, 2, 3], kl, {"baseline": [5, 3, 1], "tuned": [4, 2, 1], "rot_only": [5, 3, 1],
                                        "temp_only": [4, 3, 1]}, {"baseline": [1, 1, 1], "tuned": [2, 2, 2]})
    assert [r["delta_kl_bits_tuned"] for r in rows] == pytest.approx([1.0, 1.0, 0.5])
    assert [r["rank_shift_temp_only"] for r in rows] == [1, 0, 0]
    positions = [{"pos_frac": 0.2, "delta_kl_bits_tuned": 2.0}, {"pos_frac": 0.92, "delta_kl_bits_tuned": 1.0},
                 {"pos_frac": 0.98, "delta_kl_bits_tuned": 0.5}, {"pos_frac": 1.0, "delta_kl_bits_tuned": 0.7}]
    s = audit_summary(rows, positions, {"kl_bits_tuned_final": 0.0})
    rvt = s["rotation_vs_temperature"]
    assert rvt["delta_kl_rot_p50"] == pytest.approx(0.1)    # sorted [0.05, 0.1, 0.1]
    assert rvt["delta_kl_temp_p50"] == pytest.approx(0.9)   # sorted [0.4, 0.9, 0.9]
    assert rvt["delta_kl_tuned_p50"] == pytest.approx(1.0)
    assert s["positional"]["pos_in_dist_le_0.92"] == pytest.approx(1.5)
    assert s["positional"]["pos_ood_ge_0.96"] == pytest.approx(0.6)
    assert s["positional"]["pos_ood_gap"] == pytest.approx(-0.9)
    # rot 0.1 < 0.2 and temp 0.9 >= 0.8 * 1.0: calibration only
    assert s["tuned_is_calibration_only"] is True
    assert s["preferred_semantics_lens_hint"] == "tuned_for_calibration_only"



def test_calibration_only_needs_a_tuned_gain():
    """N4: a lens that gains nothing (every delta 0, or -1e-9 of rounding noise) is not "calibration only";
    the reference's rule (quirk) says it is, since 0 >= 0.8 * (-1e-9)."""
    from jaxlens.probe.metrics import ReferenceQuirks
    from jaxlens.probe.tuned import audit_summary, variant_rows

    base = [4.0, 3.0, 2.0]
    noise = [x + 1e-9 for x in base]                         # tuned a hair worse: tuned_p50 = -1e-9
    kl = {"baseline": base, "tuned": noise, "rot_only": noise, "temp_only": base}
    ranks = {k: [5, 3, 1] for k in kl}
    rows = variant_rows([1, 2, 3], kl, ranks, {"baseline": [1, 1, 1], "tuned": [1, 1, 1]})
    positions = [{"pos_frac": 0.2, "delta_kl_bits_tuned": 0.0}, {"pos_frac": 1.0, "delta_kl_bits_tuned": 0.0}]
    fixed = audit_summary(rows, positions, {})
    assert fixed["rotation_vs_temperature"]["delta_kl_tuned_p50"] == pytest.approx(-1e-9, abs=1e-12)
    assert fixed["tuned_is_calibration_only"] is False
    assert fixed["preferred_semantics_lens_hint"] == "norm"
    quirk = audit_summary(rows, positions, {}, quirks=ReferenceQuirks(n4_calibration_only_without_gain=True))
    assert quirk["tuned_is_calibration_only"] is True
    assert quirk["preferred_semantics_lens_hint"] == "tuned_for_calibration_only"

def test_skip_sanity_and_head_mismatch_by_hand():
    from jaxlens.probe.tuned import head_mismatch, skip_sanity

    vals, reg = skip_sanity([1.0, 3.0], {2: [2.0, 2.0], 4: [1.0, 1.0], 8: None})
    assert vals["m=2"] == pytest.approx(0.0) and vals["m=4"] == pytest.approx(math.exp(-1) - 1)
    assert vals["m=8"] is None and reg is False
    _, reg = skip_sanity([1.0], {2: [1.5], 4: None, 8: None})
    assert reg is True                                      # e^0.5 - 1 = 0.65 > 0.2
    rng = np.random.default_rng(0)
    zf = rng.normal(0, 3, 500)
    h = head_mismatch(2.0 * zf, zf, 1.23)                   # lens logits twice too sharp: tau* = 2
    assert h["tau_star_modelcal"] == pytest.approx(2.0, abs=0.03)
    assert h["kl_bits_tuned_final_after_tau_star"] < 1e-3 and h["kl_bits_tuned_final"] == 1.23


def test_provenance_snapshot_reproduces_reference():
    """The reference's own provenance.json -> its published provenance_snapshot (Qwen3-14B skeleton)."""
    from jaxlens.probe.tuned import provenance_snapshot

    skel = json.loads((REF_DIR / "output-Qwen3-14B.skeleton.json").read_text(encoding="utf-8"))["tuned_lens"]
    prov = json.loads(json.dumps(skel["provenance"]))
    prov["translator"]["temperatures"] = [0.5, 0.7, 0.6, 1.0, 0.9]           # (the skeleton elides the list)
    snap = provenance_snapshot(prov, lens=None)
    want = dict(skel["provenance_snapshot"])
    assert list(snap) == list(want)
    for k in want:
        if k != "temperatures_stats":
            assert snap[k] == want[k], k
    assert snap["temperatures_stats"] == pytest.approx({"min": 0.5, "p25": 0.6, "p50": 0.7, "p75": 0.9, "max": 1.0})


def test_default_demo_probe_uses_bundled_lens(tmp_path, monkeypatch, capsys):
    """The README's main command: `jaxlens probe` on the demo finds the bundled tuned lens (auto) and the
    trained lens beats the norm lens at every intermediate layer of the primary pass."""
    import jaxlens
    from jaxlens.cli import main
    from jaxlens.models.loader import DEMO_TUNED_LENS_DIR

    monkeypatch.chdir(tmp_path)
    assert main(["probe", "--quiet"]) == 0
    out = tmp_path / "runs" / "latest"
    assert len(list(out.iterdir())) == 11
    doc = json.loads((out / "output-demo.json").read_text(encoding="utf-8"))
    assert doc["tuned_lens"]["status"] == "loaded"
    assert doc["tuned_lens"]["path"] == "jaxlens/demo/tuned_lens"        # a bundled lens: no machine path
    assert os.path.samefile(os.path.join(os.path.dirname(jaxlens.__file__), "demo", "tuned_lens"), DEMO_TUNED_LENS_DIR)
    assert doc["diagnostics"]["tuned_lens"]["mode"] == "auto"
    rows = list(csv.DictReader(open(out / "output-demo-pure-next-token.csv", newline="", encoding="utf-8")))
    trows = list(csv.DictReader(open(out / "output-demo-pure-next-token-tuned.csv", newline="", encoding="utf-8")))
    prim = lambda rs: {int(r["layer"]): float(r["kl_to_final_bits"]) for r in rs  # noqa: E731
                       if r["prompt_id"] == "pos" and r["prompt_variant"] == "orig" and r["fact_index"] == "0"}
    norm, tuned = prim(rows), prim(trows)
    assert sorted(tuned) == list(range(1, 9))
    for layer in range(1, 8):
        assert tuned[layer] < norm[layer], (layer, tuned[layer], norm[layer])
    assert "(tuned)" in capsys.readouterr().out
