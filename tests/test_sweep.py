"""``jaxlens sweep`` against independent oracles.

* the probe's own pure rows (jaxlens.probe.passes) over the reference suite's prompts: bit for bit with XLA:CPU's
  Eigen kernels (``--stable-kernels``, in a subprocess), within fp32 rounding with the default kernels;
* a PyTorch float64 computation of every lens (norm / logit / raw) on a tiny Llama with a BOS tokenizer;
* batching invariance: the same rows whatever the window, bucket set, input order or company of a prompt, for the
  last-position tables and for --positions all (with --stable-kernels also whatever --batch-tokens);
* kill -9 in the middle of a sweep, then --resume: the tables equal an uninterrupted run's;
* bad inputs: each one clear error before any model work, or a row status (nothing lost);
* the CLI end to end: tuned lens, --positions all, --save-residuals, CSV / Parquet / hf: inputs, two models,
  tables read by pandas alone, the manifest.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

import hf_factory as F

pa = pytest.importorskip("pyarrow")
pd = pytest.importorskip("pandas")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BT = 256                      # padded tokens per batch in these tests (small: fast compiles, fast batches)
WORDS = ("the capital of France is Paris and Germany Berlin one two three plus is called simply a city river "
         "Rome Italy seven eight").split()


def _prompts(n, seed=0, lo=2, hi=40):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(lo, hi))
        out.append({"id": f"p{i}", "prompt": " ".join(rng.choice(WORDS, k)),
                    "answer": str(rng.choice(["Paris", "Berlin", "two", "Rome"])), "group": int(i % 3)})
    return out


def _jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def demo():
    import jaxlens

    return jaxlens.load_model("demo")


def _sweep(model, prompts, out=None, **kw):
    import jaxlens

    kw.setdefault("batch_tokens", BT)
    return jaxlens.sweep(model, prompts, out, progress=False, **kw)


def _env(**extra):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    if isinstance(a, (list, np.ndarray)) or isinstance(b, (list, np.ndarray)):
        return list(np.asarray(a).tolist()) == list(np.asarray(b).tolist())
    return a == b or (a is None and b is None)


def _tables_equal(t1, t2, skip=("prompt_index",)):
    """Every cell of two tables equal (NaN == NaN), columns in ``skip`` ignored; returns the differing columns."""
    d1, d2 = t1.to_pydict(), t2.to_pydict()
    assert list(d1) == list(d2)
    return [c for c in d1 if c not in skip and not all(_same(x, y) for x, y in zip(d1[c], d2[c]))]


# --------------------------------------------------------------------------------------------------
# 1. the probe's pure rows


PROBE_SCRIPT = r"""
import json, sys
import numpy as np
import jax
jax.config.update("jax_default_matmul_precision", "highest")
import jaxlens
from jaxlens.probe.gold import token_decoder
from jaxlens.probe.passes import pass_metrics, prepare, pure_rows, run_passes
from jaxlens.probe.suite import load_suite

m = jaxlens.load_model("demo")
suite = load_suite("reference")
decode = token_decoder(m.tokenizer)
inputs = prepare(m, suite)
dec = run_passes(m, suite, inputs, decode)
rows = [r for res in pass_metrics(m, suite, inputs, dec, decode)
        for r in pure_rows(res, decode, suite.records.pure_top_k)]
sw = jaxlens.sweep(m, "suite:reference", None, lenses="norm,raw", progress=False, batch_tokens=int(sys.argv[2]))
t = sw.table().to_pydict()
idx = {(t["prompt_id"][i], t["lens"][i], t["layer"][i]): i for i in range(len(t["lens"]))}
worst, bad, n, exact = {}, [], 0, 0
for r in rows:
    fact = r["fact_key"] if r["fact_key"] is not None else "control"
    key = (f"{r['prompt_id']}/{fact}/{r['prompt_variant']}", "norm", r["layer"])
    i = idx[key]
    for c, v in r.items():
        if c not in t or c in ("prompt_id",):
            continue
        w = t[c][i]
        if isinstance(v, bool) or isinstance(v, str) or v is None:
            if not (v == w or (v is None and w is None)):
                bad.append([c, repr(v), repr(w)])
            continue
        if isinstance(v, float) and np.isnan(v):
            if not (w is None or np.isnan(w)):
                bad.append([c, repr(v), repr(w)])
            continue
        n += 1
        d = abs(float(v) - float(w))
        exact += d == 0
        rel = d / max(1.0, abs(float(v)))
        worst[c] = max(worst.get(c, 0.0), rel)
json.dump({"rows": len(rows), "numbers": n, "exact": exact, "worst_rel": worst, "bad": bad[:20],
           "sweep_rows": len(t["lens"])}, open(sys.argv[1], "w"))
"""


def _probe_compare(script_dir, env=None):
    script = script_dir / "probe_vs_sweep.py"
    script.write_text(PROBE_SCRIPT)
    out = script_dir / "res.json"
    if env is None:                                  # in this process (8 fake devices, default kernels)
        import runpy

        argv = sys.argv
        try:
            sys.argv = [str(script), str(out), str(BT)]
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = argv
    else:
        r = subprocess.run([sys.executable, str(script), str(out), str(BT)], env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["rows"] == 11 * 9 and res["sweep_rows"] == 11 * 9 * 2
    assert res["bad"] == [], res["bad"]                 # every flag, string and blank cell equal
    assert res["numbers"] > 2000
    return res


def test_suite_prompts_equal_probe_pure_rows_stable_kernels(tmp_path):
    """With XLA:CPU's Eigen kernels (--stable-kernels) every pure next-token number of the probe, for the 11 passes
    of the reference suite x 9 layers, comes out of the sweep within 1e-6 relative: bit for bit except the
    cosine to the final logits (its matrix products run over blocks of 64 sequences in the sweep, over the 11
    passes in the probe; measured 3e-7)."""
    res = _probe_compare(tmp_path, _env(JAXLENS_COMPILE_CACHE="off",
                                        XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type="))
    assert max(res["worst_rel"].values()) <= 1e-6, res["worst_rel"]
    assert {k for k, v in res["worst_rel"].items() if v > 0} <= {"cos_to_final"}, res["worst_rel"]
    assert res["exact"] >= 0.95 * res["numbers"]


def test_suite_prompts_equal_probe_pure_rows_default_kernels(tmp_path):
    """With the default kernels (YNNPACK rounds by batch shape; the probe batches its 11 passes, the sweep 256
    padded tokens) within 2e-5 relative (measured 6e-6)."""
    res = _probe_compare(tmp_path)
    worst = {k: v for k, v in res["worst_rel"].items() if k != "mass_ratio_ans_over_prompt"}
    assert max(worst.values()) <= 2e-5, worst
    # p_answer / (echo mass + 1e-9): echo masses of ~1e-9 turn fp32 rounding into large absolute changes
    assert res["worst_rel"]["mass_ratio_ans_over_prompt"] <= 1e-3, res["worst_rel"]


# --------------------------------------------------------------------------------------------------
# 2. an independent PyTorch computation


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sweep-llama"))
    tm = F.build_checkpoint("llama", path, seed=23)
    return path, tm


def _torch_lenses(tm, ids):
    """Per-layer norm / logit / raw lens logits at the last position, float64 [L+1, V] each, and the final logits."""
    import torch

    ref = F.torch_reference(tm, np.asarray(ids)[None])
    layers, in_norms, final_norm, head = F._parts(tm)
    res = torch.as_tensor(ref["residuals"][:, 0, -1])                   # [L+1, d] raw
    with torch.no_grad():
        logit = F._head_logits(tm, head, final_norm(res)).double().numpy()
        raw = F._head_logits(tm, head, res).double().numpy()
    norm = ref["norm_lens_logits"][:, 0, -1].astype(np.float64)
    return {"norm": norm, "logit": logit, "raw": raw}, ref["logits"][0, -1].astype(np.float64)


def test_lenses_match_torch(tiny_llama, tmp_path):
    import jaxlens
    from jaxlens.probe.gold import model_input_ids

    path, tm = tiny_llama
    model = jaxlens.load_model(path)
    tok = model.tokenizer
    rows = [{"id": "a", "prompt": F.PROMPTS[0], "answer": "Tokyo"},
            {"id": "b", "prompt": F.PROMPTS[1], "answer": "the"},
            {"id": "c", "prompt": "Q: What is the capital of Peru? A:", "answer": "Lima"},
            {"id": "d", "prompt": "Seven plus", "answer": "eight"}]
    sw = _sweep(model, _jsonl(tmp_path / "p.jsonl", rows), lenses="norm,logit,raw", top_k=5)
    t = sw.table().to_pandas()
    assert model_input_ids(tok, rows[0]["prompt"])[0] == tok.bos_token_id          # the BOS policy is exercised
    for r in rows:
        ids = model_input_ids(tok, r["prompt"])
        gid = (tok.encode(r["prompt"] + " " + r["answer"], add_special_tokens=False)
               [len(tok.encode(r["prompt"], add_special_tokens=False))])
        z_all, zf = _torch_lenses(tm, ids)
        lq = F.log_softmax64(zf)
        for lens, z in z_all.items():
            s = t[(t.prompt_id == r["id"]) & (t.lens == lens)].sort_values("layer")
            assert list(s.layer) == list(range(model.spec.n_layers + 1))
            lp = F.log_softmax64(z)
            p = np.exp(lp)
            zmax = float(np.abs(z).max())
            tol = max(2e-6, 8 * np.finfo(np.float32).eps * zmax)      # fp32 rounding of logits of this size
            prel = max(1e-5, 8 * np.finfo(np.float32).eps * zmax)     # probabilities inherit |dz| relatively
            np.testing.assert_allclose(s.entropy_bits, -(p * lp).sum(-1) / np.log(2), atol=tol, rtol=1e-5)
            np.testing.assert_allclose(s.kl_to_final_bits, F.kl_bits(z, zf[None]), atol=tol, rtol=1e-5)
            np.testing.assert_allclose(s.kl_final_to_layer_bits, F.kl_bits(zf[None], z), atol=tol, rtol=1e-5)
            np.testing.assert_allclose(s.teacher_entropy_bits, -(np.exp(lq) * lq).sum() / np.log(2), atol=tol,
                                       rtol=1e-5)
            np.testing.assert_allclose(s.p_answer, p[:, gid], rtol=prel, atol=1e-9)
            np.testing.assert_array_equal(s.answer_rank, 1 + (z > z[:, [gid]]).sum(-1))
            srt = np.sort(p, -1)[:, ::-1]
            for k in range(5):
                np.testing.assert_allclose(s[f"prob{k + 1}"], srt[:, k], rtol=prel, atol=1e-9)
            top = np.argsort(-z, -1, kind="stable")[:, :5]
            gaps = np.diff(-np.sort(z, -1)[:, ::-1][:, :6], axis=-1)
            for i, ids_ in enumerate(s.top_ids):
                ok = np.abs(gaps[i]) > 1e-4                                      # away from near-ties
                assert np.array_equal(np.asarray(ids_)[:5][np.concatenate([[True], ok[:4]])],
                                      top[i][np.concatenate([[True], ok[:4]])])
            v = z                                                                 # the head has no bias here
            f = zf / (np.linalg.norm(zf) + 1e-12)
            cos = (v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-12)) @ f
            np.testing.assert_allclose(s.cos_to_final, cos, atol=2e-6)


# --------------------------------------------------------------------------------------------------
# 3. batching invariance


def test_rows_identical_whatever_batch_bucket_or_company(demo, tmp_path):
    rows = _prompts(30, seed=1)
    base = _jsonl(tmp_path / "all.jsonl", rows)
    shuffled = _jsonl(tmp_path / "shuffled.jsonl", [rows[i] for i in np.random.default_rng(5).permutation(len(rows))])
    alone = _jsonl(tmp_path / "alone.jsonl", [rows[7]])
    ref = _sweep(demo, base, lenses="norm,raw")
    runs = {"window=4": _sweep(demo, base, lenses="norm,raw", window=4),
            "shuffled, buckets 32/64": _sweep(demo, shuffled, lenses="norm,raw", buckets=[32, 64]),
            "alone, bucket 64": _sweep(demo, alone, lenses="norm,raw", buckets=[64])}
    r0 = ref.table()
    p0 = ref.table(table="prompts")
    for name, r in runs.items():
        t = r.table()
        ids = set(t.column("prompt_id").to_pylist())
        sub = r0.filter(pa.compute.is_in(r0.column("prompt_id"), pa.array(sorted(ids))))
        key = lambda tb: tb.sort_by([("prompt_id", "ascending"), ("lens", "ascending"),  # noqa: E731
                                     ("layer", "ascending")])
        assert _tables_equal(key(sub), key(t)) == [], name
        pt = r.table(table="prompts")
        psub = p0.filter(pa.compute.is_in(p0.column("prompt_id"), pa.array(sorted(ids))))
        keyp = lambda tb: tb.sort_by([("prompt_id", "ascending"), ("lens", "ascending")])  # noqa: E731
        assert _tables_equal(keyp(psub), keyp(pt)) == [], name
    st = ref.models["demo"]["manifest"]["stats"]
    assert st["compiles"] <= 3 and st["prompts_computed"] == 30            # at most one per bucket: 16, 32, 64


POSITIONS_SCRIPT = r"""
import json, sys
import jaxlens
from jaxlens.models.loader import DEMO_TUNED_LENS_DIR
res = {}
for name, kw in json.loads(sys.argv[2]).items():
    prompts = kw.pop("prompts")
    sw = jaxlens.sweep("demo", prompts, None, lenses="norm,raw", tuned=DEMO_TUNED_LENS_DIR, positions="all", top_k=3,
                       progress=False, **kw)
    res[name] = {t: sw.table(table=t).to_pydict() for t in ("layers", "positions")}
json.dump(res, open(sys.argv[1], "w"))
"""


def _positions_runs(tmp_path, runs, env=None):
    """{name: {"layers": ..., "positions": ...}} (dicts of columns) of the demo swept with norm, raw and the
    packaged tuned lens and --positions all, per run's keywords; in a subprocess when ``env`` is given."""
    if env is None:
        import jaxlens
        from jaxlens.models.loader import DEMO_TUNED_LENS_DIR

        out = {}
        for name, kw in runs.items():
            kw = dict(kw)
            sw = jaxlens.sweep("demo", kw.pop("prompts"), None, lenses="norm,raw", tuned=DEMO_TUNED_LENS_DIR,
                               positions="all", top_k=3, progress=False, **kw)
            out[name] = {t: sw.table(table=t).to_pydict() for t in ("layers", "positions")}
        return out
    script = tmp_path / "positions.py"
    script.write_text(POSITIONS_SCRIPT)
    res = tmp_path / "positions.json"
    r = subprocess.run([sys.executable, str(script), str(res), json.dumps(runs)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(res.read_text())


def _by_key(t: dict) -> dict:
    keys = [k for k in ("prompt_id", "lens", "layer", "pos") if k in t]
    return {tuple(t[k][i] for k in keys): {c: t[c][i] for c in t if c != "prompt_index"} for i in range(len(t["lens"]))}


def _positions_compare(ref: dict, got: dict) -> dict:
    """Per table: (cells that differ, largest |x - y| / max(1, |x|) over the float cells) on got's rows."""
    out = {}
    for table in ("layers", "positions"):
        a, b = _by_key(ref[table]), _by_key(got[table])
        assert set(b) <= set(a) and b
        diff, worst = 0, 0.0
        for k, row in b.items():
            for c, v in row.items():
                u = a[k][c]
                if _same(u, v):
                    continue
                diff += 1
                if isinstance(u, float) and isinstance(v, float):
                    worst = max(worst, abs(u - v) / max(1.0, abs(u)))
                else:
                    worst = float("inf")              # a token / rank / id that changed
        out[table] = (diff, worst)
    return out


def _positions_setup(tmp_path):
    rows = _prompts(10, seed=9, hi=40)
    base = _jsonl(tmp_path / "all.jsonl", rows)
    mixed = _jsonl(tmp_path / "mixed.jsonl", [rows[i] for i in (7, 2, 9, 0, 4)])
    alone = _jsonl(tmp_path / "alone.jsonl", [rows[3]])
    return base, mixed, alone


def test_positions_all_batch_invariant_default_kernels(tmp_path):
    """--positions all (every layer x every position): a prompt's rows are bit for bit the same whatever bucket
    set, window, company or order it lands in at one --batch-tokens, like the last-position rows (the positions
    decode runs a batch's B x L = batch_tokens (sequence, position) rows in blocks of 64; padding positions are
    decoded but never written). Another --batch-tokens changes the shapes of the forward's GEMMs, which
    XLA:CPU's default (YNNPACK) kernels round by shape: every cell then within 5e-5 * max(1, |x|) (measured
    1.3e-5 positions, 1.1e-5 layers: the positions table is not looser than the last-position one, only
    larger), no token, rank or id changed."""
    base, mixed, alone = _positions_setup(tmp_path)
    runs = _positions_runs(tmp_path, {
        "ref": {"prompts": base, "batch_tokens": BT},
        "buckets 64, window 3": {"prompts": base, "batch_tokens": BT, "buckets": [64], "window": 3},
        "other company, order": {"prompts": mixed, "batch_tokens": BT, "buckets": [32, 128]},
        "alone": {"prompts": alone, "batch_tokens": BT},
        "batch_tokens 1024": {"prompts": base, "batch_tokens": 4 * BT}})
    ref = runs.pop("ref")
    n_pos = len(ref["positions"]["lens"])
    assert n_pos > 10 * 26 * 5                                   # every layer of 3 lenses at every position
    other = runs.pop("batch_tokens 1024")
    for name, got in runs.items():
        assert _positions_compare(ref, got) == {"layers": (0, 0.0), "positions": (0, 0.0)}, name
    cmp = _positions_compare(ref, other)
    print("batch_tokens 256 -> 1024 (default kernels): cells differing, worst rel:", cmp)
    assert cmp["layers"][1] <= 5e-5 and cmp["positions"][1] <= 5e-5, cmp


def test_positions_all_bucket_invariant_with_translators_at_d576(tmp_path):
    """The case the demo (d = 64) cannot show: at d = 576 (SmolLM2-135M's width) XLA:CPU's default kernels round
    a [rows, d] x [d, d] product by its row count below 48 rows, so a tuned lens's or a Prism's translators must
    not see a prompt's bucket length. The positions decode runs (sequence, position) rows in blocks of 64 rows
    (before: one block per sequence of L positions, and 282 cells of the tuned and Prism rows changed between
    buckets 16/32/64 and 64 only, by up to 4.1e-6): bit for bit the same rows now, for every lens."""
    import jaxlens
    from jaxlens.lens.prism import PrismLens
    from jaxlens.lens.tuned import FullRankLens

    path = str(tmp_path / "wide")
    F.build_checkpoint("llama", path, seed=3, config_overrides=dict(
        hidden_size=576, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=24))
    model = jaxlens.load_model(path)
    n, d = model.spec.n_layers, model.spec.d_model
    assert d == 576
    rng = np.random.default_rng(0)
    tuned = FullRankLens(W=(rng.normal(size=(n, d, d)) * 0.3 / np.sqrt(d)).astype(np.float32),
                         b=np.zeros((n, d), np.float32)).bind(model)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    prism = PrismLens(mean=rng.normal(size=d) * 0.1, var=rng.uniform(0.5, 2.0, size=d), Q=q)
    words = "the capital of France is Paris and Germany Berlin one two three".split()
    rows = [{"id": f"w{i}", "prompt": " ".join(rng.choice(words, k)), "answer": "Paris"}
            for i, k in enumerate((3, 5, 9, 14))]
    prompts = _jsonl(tmp_path / "p.jsonl", rows)
    alone = _jsonl(tmp_path / "alone.jsonl", rows[1:2])
    runs = {}
    for name, src, kw in (("ref", prompts, {}), ("buckets 64", prompts, {"buckets": [64]}),
                          ("alone, bucket 128", alone, {"buckets": [128]})):
        sw = _sweep(model, src, None, lenses="norm", tuned=tuned, prism=prism, positions="all", top_k=3, **kw)
        runs[name] = {t: sw.table(table=t).to_pydict() for t in ("layers", "positions")}
    ref = runs.pop("ref")
    assert set(ref["positions"]["lens"]) == {"norm", "tuned", "prism"}
    for name, got in runs.items():
        assert _positions_compare(ref, got) == {"layers": (0, 0.0), "positions": (0, 0.0)}, name


def test_positions_all_batch_tokens_invariant_stable_kernels(tmp_path):
    """With --stable-kernels (XLA:CPU's Eigen GEMMs, in a subprocess) --batch-tokens, buckets and window change
    nothing: the positions and layers tables of 256 and 1024 padded tokens per batch are identical cell for
    cell."""
    base, mixed, _ = _positions_setup(tmp_path)
    runs = _positions_runs(tmp_path, {
        "ref": {"prompts": base, "batch_tokens": BT},
        "batch_tokens 1024, buckets 64, window 3": {"prompts": base, "batch_tokens": 4 * BT, "buckets": [64],
                                                    "window": 3},
        "batch_tokens 512, other company": {"prompts": mixed, "batch_tokens": 2 * BT}},
        env=_env(JAXLENS_COMPILE_CACHE="off", XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type="))
    ref = runs.pop("ref")
    for name, got in runs.items():
        assert _positions_compare(ref, got) == {"layers": (0, 0.0), "positions": (0, 0.0)}, name


def test_engine_matches_lens_stats(demo):
    """The engine's traced last-position decode = multi_lens_stats on the same (padded, >= 64-row) batch."""
    from jaxlens.lens import multi as LM
    from jaxlens.probe import gold as G
    from jaxlens.sweep import engine as E

    tok = demo.tokenizer
    seqs = [G.model_input_ids(tok, r["prompt"]) for r in _prompts(16, seed=3, lo=2, hi=8)]
    seqs = [s[:16] for s in seqs]
    eng = E.Engine(demo, ["norm", "raw"], top_k=50)                                # the sweeps' compiled step
    jobs = [E.Job(row=types.SimpleNamespace(index=i), ids=s, ctx_ids=s, gold=None, control=None, prompt_vocab=[])
            for i, s in enumerate(seqs)]
    batch = E.make_batch(0, 16, 16, jobs)
    out = {k: np.asarray(v) for k, v in eng.run(batch).items()}
    fw = demo.forward(batch.ids, batch.mask)
    ns = LM.multi_lens_stats(demo, fw, ("norm", "raw"), positions="last", top_k=50, gold_ids=None)
    for name in ("entropy_bits", "kl_to_final_bits", "kl_final_to_layer_bits", "top_probs", "cos_to_final"):
        ref = np.concatenate([np.moveaxis(np.asarray(getattr(s, name))[:, :, 0], 0, 1) for s in ns], axis=1)
        np.testing.assert_allclose(out[name], ref, rtol=2e-5, atol=2e-5, err_msg=name)
    ref_ids = np.concatenate([np.moveaxis(np.asarray(s.top_ids)[:, :, 0], 0, 1) for s in ns], axis=1)
    assert (out["top_ids"][..., 0] == ref_ids[..., 0]).mean() > 0.99


# --------------------------------------------------------------------------------------------------
# 4. kill -9 and --resume


def _cli(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "jaxlens.cli", "sweep"] + args, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
    from jaxlens.sweep import read_manifest, read_table

    prompts = _jsonl(tmp_path / "p.jsonl", _prompts(24, seed=2, hi=28))
    env = _env(JAXLENS_COMPILE_CACHE=str(tmp_path / "xla-cache"))
    common = ["--model", "demo", "--prompts", prompts, "--lens", "norm,raw", "--batch-tokens", str(BT), "--window", "2",
              "--quiet"]
    killed = _cli(common + ["--out", str(tmp_path / "cut")], env)
    man = tmp_path / "cut" / "demo" / "manifest.json"
    done = 0
    t0 = time.time()
    while time.time() - t0 < 240 and killed.poll() is None:
        try:
            done = len(json.loads(man.read_text())["windows_done"])
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= 3:
            os.kill(killed.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"
    m = read_manifest(tmp_path / "cut" / "demo")
    assert m["status"] == "running" and 3 <= len(m["windows_done"]) < 12
    resumed = _cli(common + ["--out", str(tmp_path / "cut"), "--resume"], env)
    _, e = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, e[-3000:]
    m = read_manifest(tmp_path / "cut" / "demo")
    assert m["status"] == "complete" and len(m["windows_done"]) == 12 and m["stats"]["windows_resumed"] >= 3
    full = _sweep("demo", prompts, None, lenses="norm,raw", window=2)           # uninterrupted (CLI runs = API runs)
    for table in ("layers", "prompts"):
        got = read_table(tmp_path / "cut" / "demo", table)
        assert _tables_equal(full.table(table=table), got, skip=()) == [], table
    listed = {s["file"] for s in m["shards"]}
    on_disk = {os.path.relpath(os.path.join(d, f), tmp_path / "cut" / "demo")
               for d, _, fs in os.walk(tmp_path / "cut" / "demo") for f in fs} - {"manifest.json"}
    assert on_disk == listed                                                       # no stray parts or temporaries
    # the tables load without jaxlens
    df = pd.read_parquet(tmp_path / "cut" / "demo" / "layers")
    assert len(df) == 24 * 2 * 9 and set(df.lens) == {"norm", "raw"}


# --------------------------------------------------------------------------------------------------
# 5. bad inputs


def test_bad_inputs(demo, tmp_path):
    from jaxlens.errors import JaxlensError

    def err(prompts, match, **kw):
        with pytest.raises(JaxlensError, match=match):
            _sweep(demo, prompts, tmp_path / "never", **kw)
        assert not (tmp_path / "never" / "demo").exists()

    csv = tmp_path / "noprompt.csv"
    csv.write_text("text,answer\nhello,world\n")
    err(str(csv), "has no 'prompt' column \\(columns: text, answer\\)")                           # 1
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err(str(empty), "is empty")                                                                     # 2
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    err(str(blank), "holds no prompts")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": "b",,}\n')
    err(str(bad), "line 2 is not valid JSON")                                                       # 3
    notobj = tmp_path / "list.jsonl"
    notobj.write_text('["a"]\n')
    err(str(notobj), "line 1 is not a JSON object")
    dup = _jsonl(tmp_path / "dup.jsonl", [{"id": "x", "prompt": "a"}, {"id": "x", "prompt": "b"}])
    err(dup, "id 'x' appears twice \\(rows 1 and 2\\)")
    ok = _jsonl(tmp_path / "ok.jsonl", [{"prompt": "The capital of France is", "answer": "Paris"}])
    err(ok, "unknown lens 'fancy'", lenses="norm,fancy")                                            # 4
    err(str(tmp_path / "missing.jsonl"), "does not exist")
    err(ok, "--tuned .*no such lens directory", tuned=str(tmp_path / "nolens"))
    err(str(tmp_path / "p.txt"), "unknown format")
    afile = tmp_path / "a-file"
    afile.write_text("x")
    with pytest.raises(JaxlensError, match="cannot write to the output directory"):                  # 5
        _sweep(demo, ok, str(afile / "out"))
    # per-row problems: a status each, every row kept, the rest computed
    long = " ".join(["word"] * 400)
    rows = [{"id": "good", "prompt": "The capital of France is", "answer": "Paris", "note": "n1"},
            {"id": "empty", "prompt": "   ", "answer": "x"},                                            # 6
            {"id": "number", "prompt": 7},
            {"id": "long", "prompt": long, "answer": "word"},                                              # 7
            {"id": "unaligned", "prompt": "The capital of Germany is", "answer": " "},                     # 8
            {"id": "noanswer", "prompt": "One plus one is"},
            {"id": "badanswer", "prompt": "Two plus two is", "answer": {"x": 1}}]
    sw = _sweep(demo, _jsonl(tmp_path / "mixed.jsonl", rows), tmp_path / "mixed", lenses="norm,logit")
    p = sw.table(table="prompts").to_pandas()
    assert len(p) == len(rows) * 2
    status = dict(zip(p[p.lens == "norm"].prompt_id, p[p.lens == "norm"].status))
    assert status == {"good": "ok", "empty": "empty_prompt", "number": "prompt_not_text", "long": "too_long",
                      "unaligned": "answer_unaligned", "noanswer": "ok", "badanswer": "bad_answer"}
    det = dict(zip(p[p.lens == "norm"].prompt_id, p[p.lens == "norm"].status_detail))
    assert "tokens; the model's context is 128" in det["long"] and "empty_answer" in det["unaligned"]
    assert p[p.prompt_id == "good"].note.tolist() == ["n1", "n1"]
    layers = sw.table().to_pandas()
    assert set(layers.prompt_id) == {"good", "unaligned", "noanswer", "badanswer"}
    una = layers[layers.prompt_id == "unaligned"]
    assert una.p_answer.isna().all() and una.answer_rank.isna().all() and una.entropy_bits.notna().all()
    assert layers[layers.prompt_id == "good"].p_answer.notna().all()
    # mismatched resume: refused with what changed, before any model work
    other = _jsonl(tmp_path / "other.jsonl", rows[:3])
    with pytest.raises(JaxlensError, match="cannot resume .*the prompt set changed \\(7 rows"):          # 9
        _sweep(demo, other, tmp_path / "mixed", lenses="norm,logit", resume=True)
    with pytest.raises(JaxlensError, match="cannot resume .*the lenses changed \\(norm,logit -> norm\\)"):
        _sweep(demo, _jsonl(tmp_path / "mixed.jsonl", rows), tmp_path / "mixed", lenses="norm", resume=True)
    with pytest.raises(JaxlensError, match="cannot resume .*the option top_k changed \\(5 -> 7\\)"):
        _sweep(demo, _jsonl(tmp_path / "mixed.jsonl", rows), tmp_path / "mixed", lenses="norm,logit", top_k=7,
               resume=True)
    with pytest.raises(JaxlensError, match="already holds a sweep"):
        _sweep(demo, _jsonl(tmp_path / "mixed.jsonl", rows), tmp_path / "mixed", lenses="norm,logit")


def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": }\n')
    r = subprocess.run([sys.executable, "-m", "jaxlens.cli", "sweep", "--model", "demo", "--prompts", str(bad), "--out",
                        str(tmp_path / "o")], env=_env(JAXLENS_COMPILE_CACHE="off"), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("jaxlens: error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "line 1 is not valid JSON" in r.stderr
    assert not (tmp_path / "o" / "demo").exists()


# --------------------------------------------------------------------------------------------------
# 6. inputs, lenses and outputs end to end


def test_formats_tuned_positions_residuals(demo, tmp_path, monkeypatch):
    import jaxlens
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from jaxlens.models.loader import DEMO_TUNED_LENS_DIR
    from jaxlens.sweep import read_manifest

    rows = _prompts(6, seed=4, hi=12)
    tbl = pa.Table.from_pylist(rows)
    pcsv.write_csv(tbl, tmp_path / "p.csv")
    pq.write_table(tbl, tmp_path / "p.parquet")
    jl = _jsonl(tmp_path / "p.jsonl", rows)
    ds = types.ModuleType("datasets")
    ds.load_dataset = lambda name, config=None, split="train", **kw: [dict(r, question=r["prompt"]) for r in rows] \
        if (name, config, split) == ("org/prompts", "en", "test") else (_ for _ in ()).throw(FileNotFoundError(name))
    monkeypatch.setitem(sys.modules, "datasets", ds)
    out = tmp_path / "out"
    ref = _sweep(demo, jl, out / "jsonl", lenses="norm,raw", tuned=DEMO_TUNED_LENS_DIR, positions="all",
                 save_residuals=True, top_k=3)
    lens = jaxlens.load_lens(DEMO_TUNED_LENS_DIR, model=demo)
    for src, kw in ((str(tmp_path / "p.csv"), {}), (str(tmp_path / "p.parquet"), {}),
                    ("hf:org/prompts:en@test", {"fields": {"prompt": "question"}})):
        r = _sweep(demo, src, None, lenses="norm,raw", tuned=lens, top_k=3, **kw)
        assert _tables_equal(ref.table(), r.table()) == [], src
    t = ref.table().to_pandas()
    assert set(t.lens) == {"norm", "raw", "tuned"}
    assert sorted(set(t[t.lens == "tuned"].layer)) == list(range(1, demo.spec.n_layers + 1))      # the probe's layers
    assert sorted(set(t[t.lens == "norm"].layer)) == list(range(demo.spec.n_layers + 1))
    assert [c for c in ("top1", "prob3", "top_ids", "copy_strict@0.95", "copy_soft_k1@0.5", "kl_final_to_layer_bits",
                        "answer_rank", "p_answer", "cos_to_final") if c not in t.columns] == []
    # the tuned rows equal lens_stats with the loaded lens on the prompt alone
    tuned = lens
    from jaxlens.probe.gold import model_input_ids

    ids = model_input_ids(demo.tokenizer, rows[0]["prompt"])
    fw = demo.forward(np.asarray([ids]))
    st = jaxlens.lens_stats(demo, fw, tuned, positions="last", layers=list(range(1, 9)), top_k=3)
    s = t[(t.lens == "tuned") & (t.prompt_id == "p0")].sort_values("layer")
    np.testing.assert_allclose(s.entropy_bits, np.asarray(st.entropy_bits)[:, 0, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s.kl_to_final_bits, np.asarray(st.kl_to_final_bits)[:, 0, 0], rtol=1e-5, atol=1e-5)
    # positions: every layer x every position; its last position is the layer row's
    pos = ref.table(table="positions").to_pandas()
    n_tok = ref.table(table="prompts").to_pandas().query("lens == 'norm'").set_index("prompt_id").n_tokens
    assert len(pos) == sum(int(n_tok[r["id"]]) for r in rows) * (9 + 9 + 8)
    last = pos.merge(t[["prompt_id", "lens", "layer", "pos", "entropy_bits"]], on=["prompt_id", "lens", "layer", "pos"])
    assert len(last) == len(t)
    np.testing.assert_allclose(last.entropy_bits_x, last.entropy_bits_y, rtol=1e-5, atol=1e-5)
    # residuals: memory-mappable, one row per computed prompt, the raw stream at the last position
    man = read_manifest(out / "jsonl" / "demo")
    rf = [s["file"] for s in man["shards"] if s["table"] == "residuals"]
    arr = np.load(out / "jsonl" / "demo" / rf[0], mmap_mode="r")
    idx = np.load(out / "jsonl" / "demo" / [s["file"] for s in man["shards"] if s["table"] == "residuals.index"][0])
    assert arr.shape == (6, 9, demo.spec.d_model) and sorted(idx.tolist()) == list(range(6))
    row0 = int(np.where(idx == 0)[0][0])
    np.testing.assert_allclose(arr[row0], np.asarray(fw.residuals)[:, 0, -1], rtol=1e-4, atol=1e-4)
    pr = ref.table(table="prompts").to_pandas()
    assert set(pr.residual_row.dropna().astype(int)) == set(range(6))
    # manifest: identity and every shard with rows and sha256
    ident = man["identity"]
    assert ident["model"]["name"] == "demo" and ident["dtype"] == "float32" and ident["prompts"]["rows"] == 6
    assert [x["name"] for x in ident["lenses"]] == ["norm", "raw", "tuned"] and len(ident["lenses"][2]["sha256"]) == 64
    assert ident["versions"]["jax"] and ident["versions"]["jaxlens"] and man["status"] == "complete"
    from jaxlens.sweep.store import sha256_file

    for s in man["shards"]:
        assert sha256_file(out / "jsonl" / "demo" / s["file"]) == s["sha256"]


def test_two_models_one_command(tiny_llama, tmp_path):
    path, _ = tiny_llama
    prompts = _jsonl(tmp_path / "p.jsonl", _prompts(5, seed=6, hi=10))
    r = subprocess.run([sys.executable, "-m", "jaxlens.cli", "sweep", "--model", "demo", "--model", path, "--prompts",
                        prompts, "--out", str(tmp_path / "o"), "--batch-tokens", str(BT)],
                       env=_env(JAXLENS_COMPILE_CACHE="off"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    name = os.path.basename(path)
    assert os.path.exists(tmp_path / "o" / "demo" / "manifest.json")
    assert os.path.exists(tmp_path / "o" / name / "manifest.json")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("demo ", name + " "))]
    assert len(lines) == 4                                                          # model x lens summary rows
    summ = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert [(x["model"], x["lens"]) for x in summ["summary"]] == [("demo", "norm"), ("demo", "logit"), (name, "norm"),
                                                                   (name, "logit")]
    assert all(x["prompts"] == 5 for x in summ["summary"])


def test_unit_inputs_and_engine_plan():
    from jaxlens.errors import JaxlensError
    from jaxlens.sweep import engine as E
    from jaxlens.sweep import inputs as I

    assert I.parse_hf("hf:org/name:cfg@validation") == ("org/name", "cfg", "validation")
    assert I.parse_hf("hf:name") == ("name", None, "train")
    assert E.bucket_lengths(128) == (16, 24, 32, 48, 64, 96, 128)
    assert E.bucket_lengths(128, batch_tokens=256) == (16, 32, 64, 128)
    assert E.bucket_lengths(8192, batch_tokens=3072)[:8] == (16, 24, 32, 48, 64, 96, 128, 192)
    assert 2048 not in E.bucket_lengths(8192, batch_tokens=3072)            # 3072 / 2048 is not whole
    assert E.bucket_lengths(100) == (16, 24, 32, 48, 64, 96, 100)
    assert E.bucket_lengths(128, [24, 48, 512]) == (24, 48, 128)
    # every bucket up to batch_tokens has the same padded tokens per batch
    assert {L * E.batch_size_for(L, 2048, None, 1) for L in (16, 32, 64, 128, 256, 512, 1024, 2048)} == {2048}
    assert E.batch_size_for(16, 2048, None, 4) % 4 == 0 and E.batch_size_for(8, 64, 2, 1) == 8
    from jaxlens import distributed as DI

    assert DI.parse_mesh("data=2,tensor=-1") == {"data": 2, "fsdp": 1, "tensor": -1}
    for bad in ("data=2,data=1", "foo=2", "data=x", "data=0", "data=-1,fsdp=-1"):
        with pytest.raises(JaxlensError):
            DI.parse_mesh(bad)
    a = I.build_set([{"prompt": "a", "x": 1}], ["prompt", "x"], source="s", kind="jsonl", fields={})
    b = I.build_set([{"prompt": "a", "x": 1}], ["prompt", "x"], source="other", kind="csv", fields={})
    c = I.build_set([{"prompt": "a", "x": 2}], ["prompt", "x"], source="s", kind="jsonl", fields={})
    assert a.sha256 == b.sha256 != c.sha256                                         # content, not path or format


def test_prism_lens_object(demo, tmp_path):
    """A Prism (jaxlens.lens.prism) decodes in the same streaming pass; its rows equal lens_stats with the Prism."""
    prism_mod = pytest.importorskip("jaxlens.lens.prism")
    import jaxlens
    from jaxlens.probe.gold import model_input_ids

    d = demo.spec.d_model
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    prism = prism_mod.PrismLens(mean=rng.normal(size=d) * 0.1, var=rng.uniform(0.5, 2.0, size=d), Q=q)
    rows = _prompts(3, seed=8, hi=10)
    sw = _sweep(demo, _jsonl(tmp_path / "p.jsonl", rows), None, lenses="norm", prism=prism)
    t = sw.table().to_pandas()
    assert sorted(set(t.lens)) == ["norm", "prism"]
    assert sw.models["demo"]["manifest"]["identity"]["lenses"][1]["object"] == "PrismLens"
    ids = model_input_ids(demo.tokenizer, rows[1]["prompt"])
    fw = demo.forward(np.asarray([ids]))
    st = jaxlens.lens_stats(demo, fw, prism, positions="last", top_k=5)
    s = t[(t.lens == "prism") & (t.prompt_id == "p1")].sort_values("layer")
    np.testing.assert_allclose(s.entropy_bits, np.asarray(st.entropy_bits)[:, 0, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s.kl_to_final_bits, np.asarray(st.kl_to_final_bits)[:, 0, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s.prob1, np.asarray(st.top_probs)[:, 0, 0, 0], rtol=1e-5, atol=1e-7)
    assert t[t.lens == "prism"]["topk_prompt_mass@50"].isna().all()           # the probe's Prism convention
    # the same Prism from a directory (--prism DIR, read with load_prism)
    prism_mod.save_prism(prism, str(tmp_path / "prism"), format="jaxlens")
    by_dir = _sweep(demo, _jsonl(tmp_path / "p.jsonl", rows), None, lenses="norm", prism=str(tmp_path / "prism"))
    assert _tables_equal(sw.table(), by_dir.table()) == []
    assert len(by_dir.models["demo"]["manifest"]["identity"]["lenses"][1]["sha256"]) == 64
