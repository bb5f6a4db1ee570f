"""Wall time of the full probe (``jaxlens probe``: 11 lens passes, final-head probes, every diagnostic of
spec §2.12-2.28, all output files) against the bare work it cannot avoid: one forward of the same
prompts plus one fused norm-lens decode of every layer at every position.

Usage: python benchmarks/probe.py [--models demo random24] [--repeats 3] [--d 256] [--vocab 32000]
                                  [--json out.json]

Models:
* ``demo``      the bundled demo model (``jaxlens.load_model("demo")``);
* ``random24``  a 24-layer Qwen3-shaped model with random weights (``decoder.init_params``) and the test
                tokenizer of ``tests/hf_factory.make_tokenizer`` (model vocabulary ``--vocab``; ids beyond the
                tokenizer's decode to their number).

For each model: ``probe`` = ``run_probe(model, out_dir=<tmp>)`` (outputs written); ``bare`` =
``model.forward`` of the probe's padded batch + ``lens_stats(norm, positions="all", top_k=20)`` with the
gold ids. ``cold`` is the first call in the process (includes XLA compilation), ``warm`` the median of
``--repeats`` later calls (bare and probe alternate, so load from other processes hits both); the
minima are reported too. The ratio that matters is warm probe / warm bare (target <= 3).
``diagnostics_s`` in the stage timings is the diagnostics' own time (decode stage + summary stage).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random24(d: int, vocab: int, tmp: str):
    import jax

    sys.path.insert(0, os.path.join(REPO, "tests"))
    import hf_factory as F

    from jaxlens.models import decoder
    from jaxlens.models.loader import Model
    from jaxlens.models.spec import spec_from_config

    tokdir = F.make_tokenizer(os.path.join(tmp, "random24"), vocab_size=512, bos=False)
    cfg = F.make_config("qwen3", num_hidden_layers=24, hidden_size=d, intermediate_size=3 * d,
                        num_attention_heads=d // 64, num_key_value_heads=max(1, d // 128), head_dim=64,
                        vocab_size=vocab).to_dict()
    spec = spec_from_config(cfg)
    params = decoder.init_params(spec, jax.random.PRNGKey(0), "float32")
    return Model(spec, params, path=tokdir, source="random24", config=cfg)


def bare_factory(model, suite):
    import jax

    from jaxlens.probe import gold as gold_mod
    from jaxlens.lens.stats import lens_stats
    from jaxlens.models.loader import pad_batch
    from jaxlens.probe.passes import prepare

    inputs = prepare(model, suite)
    ids, mask = pad_batch([p.input_ids for p in inputs])
    golds = np.array([p.gold.first_id if p.gold.first_id is not None else -1 for p in inputs], np.int32)
    del gold_mod

    def bare():
        fw = model.forward(ids, mask)
        st = lens_stats(model, fw, "norm", gold_ids=golds, top_k=20, positions="all", cosine=False)
        jax.block_until_ready((st.entropy_bits, st.top_ids))
    return bare


def bench(model, repeats: int, out_dir: str) -> dict:
    from jaxlens.probe.pipeline import run_probe
    from jaxlens.probe.suite import load_suite

    suite = load_suite("reference")
    bare = bare_factory(model, suite)
    t = time.perf_counter()
    bare()
    bare_cold = time.perf_counter() - t
    t = time.perf_counter()
    r = run_probe(model, suite=suite, out_dir=out_dir)
    probe_cold = time.perf_counter() - t
    bw, pw, timings = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        bare()
        bw.append(time.perf_counter() - t)
        t = time.perf_counter()
        r = run_probe(model, suite=suite, out_dir=out_dir)
        pw.append(time.perf_counter() - t)
        timings.append(r.timings)
    med = {k: float(np.median([x[k] for x in timings])) for k in timings[0]}
    s = model.spec
    return {"model": model.name, "n_layers": s.n_layers, "d_model": s.d_model, "vocab": s.vocab_size,
            "passes": len(r.passes), "max_tokens": max(len(p.inp.input_ids) for p in r.passes),
            "bare_cold_s": bare_cold, "probe_cold_s": probe_cold, "bare_warm_s": float(np.median(bw)),
            "probe_warm_s": float(np.median(pw)), "ratio_warm": float(np.median(pw) / np.median(bw)),
            "bare_min_s": float(np.min(bw)), "probe_min_s": float(np.min(pw)),
            "ratio_min": float(np.min(pw) / np.min(bw)), "ratio_cold": probe_cold / bare_cold,
            "diagnostics_over_bare": med["diagnostics_s"] / float(np.median(bw)),
            "probe_stage_medians_s": med, "files": len(r.paths)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["demo", "random24"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import jax

    import jaxlens

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models:
            model = jaxlens.load_model("demo") if name == "demo" else random24(a.d, a.vocab, tmp)
            res = bench(model, a.repeats, os.path.join(tmp, "out-" + name))
            rows.append(res)
            print(f"{res['model']:>9}: {res['n_layers']} layers, d={res['d_model']}, V={res['vocab']}, "
                  f"{res['passes']} passes x <= {res['max_tokens']} tokens | bare {res['bare_warm_s']:.3f} s, "
                  f"probe {res['probe_warm_s']:.3f} s -> ratio {res['ratio_warm']:.2f}x warm median, "
                  f"{res['ratio_min']:.2f}x of the minima (cold: {res['bare_cold_s']:.1f} s vs "
                  f"{res['probe_cold_s']:.1f} s, {res['ratio_cold']:.2f}x); the diagnostics alone "
                  f"{res['diagnostics_over_bare']:.2f}x bare")
            print("           probe stages (warm medians, s): " + ", ".join(
                f"{k} {v:.3f}" for k, v in res["probe_stage_medians_s"].items()))
    meta = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
            "platform": platform.platform()}
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"meta": meta, "results": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
