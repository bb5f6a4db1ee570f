"""Throughput of ``jaxlens sweep`` (norm + logit lenses, last position, every layer) on a prompt set of mixed
lengths, against three contestants on the SAME prompts:

* ``torch-loop``     the reference probe's style: one prompt at a time, the HF forward with hidden states, then
                     per layer and lens: norm -> lm_head -> log_softmax -> entropy, KL to final, answer rank /
                     probability, top-5 (a prefix of the prompts; prompts/s is what is compared);
* ``torch-batched``  what a careful PyTorch user writes: the sweep's own length buckets and batches, one forward
                     with hidden states per batch, every layer's last-position row of both lenses normalised at
                     once and unembedded in layer chunks, the same statistics batched (top-k, rank by count);
* ``floor``          jaxlens's own floor: the bare jitted forward (residuals only) of the same padded batches plus
                     ONE bare GEMM of every real prompt's last-position lens rows (both lenses, every layer)
                     against the unembedding (a max over the vocab keeps it alive) — the work no sweep can avoid.

``jaxlens`` is ``jaxlens.sweep(model, prompts, out, lenses="norm,logit")`` with everything it writes (Parquet
tables, manifest, metrics of the probe incl. copy flags, cosines, surface masses, summaries). "cold" includes
XLA compilation; "warm" is a second sweep in the same process (its compiled step is reused).

``--interleaved`` times the floor, jaxlens's step + its host work (the probe's metrics, rows, Arrow tables),
torch-batched and the torch loop (``--loop-every`` prompts of each batch) batch by batch in turn, so that load
from other processes on a shared machine hits every contestant alike; the ratios come from those sums.

Peak RSS: ``--rss N1,N2`` runs the sweep CLI in fresh processes over N1 and N2 prompts and reports each one's
peak resident memory (VmHWM). ``--two-process`` compares 2 processes (jax.distributed on 127.0.0.1, one
fake CPU device each, mesh data=2) with 1 process on the same prompts.

Usage: python benchmarks/sweep.py [--model smollm2] [--prompts 1000] [--loop-prompts 60]
                                  [--rss 1000,10000] [--rss-model demo] [--two-process 200] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or have "
         "had one their not but all new first two after time year people city world state country river king war "
         "school music capital France Paris Germany Berlin Italy Rome Spain Madrid Japan Tokyo called simply "
         "language history north south population university government church family century").split()


def make_prompts(path: str, n: int, seed: int = 0) -> None:
    """n prompts of mixed lengths (log-uniform 3..160 words: mostly short, a tail of long ones)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            k = int(np.exp(rng.uniform(np.log(3), np.log(160))))
            f.write(json.dumps({"id": f"p{i}", "prompt": " ".join(rng.choice(WORDS, k)),
                                "answer": str(rng.choice(["Paris", "Berlin", "Rome", "city", "the"]))}) + "\n")


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


# --------------------------------------------------------------------------------------------------
# the sweep's batches (shared by the floor and torch-batched)


def plan(model, prompts_path, batch_tokens):
    from jaxlens.probe import gold as G
    from jaxlens.probe.suite import load_suite
    from jaxlens.sweep import engine as E
    from jaxlens.sweep import inputs as I
    from jaxlens.sweep.run import prepare_window

    ps = I.read_prompts(prompts_path)
    tok = model.tokenizer
    th = load_suite("reference").thresholds
    jobs, _ = prepare_window(tok, ps.rows, bos=G.tokenizer_prepends_bos(tok), max_len=model.spec.max_positions,
                             vocab=model.spec.vocab_size, decode=G.token_decoder(tok), th=th)
    lengths = E.bucket_lengths(model.spec.max_positions, None, batch_tokens)
    batch_of = {L: E.batch_size_for(L, batch_tokens, None, 1) for L in lengths}
    return E.plan_window(0, [j for j, _, _ in jobs], lengths, batch_of)


def floor_run(model, batches) -> float:
    import jax
    import jax.numpy as jnp

    from jaxlens.models import decoder

    spec = model.spec
    n = spec.n_layers

    import functools

    @functools.partial(jax.jit, static_argnums=(4,))
    def bare(params, ids, mask, last, n_real):
        res = decoder.apply(spec, params, ids, mask).residuals                               # [n+1, B, T, d]
        rows = jnp.take_along_axis(res, last[None, :, None, None], axis=2)[:, :n_real, 0]   # [n+1, b, d] real rows
        rows = jnp.concatenate([rows, rows], 0).reshape(-1, rows.shape[-1])                   # 2 lenses
        W, _ = decoder.unembedding(spec, params)
        z = jnp.dot(rows, W.astype(rows.dtype), preferred_element_type=jnp.float32)
        return jnp.max(z, axis=-1)

    def go():
        outs = [bare(model.params, jnp.asarray(b.ids), jnp.asarray(b.mask), jnp.asarray(b.last), len(b.jobs))
                for b in batches]
        jax.block_until_ready(outs)

    go()                                       # compile every shape
    t0 = time.perf_counter()
    go()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------
# PyTorch contestants


def torch_model(model_source: str):
    from transformers import AutoModelForCausalLM

    from jaxlens.models.loader import resolve_source

    path = resolve_source(model_source)
    if path.endswith(".gguf"):
        tm = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                  dtype="float32")
    else:
        tm = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    return tm.eval()


def _parts(tm):
    base = tm.model
    return list(base.layers), [l.input_layernorm for l in base.layers], base.norm, tm.get_output_embeddings()


def _stats(logp, logq, gold, k=5):
    """entropy, KL(P || Q), rank of gold, p(gold), top-k of log-probs [R, V] (float32) against the final logq [V]."""
    import torch

    p = logp.exp()
    ent = -(p * logp).sum(-1) / np.log(2)
    kl = (p * (logp - logq)).sum(-1) / np.log(2)
    g = logp[:, gold]
    rank = 1 + (logp > g[:, None]).sum(-1)
    top = torch.topk(logp, k, dim=-1)
    return ent, kl, rank, g.exp(), top


def torch_loop(tm, jobs, k=5) -> tuple:
    """One prompt at a time; per layer and lens one norm -> lm_head -> log_softmax -> statistics."""
    import torch

    layers, in_norms, final_norm, head = _parts(tm)
    n = len(layers)
    out = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for j in jobs:
            ids = torch.as_tensor([j.ids])
            cap = {}
            hk = layers[-1].register_forward_hook(lambda m, i, o: cap.__setitem__("x", o[0] if isinstance(o, tuple) else o))
            o = tm(ids, output_hidden_states=True, use_cache=False)
            hk.remove()
            hs = list(o.hidden_states[:n]) + [cap["x"]]
            logq = torch.log_softmax(o.logits[0, -1].float(), -1)
            gold = j.gold.first_id if (j.gold is not None and j.gold.ok) else 0
            rows = []
            for lens in ("norm", "logit"):
                for layer in range(n + 1):
                    h = hs[layer][0, -1]
                    norm = final_norm if (lens == "logit" or layer == n) else in_norms[layer]
                    logp = torch.log_softmax(head(norm(h)).float(), -1)[None]
                    rows.append(_stats(logp, logq, gold, k))
            out.append(rows)
    return time.perf_counter() - t0, out


def torch_batched(tm, batches, k=5, chunk_layers=8) -> float:
    import torch

    layers, in_norms, final_norm, head = _parts(tm)
    n = len(layers)
    W = head.weight                                                                   # [V, d]
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            ids = torch.as_tensor(b.ids, dtype=torch.long)
            mask = torch.as_tensor(b.mask, dtype=torch.long)
            last = torch.as_tensor(b.last, dtype=torch.long)
            cap = {}
            hk = layers[-1].register_forward_hook(lambda m, i, o: cap.__setitem__("x", o[0] if isinstance(o, tuple) else o))
            o = tm(ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            hk.remove()
            hs = list(o.hidden_states[:n]) + [cap["x"]]
            B = ids.shape[0]
            ar = torch.arange(B)
            H = torch.stack([h[ar, last] for h in hs])                                # [n+1, B, d]
            norm_rows = torch.stack([(in_norms[l] if l < n else final_norm)(H[l]) for l in range(n + 1)])
            logit_rows = final_norm(H)
            logq = torch.log_softmax(o.logits[ar, last].float(), -1)                 # [B, V]
            gold = torch.as_tensor(np.maximum(b.gold, 0), dtype=torch.long)
            for rows in (norm_rows, logit_rows):
                for s in range(0, n + 1, chunk_layers):
                    z = torch.einsum("lbd,vd->lbv", rows[s:s + chunk_layers], W).float()
                    logp = torch.log_softmax(z, -1)
                    p = logp.exp()
                    ent = -(p * logp).sum(-1)
                    kl = (p * (logp - logq[None])).sum(-1)
                    g = logp.gather(-1, gold[None, :, None].expand(logp.shape[0], B, 1))
                    rank = 1 + (logp > g).sum(-1)
                    top = torch.topk(logp, k, dim=-1)
                    del ent, kl, rank, top
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------
# interleaved per batch: the machine is shared, so the contestants alternate batch by batch


def interleaved(model, tm, batches, loop_every: int, skip: set) -> dict:
    """Per batch, in turn: the floor, jaxlens (engine step + the writer's host work for the batch: the probe's
    metrics, rows, Arrow conversion), torch-batched, and the per-prompt torch loop on ``loop_every`` of the
    batch's prompts. Returns the summed seconds of each (the loop's per prompt)."""
    import functools

    import jax
    import jax.numpy as jnp

    from jaxlens.models import decoder
    from jaxlens.probe import gold as G
    from jaxlens.probe.metrics import ReferenceQuirks
    from jaxlens.probe.suite import load_suite
    from jaxlens.sweep import engine as E
    from jaxlens.sweep import tables as TB
    from jaxlens.sweep.run import _plans

    spec = model.spec
    th = load_suite("reference").thresholds
    plans = _plans(model, [("norm", "norm", {}), ("logit", "logit", {})])
    eng = E.Engine(model, ["norm", "logit"], top_k=50)
    decode = G.token_decoder(model.tokenizer)
    schema = TB.schemas(th, 5, {}, False, False)
    copy_cols = TB.copy_columns(th)

    @functools.partial(jax.jit, static_argnums=(4,))
    def bare(params, ids, mask, last, n_real):
        res = decoder.apply(spec, params, ids, mask).residuals
        rows = jnp.take_along_axis(res, last[None, :, None, None], axis=2)[:, :n_real, 0]
        rows = jnp.concatenate([rows, rows], 0).reshape(-1, rows.shape[-1])
        W, _ = decoder.unembedding(spec, params)
        return jnp.max(jnp.dot(rows, W.astype(rows.dtype), preferred_element_type=jnp.float32), axis=-1)

    def floor(b):
        jax.block_until_ready(bare(model.params, jnp.asarray(b.ids), jnp.asarray(b.mask), jnp.asarray(b.last),
                                   len(b.jobs)))

    def ours(b):
        out = eng.run(b)
        host = eng.fetch(out, 0, b.size)
        lt, pt = TB.TableBuilder(schema["layers"]), TB.TableBuilder(schema["prompts"])
        for i, job in enumerate(b.jobs):
            res = TB.prompt_metrics(host, i, job, plans, n=spec.n_layers, V=spec.vocab_size, decode=decode, th=th,
                                    quirks=ReferenceQuirks(), top_k=5)
            for lp, cols, s in res:
                for r in TB.layer_rows(cols, job, lp.name, decode, 5, copy_cols):
                    lt.add(r)
                pt.add(TB.prompt_row(job, lp.name, s, n_layers=spec.n_layers, th=th, status="ok", detail=None,
                                     carried={}, n_tokens=len(job.ids)))
        lt.table(), pt.table()

    t = {"floor": 0.0, "jaxlens": 0.0, "torch_batched": 0.0, "torch_loop": 0.0, "loop_prompts": 0}
    for b in batches:                                        # compile every shape first
        floor(b)
        ours(b)
    for b in batches:
        t0 = time.perf_counter()
        floor(b)
        t1 = time.perf_counter()
        ours(b)
        t2 = time.perf_counter()
        t["floor"] += t1 - t0
        t["jaxlens"] += t2 - t1
        if tm is not None and "torch-batched" not in skip:
            t["torch_batched"] += torch_batched(tm, [b])
        if tm is not None and "torch-loop" not in skip and loop_every:
            sel = b.jobs[::max(1, len(b.jobs) // loop_every)][:loop_every]
            t["torch_loop"] += torch_loop(tm, sel)[0]
            t["loop_prompts"] += len(sel)
    return t


# --------------------------------------------------------------------------------------------------
# jaxlens


def jaxlens_run(model, prompts, out, **kw) -> dict:
    import jaxlens

    t0 = time.perf_counter()
    r = jaxlens.sweep(model, prompts, out, lenses="norm,logit", progress=False, return_tables=False, **kw)
    wall = time.perf_counter() - t0
    st = r.models[next(iter(r.models))]["manifest"]["stats"]
    return {"wall_s": wall, "stats": st}


def child(args) -> None:
    """--child: one CLI-like sweep in this fresh process; prints its peak RSS."""
    import jaxlens

    t0 = time.perf_counter()
    r = jaxlens.sweep(args.model, args.child_prompts, args.child_out, lenses="norm,logit", progress=False,
                      return_tables=False)
    st = r.models[next(iter(r.models))]["manifest"]["stats"]
    print(json.dumps({"maxrss_mb": _vm_hwm_mb(),
                      "wall_s": time.perf_counter() - t0, "prompts_per_s": st["prompts_per_s"],
                      "prompts": st["prompts_computed"]}))


def _vm_hwm_mb() -> float:
    """Peak resident memory of this process image (VmHWM; unlike ru_maxrss it is not inherited through fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_runs(model_src, counts, tmp) -> list:
    out = []
    for n in counts:
        p = os.path.join(tmp, f"rss-{n}.jsonl")
        make_prompts(p, n, seed=7)
        r = subprocess.run([sys.executable, __file__, "--child", "--model", model_src, "--child-prompts", p,
                            "--child-out", os.path.join(tmp, f"rss-{n}")], capture_output=True, text=True,
                           env=dict(os.environ, JAXLENS_COMPILE_CACHE="off"))
        if r.returncode:
            raise RuntimeError(r.stderr[-2000:])
        out.append(dict(json.loads(r.stdout.strip().splitlines()[-1]), n=n, model=model_src))
        print(f"rss {model_src} {n} prompts: {out[-1]}", flush=True)
    return out


def two_process(model_src, n, tmp) -> dict:
    import socket

    p = os.path.join(tmp, f"two-{n}.jsonl")
    make_prompts(p, n, seed=9)
    env = dict(os.environ, JAXLENS_COMPILE_CACHE="off", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    base = [sys.executable, "-m", "jaxlens.cli", "sweep", "--model", model_src, "--prompts", p, "--lens", "norm,logit",
            "--quiet"]
    t0 = time.perf_counter()
    r = subprocess.run(base + ["--out", os.path.join(tmp, "one")], env=env, capture_output=True, text=True)
    one_wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-2000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(base + ["--out", os.path.join(tmp, "two"), "--mesh", "data=2", "--coordinator",
                                      f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for q in procs:
        _, e = q.communicate()
        assert q.returncode == 0, e[-2000:]
    two_wall = time.perf_counter() - t0
    def stats(root):
        d = [x for x in os.listdir(root) if os.path.isdir(os.path.join(root, x))][0]
        with open(os.path.join(root, d, "manifest.json")) as f:
            return json.load(f)["stats"]
    s1, s2 = stats(os.path.join(tmp, "one")), stats(os.path.join(tmp, "two"))
    return {"prompts": n, "one_process": {"sweep_prompts_per_s": s1["prompts_per_s"], "command_wall_s": one_wall},
            "two_processes": {"sweep_prompts_per_s": s2["prompts_per_s"], "command_wall_s": two_wall}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--loop-prompts", type=int, default=60, help="prompts the per-prompt torch loop runs")
    ap.add_argument("--batch-tokens", type=int, default=3072)
    ap.add_argument("--rss", default=None, help="comma-separated prompt counts for the peak-RSS runs")
    ap.add_argument("--rss-model", default=None,
                    help="comma-separated models of the RSS runs and the 2-process run (default --model)")
    ap.add_argument("--two-process", type=int, default=0, help="prompts of the 1- vs 2-process comparison")
    ap.add_argument("--interleaved", action="store_true",
                    help="time floor / jaxlens / torch-batched / torch-loop batch by batch in turn (shared machines)")
    ap.add_argument("--loop-every", type=int, default=2, help="--interleaved: torch-loop prompts per batch")
    ap.add_argument("--skip", default="", help="comma-separated: jaxlens, floor, torch-batched, torch-loop")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-prompts", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    skip = set(x for x in args.skip.split(",") if x)
    import jax

    import jaxlens

    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "uptime_start": _uptime(), "model": args.model,
           "prompts": args.prompts, "python": platform.python_version(), "jax": jax.__version__,
           "device": jax.devices()[0].device_kind, "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        prompts = os.path.join(tmp, "prompts.jsonl")
        make_prompts(prompts, args.prompts)
        t0 = time.perf_counter()
        model = jaxlens.load_model(args.model)
        res["load_s"] = time.perf_counter() - t0
        batches = plan(model, prompts, args.batch_tokens)
        real = sum(len(j.ids) for b in batches for j in b.jobs)
        res["batches"] = len(batches)
        res["real_tokens"] = real
        res["padded_tokens"] = sum(b.size * b.length for b in batches)
        lengths = [len(j.ids) for b in batches for j in b.jobs]
        res["prompt_tokens"] = {"min": min(lengths), "median": float(np.median(lengths)), "max": max(lengths)}
        print(json.dumps({k: res[k] for k in ("batches", "real_tokens", "padded_tokens", "prompt_tokens")}), flush=True)
        if "jaxlens" not in skip:
            cold = jaxlens_run(model, prompts, os.path.join(tmp, "j1"), batch_tokens=args.batch_tokens)
            warm = jaxlens_run(model, prompts, os.path.join(tmp, "j2"), batch_tokens=args.batch_tokens)
            res["jaxlens"] = {"cold_wall_s": cold["wall_s"], "warm_wall_s": warm["wall_s"],
                              "warm_prompts_per_s": args.prompts / warm["wall_s"],
                              "warm_sweep_s": warm["stats"]["wall_s"], "compiles": warm["stats"]["compiles"],
                              "padding_efficiency": warm["stats"]["padding_efficiency"]}
            print("jaxlens", json.dumps(res["jaxlens"]), flush=True)
        if "floor" not in skip:
            fs = [floor_run(model, batches)]
            if "jaxlens" not in skip:            # the machine is shared: a second jaxlens / floor pair, minima kept
                w2 = jaxlens_run(model, prompts, os.path.join(tmp, "j3"), batch_tokens=args.batch_tokens)
                res["jaxlens"]["warm_wall_s_runs"] = [res["jaxlens"]["warm_wall_s"], w2["wall_s"]]
                res["jaxlens"]["warm_wall_s"] = min(res["jaxlens"]["warm_wall_s_runs"])
                res["jaxlens"]["warm_prompts_per_s"] = args.prompts / res["jaxlens"]["warm_wall_s"]
                fs.append(floor_run(model, batches))
            res["floor"] = {"wall_s": min(fs), "runs_s": fs, "prompts_per_s": args.prompts / min(fs)}
            print("floor", json.dumps(res["floor"]), flush=True)
        tm = None
        if not ({"torch-batched", "torch-loop"} <= skip):
            import torch

            res["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads()}
            tm = torch_model(args.model)
        if args.interleaved:
            iv = interleaved(model, tm, batches, args.loop_every, skip)
            n = sum(len(b.jobs) for b in batches)
            res["interleaved"] = {
                "seconds": iv, "floor_prompts_per_s": n / iv["floor"], "jaxlens_prompts_per_s": n / iv["jaxlens"],
                "jaxlens_over_floor": iv["jaxlens"] / iv["floor"],
                "torch_batched_prompts_per_s": (n / iv["torch_batched"]) if iv["torch_batched"] else None,
                "torch_loop_prompts_per_s": (iv["loop_prompts"] / iv["torch_loop"]) if iv["torch_loop"] else None}
            print("interleaved", json.dumps(res["interleaved"]), flush=True)
        elif tm is not None:
            if "torch-batched" not in skip:
                tb = torch_batched(tm, batches)
                res["torch_batched"] = {"wall_s": tb, "prompts_per_s": args.prompts / tb}
                print("torch-batched", json.dumps(res["torch_batched"]), flush=True)
            if "torch-loop" not in skip:
                jobs = [j for b in batches for j in b.jobs]
                sel = [jobs[i] for i in np.random.default_rng(1).permutation(len(jobs))[:args.loop_prompts]]
                tl, _ = torch_loop(tm, sel)
                res["torch_loop"] = {"prompts": len(sel), "wall_s": tl, "prompts_per_s": len(sel) / tl}
                print("torch-loop", json.dumps(res["torch_loop"]), flush=True)
        del tm, model
        rss_models = (args.rss_model or args.model).split(",")
        if args.rss:
            res["rss"] = [r for mname in rss_models
                          for r in rss_runs(mname, [int(x) for x in args.rss.split(",")], tmp)]
        if args.two_process:
            res["two_process"] = two_process(rss_models[0], args.two_process, tmp)
            print("two-process", json.dumps(res["two_process"]), flush=True)
    res["uptime_end"] = _uptime()
    j = res.get("jaxlens", {}).get("warm_prompts_per_s")
    if j:
        for k in ("floor", "torch_batched", "torch_loop"):
            if k in res:
                res[f"speed_vs_{k}"] = j / res[k]["prompts_per_s"]
    iv = res.get("interleaved")
    if iv:
        for k in ("floor", "torch_batched", "torch_loop"):
            if iv.get(f"{k}_prompts_per_s"):
                res[f"interleaved_speed_vs_{k}"] = iv["jaxlens_prompts_per_s"] / iv[f"{k}_prompts_per_s"]
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
