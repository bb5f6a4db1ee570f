"""Prism: the fit (train_tuned.prism), the artifacts (jaxlens.lens.prism) and the probe's Prism outputs
(jaxlens.probe.prism), spec/probe.md §4.

The fit is recomputed independently in NumPy (float64) from the rows the recipe prescribes: the model's
residuals at the sampled layers, normalised with the HF checkpoint's own RMSNorm weights, the data stream
in order, Algorithm R with ``random.Random(316)`` written out here, a full SVD for the PCA basis and
``numpy.linalg.eigh`` for the unembedding basis. The Prism rows of the probe are recomputed in PyTorch from
the saved ``whiten.pt`` / ``Q_prism.pt`` and the transformers model's own hidden states, norms and head.
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest

import hf_factory as F
from reference_data import REF_DIR

N_ROWS, RESERVOIR, K, SEQ, BATCH = 2400, 700, 16, 32, 4


def _np_rms(x, w, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * np.asarray(w, np.float64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import jaxlens
    from jaxlens.probe.pipeline import run_probe
    from train_tuned.prism import fit_prism

    base = tmp_path_factory.mktemp("prism")
    path = str(base / "qwen3")
    tm = F.build_checkpoint("qwen3", path, seed=31)
    model = jaxlens.load_model(path)
    corpus = base / "corpus.txt"
    corpus.write_text(F.corpus_text().replace("\n", "\n\n"), encoding="utf-8")
    prism_dir = str(base / "prism")
    fit = fit_prism(model, prism_dir, data=str(corpus), k=K, tokens=N_ROWS, reservoir=RESERVOIR, seq_len=SEQ,
                    batch_seqs=BATCH, progress=False, log=lambda m: None, keep_stats=True)
    out = str(base / "out")
    res = run_probe(model, out_dir=out, prism=prism_dir)
    return dict(tm=tm, model=model, path=path, corpus=str(corpus), prism_dir=prism_dir, fit=fit, res=res, out=out,
                base=base)


def _norms(tm):
    layers, in_norms, final_norm, head = F._parts(tm)
    ws = [m.weight.detach().double().numpy() for m in in_norms] + [final_norm.weight.detach().double().numpy()]
    eps = float(tm.config.rms_norm_eps)
    return ws, eps


def _stream_rows(setup, layers):
    """Every fit row in stream order (sequence, position, depth), float64, from the jaxlens forward's raw
    residuals normalised in NumPy with the checkpoint's RMSNorm weights."""
    from train_tuned import data as data_mod

    model, tm = setup["model"], setup["tm"]
    src = data_mod.FileData(setup["corpus"], model.tokenizer, SEQ, join_eos=True, seed=316, shuffle=True)
    D = len(layers)
    n_seq = math.ceil(N_ROWS / (SEQ * D))
    ids = src.batch(0, n_seq)
    res = np.asarray(model.forward(ids).residuals, np.float64)                  # [n+1, B, T, d]
    ws, eps = _norms(tm)
    rows = np.stack([_np_rms(res[L], ws[L], eps) for L in layers], axis=2)      # [B, T, D, d]
    return rows.reshape(-1, rows.shape[-1])[:N_ROWS]


def _reservoir(n, cap, seed=316):
    rng = random.Random(seed)
    slots = []
    for i in range(n):
        if len(slots) < cap:
            slots.append(i)
        else:
            j = rng.randint(0, i)
            if j < cap:
                slots[j] = i
    return np.asarray(slots)


def _subspace_max_angle(A, B):
    qa, _ = np.linalg.qr(A)
    qb, _ = np.linalg.qr(B)
    s = np.linalg.svd(qa.T @ qb, compute_uv=False)
    return float(np.arccos(np.clip(s.min(), -1.0, 1.0)))


# ---------------------------------------------------------------------------------------------------
# the fit against NumPy


def test_fit_matches_numpy(setup):
    from jaxlens.lens.prism import load_prism

    prism = load_prism(setup["prism_dir"], setup["model"])
    prov = prism.provenance
    n = setup["model"].spec.n_layers
    layers = prov["jaxlens"]["jaxlens_layers"]
    assert layers == [0, 1, 2] and prov["layers"] == ["embed", 0, 1] and n == 3        # depths of a 3-block model
    assert prov["tokens_seen"] == N_ROWS and prov["reservoir"] == RESERVOIR and prov["k"] == K
    rows = _stream_rows(setup, layers)
    mean = rows.mean(0)
    var = np.maximum(rows.var(0), 1e-8)
    sd = np.sqrt(var)
    assert np.all(np.abs(prism.mean - mean) <= 1e-6 * (np.abs(mean) + sd))
    np.testing.assert_allclose(prism.var, var, rtol=1e-6)
    assert prism.eps == 1e-8
    # the reservoir and the whitened PCA basis: the same subspace as a full SVD (principal angles ~ 0)
    X = rows[_reservoir(N_ROWS, RESERVOIR)]
    Xw = (X - mean) / np.sqrt(var + 1e-8)
    Xc = Xw - Xw.mean(0)
    _, s, Vt = np.linalg.svd(Xc, full_matrices=False)
    E = prism.extras["basis_pca"].astype(np.float64)
    assert E.shape == (64, K)
    assert _subspace_max_angle(E, Vt[:K].T) < 1e-3
    np.testing.assert_allclose(np.abs(np.sum(E * Vt[:K].T, 0)), 1.0, atol=1e-4)    # each direction, up to sign
    np.testing.assert_allclose(prism.extras["pca_singular_values"], s[:K], rtol=1e-4)
    # the unembedding basis: NumPy's eigh of W_U W_U^T, up to sign
    Wt = setup["tm"].get_output_embeddings().weight.detach().double().numpy()     # [V, d] (torch layout)
    w, Vv = np.linalg.eigh(Wt.T @ Wt)
    order = np.argsort(w)[::-1][:K]
    U = prism.extras["basis_unembed"].astype(np.float64)
    for j in range(K):
        assert min(np.abs(U[:, j] - Vv[:, order[j]]).max(), np.abs(U[:, j] + Vv[:, order[j]]).max()) < 1e-5
    np.testing.assert_allclose(prism.extras["unembed_eigenvalues"], w[order], rtol=1e-5)
    assert np.all(np.sum(U * E, 0) >= 0)                                           # the pairing sign convention
    # Procrustes (column convention Q_col e ~ u), saved transposed: the matrix the decoder right-multiplies
    Q = prism.Q.astype(np.float64)
    assert np.linalg.norm(Q.T @ Q - np.eye(64)) < 1e-5
    assert prov["orthogonality_error"] == pytest.approx(np.linalg.norm(Q.T @ Q - np.eye(64)), abs=1e-9)
    Uu, _, Vt2 = np.linalg.svd(U @ E.T)
    Q_svd = Uu @ Vt2                             # an optimal Q; k < d leaves the complements' map open
    np.testing.assert_allclose(E.T @ Q, E.T @ Q_svd.T, atol=1e-5)
    np.testing.assert_allclose(E.T @ Q, U.T, atol=1e-5)                           # e_i^T Q = u_i^T
    np.testing.assert_allclose(Q @ U, E, atol=1e-5)
    # jaxlens's completion: the polar factor of U E^T + (I - U U^T)(I - E E^T)
    P = (np.eye(64) - U @ U.T) @ (np.eye(64) - E @ E.T)
    Ua, _, Vta = np.linalg.svd(U @ E.T + P)
    np.testing.assert_allclose(Q, (Ua @ Vta).T, atol=1e-5)
    assert np.trace(Q.T @ (U @ E.T).T) == pytest.approx(K, abs=1e-4)              # Procrustes optimum tr = k
    assert prov["jaxlens"]["recipe"] == "jaxlens" and prov["jaxlens"]["q6_fixed"] is True


def test_recipe_pieces_by_hand():
    from train_tuned.prism import budgets, parameter_count, procrustes, qr_fallback, reference_layer_names, \
        reservoir_owners, sample_layers

    assert sample_layers(40) == [0, 10, 20, 30] and reference_layer_names([0, 10, 20, 30]) == ["embed", 9, 19, 29]
    assert sample_layers(8) == [0, 2, 4, 6] and sample_layers(2) == [0, 1]
    assert budgets(14e9) == (100_000, 20_000) and budgets(27e9) == (130_000, 25_000) and budgets(72e9) == (160_000,
                                                                                                        30_000)

    class Named:
        name = "Qwen3-14B"
    assert parameter_count(Named()) == 14e9
    assert list(reservoir_owners(5000, 300)) == list(_reservoir(5000, 300))
    assert list(reservoir_owners(200, 300)) == list(range(200))
    U = np.eye(4)[:, :2]
    Q, err, used = procrustes(U, U)
    assert not used and err < 1e-12 and np.allclose(Q[:, :2], U)
    # the QR fallback (an SVD's U V^T is orthogonal to rounding, so feed it a matrix that is not)
    rng = np.random.default_rng(0)
    A = np.linalg.qr(rng.normal(size=(6, 6)))[0] * 1.01
    q, used = qr_fallback(A)
    assert used and np.linalg.norm(q.T @ q - np.eye(6)) < 1e-12 and np.allclose(q, np.linalg.qr(A)[0])
    assert qr_fallback(q)[1] is False


def test_fit_is_data_parallel(setup):
    """The same fit with the batch over a data x fsdp mesh of the 8 fake CPU devices of the test session (the
    batch of 4 sequences rounds up to 8, one per device: the stream order does not depend on it)."""
    import jax
    from train_tuned.prism import fit_prism

    if jax.device_count() != 8:
        pytest.skip("needs the test session's 8 devices")
    fit = fit_prism(setup["path"], None, data=setup["corpus"], k=K, tokens=N_ROWS, reservoir=RESERVOIR,
                    seq_len=SEQ, batch_seqs=BATCH, mesh="data=4,fsdp=2", progress=False, log=lambda m: None)
    one = setup["fit"].prism
    np.testing.assert_allclose(fit.prism.mean, one.mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(fit.prism.var, one.var, rtol=1e-6)
    np.testing.assert_allclose(fit.prism.Q, one.Q, atol=1e-4)
    assert fit.provenance["jaxlens"]["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1}


def _same_stats(one: dict, other: dict) -> dict:
    """The accumulated statistics of two fits agree to 1e-5 on their own scale (means in standard deviations,
    M2 elementwise, the reservoir rows and the Grams against the array's largest entry); returns the measured
    differences."""
    assert other["count"] == one["count"] == N_ROWS
    assert np.array_equal(other["reservoir_index"], one["reservoir_index"])        # the same rows, slot for slot
    f = {k: np.asarray(v, np.float64) for k, v in one.items()}
    g = {k: np.asarray(v, np.float64) for k, v in other.items()}

    def scaled(k):
        return float(np.abs(f[k] - g[k]).max() / np.abs(f[k]).max())

    d = {"mean": float(np.max(np.abs(f["mean"] - g["mean"]) / np.sqrt(f["m2"] / N_ROWS))),
         "m2": float(np.max(np.abs(f["m2"] - g["m2"]) / f["m2"])),
         "reservoir_rows": scaled("reservoir_rows"), "gram_reservoir": scaled("gram_reservoir"),
         "gram_unembed": scaled("gram_unembed")}
    assert max(d.values()) <= 1e-5, d
    return d


def test_fit_on_a_sharded_mesh_keeps_every_statistic(setup):
    """data=2,fsdp=2,tensor=2 over the session's 8 fake devices (model sharded over fsdp / tensor, batch over
    data x fsdp): the counts, means, M2, the reservoir's rows and both Grams equal the one-device fit's."""
    import jax
    from train_tuned.prism import fit_prism

    if jax.device_count() != 8:
        pytest.skip("needs the test session's 8 devices")
    fit = fit_prism(setup["path"], None, data=setup["corpus"], k=K, tokens=N_ROWS, reservoir=RESERVOIR,
                    seq_len=SEQ, batch_seqs=BATCH, mesh="data=2,fsdp=2,tensor=2", progress=False,
                    log=lambda m: None, keep_stats=True)
    d = _same_stats(setup["fit"].stats, fit.stats)
    one = setup["fit"].prism
    np.testing.assert_allclose(fit.prism.var, one.var, rtol=1e-5)
    np.testing.assert_allclose(fit.prism.extras["pca_singular_values"], one.extras["pca_singular_values"], rtol=1e-5)
    np.testing.assert_allclose(fit.prism.Q, one.Q, atol=1e-4)
    assert fit.provenance["jaxlens"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    print("max relative differences, mesh vs one device:", d)


_TWO_PROCESS = """
import json, sys
import numpy as np
import jax
jax.config.update("jax_default_matmul_precision", "highest")
from jaxlens import distributed as DI
port, pid, path, corpus, out, stats = sys.argv[1:7]
DI.initialize(f"127.0.0.1:{port}", 2, int(pid))
from train_tuned.prism import fit_prism
fit = fit_prism(path, out, data=corpus, k=%d, tokens=%d, reservoir=%d, seq_len=%d, batch_seqs=%d,
                mesh="data=2,fsdp=2,tensor=2", progress=False, log=lambda m: None, keep_stats=True)
np.savez(stats, **{k: np.asarray(v) for k, v in fit.stats.items()}, Q=fit.prism.Q, var=fit.prism.var)
print(json.dumps({"processes": fit.provenance["jaxlens"]["processes"], "out": fit.out}))
""" % (K, N_ROWS, RESERVOIR, SEQ, BATCH)


def test_two_processes_fit_the_one_process_prism(setup, tmp_path):
    """jax.distributed on 127.0.0.1: two processes x 4 fake CPU devices (gloo), mesh data=2,fsdp=2,tensor=2 (the
    data axis across the processes, each feeding its half of every batch). Both processes end with the same
    statistics, equal to the one-process fit's; only process 0 writes its output directory."""
    import multiproc as MP

    port = MP.free_port()
    outs = [tmp_path / f"prism{i}" for i in range(2)]
    npz = [tmp_path / f"stats{i}.npz" for i in range(2)]
    res = MP.finish(MP.launch(lambda i: ["-c", _TWO_PROCESS, str(port), str(i), setup["path"], setup["corpus"],
                                         str(outs[i]), str(npz[i])]), timeout=240)
    assert json.loads(res[0][0].strip().splitlines()[-1])["processes"] == 2
    assert (outs[0] / "whiten.pt").is_file() and not outs[1].exists()             # process 0 writes, alone
    got = [dict(np.load(f)) for f in npz]
    for k in got[0]:
        np.testing.assert_array_equal(got[0][k], got[1][k], err_msg=k)            # every process: the same fit
    two = dict(got[0], count=int(got[0]["count"]))
    d = _same_stats(setup["fit"].stats, two)
    np.testing.assert_allclose(two["var"], setup["fit"].prism.var, rtol=1e-5)
    np.testing.assert_allclose(two["Q"], setup["fit"].prism.Q, atol=1e-4)
    from jaxlens.lens.prism import load_prism

    saved = load_prism(str(outs[0]), setup["model"])
    np.testing.assert_array_equal(saved.Q, two["Q"])
    print("max relative differences, two processes vs one:", d)


def test_fit_prism_cli_mesh_errors(tmp_path, capsys):
    from jaxlens.cli import main

    for mesh, words in (("data=x", "not an integer"), ("bogus=2", "expected data=N"),
                        ("data=3", "covers 3 devices")):
        assert main(["fit-prism", "--out", str(tmp_path / "p"), "--mesh", mesh, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("jaxlens: error: --mesh") and words in err and "Traceback" not in err, err
    assert not (tmp_path / "p").exists()


def test_reference_quirks_fit(setup, tmp_path):
    """--reference-quirks: raw-residual statistics of the 10 prompts' last positions, cycled to the budget, and
    Q in the reference's (column-convention) orientation."""
    from jaxlens.probe.gold import model_input_ids
    from train_tuned.prism import DEFAULT_PROMPTS, fit_prism

    model = setup["model"]
    fit = fit_prism(model, str(tmp_path / "ref"), reference_quirks=True, progress=False, log=lambda m: None)
    p = fit.prism
    prov = p.provenance
    layers = prov["jaxlens"]["jaxlens_layers"]
    N = math.ceil(100_000 / len(layers)) * len(layers)                       # whole prompts (3 depths here)
    assert prov["tokens_seen"] == N and prov["reservoir"] == 20_000 and prov["k"] == 64
    assert prov["jaxlens"]["recipe"] == "reference" and prov["jaxlens"]["q6_fixed"] is False
    seqs = [model_input_ids(model.tokenizer, text) for text in DEFAULT_PROMPTS]
    rows = []
    for ids in seqs:                               # torch: one forward per prompt, as the reference
        r = F.torch_reference(setup["tm"], np.asarray(ids)[None])["residuals"][:, 0, -1]        # raw, last pos
        rows.extend(r[L].astype(np.float64) for L in layers)
    ids, mask = F.right_pad(seqs)
    rj = np.asarray(model.forward(ids, mask).residuals, np.float64)              # jaxlens forward, batched
    rows_jx = [rj[L, i, len(s) - 1] for i, s in enumerate(seqs) for L in layers]
    for src, tol in ((np.asarray(rows_jx), 1e-6), (np.asarray(rows), 2e-5)):
        stream = np.resize(src, (N, src.shape[1]))                                # the 30 rows cycled
        mu, var = stream.mean(0), np.maximum(stream.var(0), 1e-8)
        assert np.all(np.abs(p.mean - mu) <= tol * (np.abs(mu) + np.sqrt(var)))
        np.testing.assert_allclose(p.var, var, rtol=5 * tol)
    E = p.extras["basis_pca"].astype(np.float64)
    U = p.extras["basis_unembed"].astype(np.float64)
    Uu, _, Vt = np.linalg.svd(U @ E.T)
    np.testing.assert_allclose(p.Q, Uu @ Vt, atol=1e-5)                              # not transposed (Q6)
    # the probe records the decoded Prism's recipe: Q6 is not fixed with this artifact
    from jaxlens.lens.prism import load_prism
    from jaxlens.probe import prism as PP
    from jaxlens.probe.metrics import ReferenceQuirks
    from jaxlens.probe.pipeline import _fixed_bugs

    src = PP.resolve(model, str(tmp_path / "ref"))
    assert src.usable and PP.reference_fit(src) is True
    assert PP.reference_fit(PP.resolve(model, setup["prism_dir"])) is False
    assert "Q6" in _fixed_bugs(ReferenceQuirks()) and "Q6" not in _fixed_bugs(ReferenceQuirks(q6_prism_reference_fit=True))
    assert load_prism(str(tmp_path / "ref"), format="reference").recipe == "reference"


# ---------------------------------------------------------------------------------------------------
# the probe's Prism rows against torch


def _torch_prism_logits(tm, ids, prism_dir):
    """float64 Prism logits [n+1, T, V] and final logits [T, V] from the saved .pt artifacts and the HF model."""
    import torch

    layers, in_norms, final_norm, head = F._parts(tm)
    n = len(layers)
    w = torch.load(os.path.join(prism_dir, "whiten.pt"), weights_only=True)
    Q = torch.load(os.path.join(prism_dir, "Q_prism.pt"), weights_only=True).double()
    ref = F.torch_reference(tm, np.asarray(ids)[None])
    res = torch.as_tensor(ref["residuals"][:, 0])
    out = []
    with torch.no_grad():
        for layer in range(n + 1):
            x = (in_norms[layer] if layer < n else final_norm)(res[layer]).double()
            xw = (x - w["mean"].double()) / torch.sqrt(w["var"].double() + w["eps"])
            out.append((xw @ Q @ head.weight.double().T).numpy())
    return np.stack(out), ref["logits"][0].astype(np.float64)


def _pass_index(res, prompt_id):
    return next(b for b, r in enumerate(res.passes) if r.inp.spec.prompt_id == prompt_id)


def test_prism_pure_rows_match_torch(setup):
    res, tm = setup["res"], setup["tm"]
    n = setup["model"].spec.n_layers
    pr = res.prism
    assert pr is not None and pr.source.usable
    for b in (0, _pass_index(res, "ctl")):
        inp = res.passes[b].inp
        cols = pr.passes[b].pure
        assert cols["layer"] == list(range(n + 1))
        z, zf = _torch_prism_logits(tm, inp.input_ids, setup["prism_dir"])
        lp = F.log_softmax64(z[:, -1])
        p = np.exp(lp)
        lpf = F.log_softmax64(zf[-1])
        kl = (p * (lp - lpf)).sum(-1) / math.log(2)
        np.testing.assert_allclose(cols["kl_to_final_bits"], kl, rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(cols["entropy_bits"], -(p * lp).sum(-1) / math.log(2), rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(cols["p_top1"], p.max(-1), rtol=1e-5, atol=1e-8)
        a = inp.gold.first_id
        assert list(cols["answer_rank"]) == [int(1 + (z[i, -1] > z[i, -1, a]).sum()) for i in range(n + 1)]
        np.testing.assert_allclose(cols["p_answer"], p[:, a], rtol=1e-5, atol=1e-9)
        cos = (z[:, -1] @ zf[-1]) / (np.linalg.norm(z[:, -1], axis=-1) * np.linalg.norm(zf[-1]))
        np.testing.assert_allclose(cols["cos_to_final"], cos, rtol=1e-5, atol=1e-6)
        if inp.spec.is_control:
            pa, pb = p[:, inp.gold.first_id], p[:, res.passes[0].inp.gold.first_id]
            np.testing.assert_allclose(cols["control_margin"], pa - pb, rtol=1e-5, atol=1e-9)
        # blank where the reference leaves Prism blank; no strict sweep
        from jaxlens.probe.prism import BLANK_COLUMNS

        for name in BLANK_COLUMNS:
            assert all(v is None for v in cols.get(name, [None])), name
        assert "copy_strict@0.7" not in cols and "copy_strict@0.95" in cols


def test_prism_records_match_torch(setup):
    res, tm = setup["res"], setup["tm"]
    inp = res.passes[0].inp
    rows = [r for r in res.sidecars["records-prism"] if (r["prompt_id"], r["prompt_variant"], r["fact_index"]) ==
            ("pos", inp.spec.variant, 0)]
    n = setup["model"].spec.n_layers
    T = len(inp.input_ids)
    assert len(rows) == (n + 1) * T
    z, _ = _torch_prism_logits(tm, inp.input_ids, setup["prism_dir"])
    lp = F.log_softmax64(z)
    p = np.exp(lp)
    ent = -(p * lp).sum(-1) / math.log(2)
    for r in rows:
        assert r["entropy_bits"] == pytest.approx(ent[r["layer"], r["pos"]], rel=1e-5, abs=2e-6)
        assert r["prob1"] == pytest.approx(p[r["layer"], r["pos"]].max(), rel=1e-5, abs=1e-8)


def test_files_headers_and_json(setup):
    res, out = setup["res"], Path(setup["out"])
    headers = json.loads((REF_DIR / "csv-headers.json").read_text())
    n = setup["model"].spec.n_layers
    want = {"records-prism": sum(len(r.inp.input_ids) for r in res.passes) * (n + 1),
            "pure-next-token-prism": len(res.passes) * (n + 1)}
    for kind, nrows in want.items():
        with open(out / f"output-{res.model_name}-{kind}.csv", newline="", encoding="utf-8") as fh:
            lines = list(csv.reader(fh))
        assert lines[0] == headers[f"-{kind}.csv"], kind
        assert len(lines) - 1 == nrows, kind
    with open(out / f"output-{res.model_name}-pure-next-token-prism.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert all(r["copy_strict@0.7"] == "" and r["cos_to_answer"] == "" and r["echo_mass_prompt"] == "" for r in rows)
    assert all(r["kl_to_final_bits"] != "" and r["copy_strict@0.95"] in ("True", "False") for r in rows)
    doc = json.loads((out / f"output-{res.model_name}.json").read_text(encoding="utf-8"))
    skel = json.loads((REF_DIR / "output-Qwen3-14B.skeleton.json").read_text(encoding="utf-8"))
    ps, ref = doc["diagnostics"]["prism_summary"], skel["diagnostics"]["prism_summary"]
    assert list(ps)[:len(ref)] == list(ref) and set(ps) - set(ref) == {"verdict", "provenance"}
    for key in ref["metrics"]:
        assert list(ps["metrics"][key]) == list(ref["metrics"][key]), key
    assert ps["mode"] == "on" and ps["present"] and ps["compatible"] and ps["error"] is None
    assert ps["artifact_path"] == os.path.abspath(setup["prism_dir"]) and ps["k"] == K
    assert ps["layers"] == ["embed", 0, 1]
    assert "Q6" in doc["provenance"]["fixed_reference_bugs"]


def test_unified_metrics_and_verdict_by_hand(setup):
    from jaxlens.probe.prism import verdict

    res = setup["res"]
    n = setup["model"].spec.n_layers
    base, pri = res.passes[0].pure, res.prism.passes[0].pure
    m = res.prism.summary_block["metrics"]

    def first(cols, ok, col="answer_rank"):
        return next((L for L, v in zip(cols["layer"], cols[col]) if ok(v)), None)

    for k in (1, 5, 10):
        assert m["rank_milestones"]["baseline"][f"le_{k}"] == first(base, lambda r: r <= k)
        assert m["rank_milestones"]["prism"][f"le_{k}"] == first(pri, lambda r: r <= k)
    for name, f in (("p25", .25), ("p50", .5), ("p75", .75)):
        L = round(n * f)
        assert m["kl_bits_at_percentiles"]["delta"][name] == pytest.approx(
            base["kl_to_final_bits"][L] - pri["kl_to_final_bits"][L])
    assert m["first_kl_le_1.0"]["prism"] == first(pri, lambda v: v <= 1.0, "kl_to_final_bits")
    v = res.prism.summary_block["verdict"]
    med = float(np.median(list(m["kl_bits_at_percentiles"]["delta"].values())))
    assert v["kl_gain_bits_median"] == pytest.approx(med)

    def mk(deltas, b=None, p=None):
        return {"kl_bits_at_percentiles": {"delta": dict(zip(("p25", "p50", "p75"), deltas))},
                "rank_milestones": {"baseline": {"le_1": b}, "prism": {"le_1": p}}}

    # the reference's Qwen3-14B numbers: regressive
    assert verdict(mk([-0.2574, -0.2498, -0.7086], 36, None))["label"] == "regressive"
    assert verdict(mk([0.5, 0.3, 0.1]))["label"] == "helpful"
    assert verdict(mk([0.05, -0.1, 0.0], 10, 10))["label"] == "neutral"
    assert verdict(mk([0.05, -0.1, 0.0], 10, 7))["label"] == "helpful"
    assert verdict(mk([0.05, -0.1, 0.0], 10, None))["label"] == "regressive"
    assert verdict(mk([None, None, None]))["label"] is None
    # a near-uniform Prism (entropy within 1 bit of log2 V) is never helpful, whatever the KL says
    v = verdict(mk([1.2, 1.2, 1.2]), entropy_bits=[14.6, 14.6, 14.7], vocab_size=49152)
    assert v["label"] == "neutral" and v["prism_near_uniform"] is True
    assert verdict(mk([1.2, 1.2, 1.2]), entropy_bits=[13.0, 14.0, 14.5], vocab_size=49152)["label"] == "helpful"


def test_identity_prism_is_the_norm_lens(setup):
    import jaxlens
    from jaxlens.lens.prism import PrismLens

    model = setup["model"]
    d = model.spec.d_model
    ident = PrismLens(np.zeros(d), np.full(d, 1.0 - 1e-8), np.eye(d), 1e-8)
    ids, mask = F.right_pad(F.encode_prompts(model.tokenizer))
    fw = model.forward(ids, mask)
    a = jaxlens.lens_stats(model, fw, "norm", top_k=5).numpy()
    b = jaxlens.lens_stats(model, fw, ident, top_k=5).numpy()
    np.testing.assert_allclose(b.kl_to_final_bits, a.kl_to_final_bits, rtol=1e-5, atol=2e-6)
    np.testing.assert_array_equal(b.top_ids, a.top_ids)
    # the folded affine form (A = diag(1/s) Q, c = -(mean/s) Q) decodes the same as the Prism
    p = setup["fit"].prism
    c = jaxlens.lens_stats(model, fw, p, top_k=5).numpy()
    e = jaxlens.lens_stats(model, fw, p.as_affine(model.spec.n_layers), top_k=5).numpy()
    np.testing.assert_allclose(e.kl_to_final_bits, c.kl_to_final_bits, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# artifacts


def test_reference_format_written_by_torch_loads_and_decodes(setup, tmp_path):
    import torch

    import jaxlens
    from jaxlens.lens.prism import PrismLens, load_prism, save_prism

    model, tm = setup["model"], setup["tm"]
    d = model.spec.d_model
    rng = np.random.default_rng(3)
    Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    mean, var = rng.normal(0, 0.3, d), rng.uniform(0.2, 2.0, d)
    ref = tmp_path / "ref"
    ref.mkdir()
    torch.save({"mean": torch.tensor(mean, dtype=torch.float32), "var": torch.tensor(var, dtype=torch.float32),
                "eps": 1e-8}, ref / "whiten.pt")
    torch.save(torch.tensor(Q, dtype=torch.float32), ref / "Q_prism.pt")
    (ref / "provenance.json").write_text(json.dumps({
        "method": "procrustes", "k": 512, "layers": ["embed", 9, 19, 29], "tokens_seen": 100000, "reservoir": 20000,
        "seed": 316, "date": "2025-10-01", "device": "cpu", "dtype": "torch.float32", "d_model": d, "d_vocab": 1000,
        "n_layers": 3, "orthogonality_error": 1e-6, "notes": "written by torch"}))
    p_ref = load_prism(str(ref), model)
    assert p_ref.format == "reference" and p_ref.k == 512 and p_ref.recipe is None
    save_prism(PrismLens(mean, var, Q, 1e-8, provenance=p_ref.provenance), str(tmp_path / "jx"), format="jaxlens")
    p_jx = load_prism(str(tmp_path / "jx"), model)
    assert p_jx.format == "jaxlens"
    ids, mask = F.right_pad(F.encode_prompts(model.tokenizer))
    fw = model.forward(ids, mask)
    a = jaxlens.lens_stats(model, fw, p_ref, top_k=5).numpy()
    b = jaxlens.lens_stats(model, fw, p_jx, top_k=5).numpy()
    np.testing.assert_array_equal(a.kl_to_final_bits, b.kl_to_final_bits)
    np.testing.assert_array_equal(a.top_ids, b.top_ids)
    # and both equal the formula in torch on the transformers model (first prompt, all layers and positions)
    layers, in_norms, final_norm, head = F._parts(tm)
    r = F.torch_reference(tm, ids[:1, :int(mask[0].sum())])
    res = torch.as_tensor(r["residuals"][:, 0])
    with torch.no_grad():
        z = torch.stack([((in_norms[L] if L < 3 else final_norm)(res[L]).double() - torch.tensor(mean))
                         / torch.sqrt(torch.tensor(var) + 1e-8) @ torch.tensor(Q) @ head.weight.double().T
                         for L in range(4)]).numpy()
    np.testing.assert_allclose(a.kl_to_final_bits[:, 0, :z.shape[1]],
                               F.kl_bits(z, r["logits"][0].astype(np.float64)[None]), rtol=1e-5, atol=2e-6)
    # fit-prism's own two formats hold the same arrays
    both_ref = load_prism(setup["prism_dir"], format="reference")
    both_jx = load_prism(setup["prism_dir"], format="jaxlens")
    for k in ("mean", "var", "Q"):
        np.testing.assert_array_equal(getattr(both_ref, k), getattr(both_jx, k))
    assert both_ref.provenance == both_jx.provenance


def test_bad_artifacts(setup, tmp_path):
    import torch

    from jaxlens.errors import JaxlensError
    from jaxlens.lens.prism import PrismLens, load_prism, save_prism

    model = setup["model"]
    with pytest.raises(JaxlensError, match="does not exist"):
        load_prism(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(JaxlensError, match="holds no Prism"):
        load_prism(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"mean": torch.zeros(64), "var": torch.ones(64), "eps": 1e-8}, bad / "whiten.pt")
    torch.save(torch.eye(64)[:, :63], bad / "Q_prism.pt")
    with pytest.raises(JaxlensError, match=r"do not fit together .*d x d"):
        load_prism(str(bad))
    (bad / "Q_prism.pt").write_bytes(b"not a torch file")
    with pytest.raises(JaxlensError, match="could not be read by torch.load"):
        load_prism(str(bad))
    narrow = str(tmp_path / "narrow")
    save_prism(PrismLens(np.zeros(32), np.ones(32), np.eye(32)), narrow)
    with pytest.raises(JaxlensError) as e:
        load_prism(narrow, model)
    msg = str(e.value)
    assert "32 entries" in msg and "d_model is 64" in msg and "\n" not in msg


def test_cli(setup, tmp_path, capsys, monkeypatch):
    from jaxlens.cli import main
    from jaxlens.lens.prism import PrismLens, save_prism

    path = setup["path"]
    out = tmp_path / "out"
    # bad --prism values: one line, exit 2, no files
    assert main(["probe", "--model", path, "--out", str(out), "--prism", str(tmp_path / "nope"), "--quiet"]) == 2
    narrow = str(tmp_path / "narrow")
    save_prism(PrismLens(np.zeros(32), np.ones(32), np.eye(32)), narrow)
    assert main(["probe", "--model", path, "--out", str(out), "--prism", narrow, "--quiet"]) == 2
    monkeypatch.chdir(tmp_path)
    assert main(["probe", "--model", path, "--out", str(out), "--prism", "on", "--quiet"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("jaxlens: ")]
    assert len(err) == 3 and all(line.startswith("jaxlens: error: ") for line in err)
    assert "no such Prism directory" in err[0] and "does not fit" in err[1] and "no Prism for" in err[2]
    assert not out.exists()
    # fit-prism: writes both formats; refuses to overwrite without --force; the fixed recipe needs --data
    fp = str(tmp_path / "prisms" / os.path.basename(path))
    args = ["fit-prism", "--model", path, "--out", fp, "--data", setup["corpus"], "--tokens", "600",
            "--reservoir", "200", "--k", "8", "--seq-len", "16", "--quiet"]
    assert main(args) == 0
    assert sorted(os.listdir(fp)) == ["Q_prism.pt", "prism.safetensors", "prism_card.json", "provenance.json",
                                      "whiten.pt"]
    assert main(args) == 2
    assert main(args + ["--force"]) == 0
    assert main(["fit-prism", "--model", path, "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert main(["fit-prism", "--model", path, "--out", str(tmp_path / "x"), "--data", setup["corpus"],
                 "--layers", "0,9", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "already holds a Prism" in err and "needs --data" in err and "outside 0..3" in err
    # auto finds prisms/<name>/ (working directory); an incompatible one there is reported, not fatal
    from jaxlens.probe import prism as PP

    src = PP.resolve(setup["model"], "auto")
    assert src.usable and src.path == os.path.abspath(fp)
    save_prism(PrismLens(np.zeros(32), np.ones(32), np.eye(32)), fp, format="jaxlens")
    src = PP.resolve(setup["model"], "auto", say=lambda m: None)
    assert src.present and not src.compatible and "does not fit" in src.error
    block = src.summary_block()
    assert block["mode"] == "auto" and block["metrics"] is None
