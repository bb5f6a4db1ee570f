"""Lens decode speed: jaxlens's fused streaming decode vs the per-layer PyTorch loop and the GEMM floor.

Usage: python benchmarks/lens_decode.py [--d 512 768 1024] [--tokens 512 1024] [--vocab 50257] [--dtype float32]
                                        [--repeats 3] [--no-compile] [--no-dense] [--json out.json]

Shape: a GPT-2-small-like model (12 blocks -> 13 streams, LayerNorm + tied unembedding, d/64 heads), random
weights, one model per width in ``--d`` (a sweep). Every contestant computes, for every (layer, token): entropy
(bits), KL(P_layer || P_final) (bits), the gold token's rank and probability, and the top-20 ids /
probabilities, from the same residuals:

* torch-eager:   the loop the reference probe and tuned-lens use: per layer, norm -> lm_head ->
                 log_softmax -> stats (full [T, V] logits per layer).
* torch-compile: the same per-layer function under torch.compile (compile time reported separately).
* jaxlens-dense: jaxlens.lens_stats(..., dense=True) (materialises [13, T, V]).
* jaxlens:       jaxlens.lens_stats(...), the streaming path (default).
* floor:         one bare unembedding GEMM of the same shape ([13*T, d] x [d, V]) in JAX, same run.
* forward:       the jitted model forward (all residual streams) that produces the decode's input.

Per width and token count: ``jaxlens_vs_floor`` = (forward + jaxlens) / (forward + floor GEMM), the issue-15
measure (1.0 = the decode costs no more than its GEMM); ``decode_vs_gemm`` = jaxlens / floor GEMM;
``speedup_vs_torch_eager`` = torch loop / jaxlens decode and ``..._incl_forward`` = torch loop / (forward +
jaxlens decode) (the torch loop starts from the residuals, so the second is the conservative one). Contestants
are timed in interleaved rounds (every round times each once; medians over ``--repeats`` rounds), so load
changes on a shared machine hit all of them alike. Peak temporary memory of the jaxlens paths comes from XLA's
compiled memory_analysis().
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxlens
from jaxlens.models import decoder
from jaxlens.lens import stats as lens_mod
from jaxlens.lens import stream
from jaxlens.models.loader import Model
from jaxlens.models.spec import spec_from_config


def timed(fn, repeats):
    fn()  # warm-up / compile
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def make_model(d, vocab, n_layers, dtype):
    cfg = {"model_type": "gpt2", "n_embd": d, "n_layer": n_layers, "n_head": d // 64, "vocab_size": vocab,
           "n_positions": 4096}
    spec = spec_from_config(cfg)
    params = decoder.init_params(spec, jax.random.PRNGKey(0), dtype)
    return Model(spec, params)


def torch_loop_factory(model, fw, gold, top_k=20):
    import torch

    spec = model.spec
    res = torch.from_numpy(np.asarray(fw.residuals[:, 0], np.float32))          # [13, T, d]
    fn = model.params["final_norm"]
    ln1 = model.params["blocks"]["ln1"]
    scales = torch.from_numpy(np.concatenate([np.asarray(ln1["scale"]), np.asarray(fn["scale"])[None]]))
    biases = torch.from_numpy(np.concatenate([np.asarray(ln1["bias"]), np.asarray(fn["bias"])[None]]))
    W = torch.from_numpy(np.asarray(model.unembedding()[0], np.float32)).T.contiguous()   # [V, d] lm_head
    final_logits = torch.from_numpy(np.asarray(fw.logits[0], np.float32))
    g = torch.from_numpy(np.asarray(gold))
    eps = spec.norm_eps

    def layer_stats(h, w, b, logq):
        x = torch.nn.functional.layer_norm(h, (h.shape[-1],), w, b, eps)
        z = x @ W.T
        logp = torch.log_softmax(z, dim=-1)
        p = logp.exp()
        ent = -(p * logp).sum(-1) / np.log(2)
        kl = (p * (logp - logq)).sum(-1) / np.log(2)
        zg = z.gather(-1, g[:, None])
        rank = 1 + (z > zg).sum(-1)
        top = torch.topk(p, top_k, dim=-1)
        return ent, kl, rank, zg, top.values, top.indices

    def run(f):
        with torch.no_grad():
            logq = torch.log_softmax(final_logits, dim=-1)
            return [f(res[i], scales[i], biases[i], logq) for i in range(res.shape[0])]

    return layer_stats, run


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each blocking callable in ``fns``, timed in interleaved rounds after one warm-up each."""
    for f in fns.values():
        f()
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in ts.items()}


def cpu_name():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def bench_width(d, a):
    model = make_model(d, a.vocab, a.layers, a.dtype)
    rows = []
    for T in a.tokens:
        ids = np.random.default_rng(T).integers(0, a.vocab, (1, T))
        fw = model.forward(ids)
        jax.block_until_ready(fw)
        gold = ids[0]
        R = a.layers + 1
        flops = 2.0 * R * T * d * a.vocab
        r = {"d": d, "tokens": T, "streams": R, "vocab": a.vocab, "dtype": a.dtype, "gemm_gflop": flops / 1e9}

        W = model.unembedding()[0]
        X = jnp.asarray(np.random.default_rng(1).standard_normal((R * T, d)), W.dtype)
        gemm = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
        fns = {
            "forward_s": lambda: jax.block_until_ready(model.forward(ids).residuals),
            "jaxlens_s": lambda: jax.block_until_ready(jaxlens.lens_stats(
                model, fw, "norm", gold_ids=ids[:, 0], top_k=20, cosine=False, chunk=a.chunk).entropy_bits),
            "floor_gemm_s": lambda: gemm(X, W).block_until_ready(),
        }
        if not a.no_dense:
            fns["jaxlens_dense_s"] = lambda: jax.block_until_ready(jaxlens.lens_stats(
                model, fw, "norm", gold_ids=ids[:, 0], top_k=20, cosine=False, dense=True).entropy_bits)
        if not a.no_torch:
            import torch

            torch.set_num_threads(max(1, torch.get_num_threads()))
            f, run = torch_loop_factory(model, fw, gold)
            fns["torch_eager_s"] = lambda: run(f)
            if not a.no_compile:
                cf = torch.compile(f)
                t0 = time.perf_counter()
                run(cf)
                r["torch_compile_first_call_s"] = round(time.perf_counter() - t0, 1)
                fns["torch_compile_s"] = lambda: run(cf)
        r.update(interleaved(fns, a.repeats))
        del X

        # memory: temp bytes of the compiled decode (streaming vs dense), rows already normalised
        h = jax.ShapeDtypeStruct((T, R, d), W.dtype)
        th = jax.ShapeDtypeStruct((T, d), W.dtype)
        gs = jax.ShapeDtypeStruct((T,), jnp.int32)
        ws = jax.ShapeDtypeStruct(W.shape, W.dtype)
        for name, f in (("stream", lambda h, w, t, g: stream.stream_stats(h, w, teacher_h=t, gold=g, top_k=20,
                                                                          chunk=a.chunk)),
                        ("dense", lambda h, w, t, g: stream.dense_stats(h, w, teacher_h=t, gold=g, top_k=20))):
            try:
                mem = jax.jit(f).lower(h, ws, th, gs).compile().memory_analysis()
                r[f"{name}_temp_mb"] = round(mem.temp_size_in_bytes / 2**20, 1)
            except Exception as e:  # noqa: BLE001 - memory_analysis is best-effort on some backends
                r[f"{name}_temp_mb"] = f"n/a ({e.__class__.__name__})"
        r["dense_logits_mb"] = round(R * T * a.vocab * 4 / 2**20, 1)

        fwd, dec, gm = r["forward_s"], r["jaxlens_s"], r["floor_gemm_s"]
        r["floor_s"] = fwd + gm
        r["jaxlens_vs_floor"] = round((fwd + dec) / (fwd + gm), 3)
        r["decode_vs_gemm"] = round(dec / gm, 3)
        if "torch_eager_s" in r:
            r["speedup_vs_torch_eager"] = round(r["torch_eager_s"] / dec, 2)
            r["speedup_vs_torch_eager_incl_forward"] = round(r["torch_eager_s"] / (fwd + dec), 2)
            r["floor_speedup_vs_torch_eager"] = round(r["torch_eager_s"] / (fwd + gm), 2)
        if "torch_compile_s" in r:
            r["speedup_vs_torch_compile"] = round(r["torch_compile_s"] / dec, 2)
        r["jaxlens_gflops"] = round(flops / dec / 1e9, 1)
        r["gemm_gflops"] = round(flops / gm / 1e9, 1)
        r["loadavg"] = [round(x, 2) for x in os.getloadavg()]
        print(json.dumps(r), flush=True)
        rows.append(r)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, nargs="+", default=[768], help="model widths (a sweep, e.g. 512 768 1024)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=stream.DEFAULT_CHUNK)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense jaxlens path (slow, memory-hungry)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    meta = {"jax": jax.__version__, "device": str(jax.devices()[0]), "platform": platform.platform(),
            "processor": cpu_name(), "cores": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    rows = []
    for d in a.d:
        rows += bench_width(d, a)
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print("#", json.dumps(meta))
    print("# d  tokens  forward  jaxlens  floor-GEMM  (fw+jaxlens)/(fw+GEMM)  torch-eager  torch/jaxlens  "
          "torch/(fw+jaxlens)")
    for r in rows:
        te = r.get("torch_eager_s")
        print(f"# {r['d']:4d} {r['tokens']:6d} {r['forward_s']:8.3f} {r['jaxlens_s']:8.3f} {r['floor_gemm_s']:10.3f}"
              f"  {r['jaxlens_vs_floor']:22.3f}  " + (f"{te:11.3f}  {r['speedup_vs_torch_eager']:13.2f}  "
              f"{r['speedup_vs_torch_eager_incl_forward']:18.2f}" if te is not None else "-"))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
