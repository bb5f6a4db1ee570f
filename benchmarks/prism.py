"""Prism on a model: the fixed fit (Q6) against the reference recipe (``--reference-quirks``), per-layer KL
of each against the norm lens on the probe's primary prompt, the probe's verdicts, and fit throughput.

Usage: python benchmarks/prism.py [--model demo] [--data FILE] [--json out.json] [--probe]

For each recipe the Prism is fitted with the default budget (100,000 rows, reservoir 20,000, k = min(512, d))
into a temporary directory; ``rows/s`` = rows accumulated per second of the row stream (forward + moments +
reservoir; the first batch includes XLA compilation, ``steady`` excludes it). The per-layer table decodes
the probe's primary prompt (Germany, original template) at its last position with the norm lens, both
Prisms, and the fixed Prism's whitening alone (Q = I), in one fused streaming pass. ``--probe`` also runs
``jaxlens probe --prism DIR`` for both and reports ``diagnostics.prism_summary.verdict`` (the probe's KL
percentiles are those of the same prompt).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--data", default=None, help="text for the fixed fit (default: the demo corpus, demo only)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--probe", action="store_true", help="also run the probe with each Prism (verdicts)")
    args = ap.parse_args(argv)

    import jaxlens
    from jaxlens.lens.multi import multi_lens_stats
    from jaxlens.lens.prism import PrismLens
    from jaxlens.probe.suite import load_suite
    from jaxlens.probe.gold import align_gold, model_input_ids
    from train_tuned.prism import fit_prism

    t0 = time.perf_counter()
    model = jaxlens.load_model(args.model)
    load_s = time.perf_counter() - t0
    tmp = tempfile.mkdtemp(prefix="prism-bench-")
    out = {"model": args.model, "spec": {"n_layers": model.spec.n_layers, "d_model": model.spec.d_model,
                                         "vocab": model.spec.vocab_size}, "load_s": load_s, "fits": {}}
    prisms = {}
    for name, quirks in (("fixed", False), ("reference", True)):
        fit = fit_prism(model, os.path.join(tmp, name), data=None if quirks else args.data, reference_quirks=quirks,
                        progress=False, log=lambda m: None)
        prisms[name] = fit.prism
        p = fit.provenance
        out["fits"][name] = {"rows": p["tokens_seen"], "reservoir": p["reservoir"], "k": p["k"],
                             "layers": p["layers"], "orthogonality_error": p["orthogonality_error"], **fit.timings}
        print(f"{name:9s} fit: {p['tokens_seen']} rows, k {p['k']}, layers {p['layers']}: stream "
              f"{fit.timings['stream_s']:.2f} s ({fit.timings['rows_per_s']:,.0f} rows/s"
              + (f", steady {fit.timings['rows_per_s_steady']:,.0f}" if fit.timings.get("rows_per_s_steady") else "")
              + f"), bases + Procrustes {fit.timings['linalg_s']:.2f} s, orthogonality error "
              f"{p['orthogonality_error']:.1e}")
    suite = load_suite("reference")
    prim = suite.passes()[0]
    tok = model.tokenizer
    ids = np.asarray([model_input_ids(tok, prim.text)])
    gold = align_gold(tok, prim.text, prim.answer).first_id
    fw = model.forward(ids)
    fx = prisms["fixed"]
    whiten_only = PrismLens(fx.mean, fx.var, np.eye(model.spec.d_model), fx.eps)
    names = ("norm", "fixed", "reference", "whiten_only")
    sts = multi_lens_stats(model, fw, ("norm", prisms["fixed"], prisms["reference"], whiten_only),
                           positions="last", gold_ids=None if gold is None else [gold], top_k=1, cosine=False)
    kl = {nm: np.asarray(s.kl_to_final_bits)[:, 0, 0].tolist() for nm, s in zip(names, sts)}
    rank = {nm: (np.asarray(s.gold_rank)[:, 0, 0].tolist() if gold is not None else None) for nm, s in zip(names, sts)}
    out["per_layer"] = {"kl_bits": kl, "answer_rank": rank, "prompt": prim.text, "answer": prim.answer}
    print("\n| layer | KL norm | KL Prism fixed | KL Prism reference | KL whitening only | rank norm / fixed / ref |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for L in range(model.spec.n_layers + 1):
        r = "" if gold is None else f"{rank['norm'][L]} / {rank['fixed'][L]} / {rank['reference'][L]}"
        print(f"| {L} | {kl['norm'][L]:.3f} | {kl['fixed'][L]:.3f} | {kl['reference'][L]:.3f} | "
              f"{kl['whiten_only'][L]:.3f} | {r} |")
    E, U = fx.extras["basis_pca"], fx.extras["basis_unembed"]
    pair = np.abs(np.sum(E * U, 0))
    out["pairing_abs_cos"] = {"median": float(np.median(pair)), "max": float(pair.max())}
    print(f"\n|e_i . u_i| of the paired PCA / unembedding directions: median {np.median(pair):.3f}, max {pair.max():.3f}")
    if args.probe:
        from jaxlens.probe.pipeline import run_probe

        out["probe"] = {}
        for name in ("fixed", "reference"):
            t = time.perf_counter()
            res = run_probe(model, out_dir=None, prism=os.path.join(tmp, name), tuned="off")
            ps = res.json["diagnostics"]["prism_summary"]
            m = ps["metrics"]["kl_bits_at_percentiles"]
            out["probe"][name] = {"verdict": ps["verdict"]["label"], "gain": ps["verdict"]["kl_gain_bits_median"],
                                  "kl": m, "rank_milestones": ps["metrics"]["rank_milestones"],
                                  "probe_s": time.perf_counter() - t,
                                  "Q6_in_fixed_bugs": "Q6" in res.json["provenance"]["fixed_reference_bugs"]}
            print(f"probe {name}: verdict {ps['verdict']['label']} (median KL gain "
                  f"{ps['verdict']['kl_gain_bits_median']:+.3f} bits); KL p25/p50/p75 norm "
                  + "/".join(f"{m['baseline'][q]:.3f}" for q in ("p25", "p50", "p75")) + ", prism "
                  + "/".join(f"{m['prism'][q]:.3f}" for q in ("p25", "p50", "p75"))
                  + f"; rank milestones {ps['metrics']['rank_milestones']['prism']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
