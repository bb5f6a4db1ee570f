"""Tuned-lens training throughput: ``jaxlens train-lens`` vs the tuned-lens package's ``tuned-lens train``.

Usage:
    python benchmarks/train_lens.py --tuned-lens-python /tmp/tlvenv/bin/python [--steps 4]
        [--tokens-per-step 8192] [--seq-len 256] [--work /tmp/jaxlens-bench-train] [--json out.json]

Both train the same tiny Llama checkpoint (d=256, 4 blocks, 4 heads, V=8003; built with tests/hf_factory.py,
random weights) on the same JSONL file (text from jaxlens.demo.corpus, 20,000 documents) with the same
recipe: the package's defaults (KL(final || lens) at every position, every translator every step, SGD
Nesterov 0.9, lr 0.1, coupled weight decay 1e-3, clip 1.0, linear decay), sequences of ``seq_len`` tokens,
``tokens_per_step`` tokens per step, ``steps`` steps. Both pack documents joined with EOS and shuffle the
sequences with their own RNG (so the batches hold the same kind of tokens, not the same sequence order).

The package runs in its own virtualenv (never in jaxlens's; see docs/tuned_lens.md for the pins it needs
with current torch / transformers), through its CLI entry point ``tuned_lens.__main__.main`` with
``tqdm.auto.trange`` wrapped to time-stamp every micro-batch. Contestants:

* ``tuned-lens``            the package as shipped: per-GPU batch 1 (its default), lens + loss under
                            ``torch.autocast(bfloat16)`` (what it does on any device, also the CPU);
* ``tuned-lens (batch 8)``  the same with ``--per_gpu_batch_size 8``;
* ``tuned-lens (batch 8, fp32)``  additionally with autocast disabled (a modification, labelled as such:
                            bf16 matmuls are slow on CPUs without native bf16);
* ``jaxlens``               ``jaxlens train-lens --recipe tuned-lens`` (fp32 model, fp32 lens parameters; the
                            recipe's bf16 operands of the vocabulary GEMMs with fp32 accumulation and
                            statistics: the precision the package's autocast gives its lens and loss).
* ``jaxlens (fp32 lens GEMMs)``  with ``--jaxlens-fp32``: the same plus ``--lens-matmul float32``.

Throughput = tokens per second (wall clock) in steady state: the first optimizer step (jaxlens: XLA compile;
torch: warm-up) is excluded. Contestants run interleaved ``--repeats`` times; the best and the median are
reported (tokens per CPU-second are recorded too, but torch's OpenMP threads spin while waiting, so that
figure flatters jaxlens and is not used for the comparison); end-to-end wall time of each command (incl. startup, tokenisation, compile) is
reported too. Finally both lenses are scored by ``jaxlens eval-lens`` on held-out text (the package's lens
is read in its own format), as a check that the two trainings did the same job.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

TL_DRIVER = r'''
import json, os, sys, time
import torch
import tuned_lens.scripts.train_loop as tl
from tqdm.auto import trange as _trange
stamps = []
def trange(*a, **kw):
    for i in _trange(*a, **kw):
        stamps.append((time.perf_counter(), time.process_time()))
        yield i
    stamps.append((time.perf_counter(), time.process_time()))
tl.trange = trange
from tuned_lens.__main__ import main
if os.environ.get("BENCH_NO_AUTOCAST") == "1":      # after the import: eval_loop uses autocast as a decorator
    class _NoAutocast:
        def __init__(self, *a, **kw): pass
        def __enter__(self): return self
        def __exit__(self, *a): return False
        def __call__(self, fn): return fn
    tl.th.autocast = _NoAutocast
try:
    main(sys.argv[1:])
finally:
    json.dump({"stamps": stamps, "threads": torch.get_num_threads(), "torch": torch.__version__},
              open(os.environ["BENCH_STAMPS"], "w"))
'''


def build(work: str) -> tuple[str, str, str]:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import hf_factory as F

    from jaxlens.demo.corpus import generate

    ckpt = os.path.join(work, "llama")
    if not os.path.exists(os.path.join(ckpt, "model.safetensors")):
        F.build_checkpoint("llama", ckpt, seed=3, tokenizer_vocab=2000, config_overrides=dict(
            vocab_size=8003, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, head_dim=64, attention_bias=False, mlp_bias=False, max_position_embeddings=512))
    data = os.path.join(work, "train.jsonl")
    if not os.path.exists(data):
        with open(data, "w") as f:
            for d in generate(seed=11, n_docs=20000):
                f.write(json.dumps({"text": d}) + "\n")
    held = os.path.join(work, "heldout.txt")
    if not os.path.exists(held):
        with open(held, "w") as f:
            f.write("\n\n".join(generate(seed=12, n_docs=1500)))
    return ckpt, data, held


def _pin(a) -> tuple[list, dict]:
    """taskset prefix and thread-count env for --cpus (both contestants get the same cores and threads)."""
    if not a.cpus:
        return [], {}
    n = len(a.cpus.split(","))
    return ["taskset", "-c", a.cpus], {"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}


def run_jaxlens(ckpt, data, out, a, extra=(), name="jaxlens") -> dict:
    pre, penv = _pin(a)
    cmd = pre + [sys.executable, "-m", "jaxlens", "train-lens", "--model", ckpt, "--data", data, "--out", out,
           "--steps", str(a.steps), "--tokens-per-step", str(a.tokens_per_step), "--seq-len", str(a.seq_len),
           "--recipe", "tuned-lens", "--checkpoint-every", str(a.steps), "--quiet"] + list(extra)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **penv))
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"jaxlens failed:\n{p.stderr[-3000:]}")
    card = json.load(open(os.path.join(out, "lens_card.json")))
    s = card["last_session"]
    return {"name": name, "tokens_per_second": s["tokens_per_second"],
            "tokens_per_cpu_second": s["steps_timed"] * card["training"]["tokens_per_step"] / s["cpu_seconds"],
            "first_step_seconds": s["first_step_seconds"],
            "steady_seconds_per_step": s["seconds"] / s["steps_timed"], "wall_seconds": wall,
            "tokens_per_step": card["training"]["tokens_per_step"], "micro_batches": card["training"]["micro_batches"],
            "lens": out}


def run_tuned_lens(python, ckpt, data, out, a, batch: int, autocast: bool, work: str) -> dict:
    driver = os.path.join(work, "tl_driver.py")
    with open(driver, "w") as f:
        f.write(TL_DRIVER)
    stamps_path = os.path.join(work, f"stamps-{batch}-{int(autocast)}.json")
    env = dict(os.environ, BENCH_STAMPS=stamps_path, BENCH_NO_AUTOCAST="0" if autocast else "1",
               WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    env.pop("XLA_FLAGS", None)
    pre, penv = _pin(a)
    env.update(penv)
    cmd = pre + [python, driver, "train", "--model.name", ckpt, "--data.name", data, "--max_length", str(a.seq_len),
           "--num_steps", str(a.steps), "--tokens_per_step", str(a.tokens_per_step), "--per_gpu_batch_size",
           str(batch), "-o", out]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"tuned-lens failed:\n{p.stderr[-3000:]}")
    st = json.load(open(stamps_path))
    stamps = st["stamps"]
    m = re.search(r"Gradient accumulation steps: (\d+)", p.stdout + p.stderr)
    acc = int(m.group(1)) if m else (len(stamps) - 1) // a.steps
    steady = (stamps[-1][0] - stamps[acc][0]) / (a.steps - 1)
    steady_cpu = (stamps[-1][1] - stamps[acc][1]) / (a.steps - 1)
    name = f"tuned-lens (batch {batch}{'' if autocast else ', fp32: autocast disabled'})" if batch != 1 or not autocast \
        else "tuned-lens"
    return {"name": name, "tokens_per_second": a.tokens_per_step / steady,
            "tokens_per_cpu_second": a.tokens_per_step / steady_cpu, "steady_seconds_per_step": steady,
            "first_step_seconds": stamps[acc][0] - stamps[0][0], "wall_seconds": wall, "micro_batches": acc,
            "per_gpu_batch_size": batch, "autocast_bf16": autocast, "torch_threads": st["threads"],
            "torch": st["torch"], "lens": out}


def evaluate(ckpt, held, lens_dir) -> list:
    import jaxlens
    from train_tuned.evaluate import evaluate_lens

    model = jaxlens.load_model(ckpt)
    res = evaluate_lens(model, jaxlens.load_lens(lens_dir, model=model), held, seq_len=256, max_tokens=16384,
                        progress=False)
    return {"logit_kl_nats": res["logit"]["kl_nats"], "tuned_kl_nats": res["tuned"]["kl_nats"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tuned-lens-python", required=True, help="python of a virtualenv with tuned-lens installed")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--tokens-per-step", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--work", default="/tmp/jaxlens-bench-train")
    ap.add_argument("--skip-batch1", action="store_true", help="skip the package's (slow) batch-1 default")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats per contestant (best reported)")
    ap.add_argument("--cpus", default=None, help="pin both contestants to these cores (taskset list, e.g. '1'), "
                    "with as many threads")
    ap.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation of the trained lenses")
    ap.add_argument("--jaxlens-fp32", action="store_true",
                    help="also run jaxlens with --lens-matmul float32 (the recipe default is bf16 GEMM operands)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    os.makedirs(a.work, exist_ok=True)
    ckpt, data, held = build(a.work)
    load = os.getloadavg()
    import shutil
    import statistics

    names = ("jaxlens",) + (("jaxlens-fp32",) if a.jaxlens_fp32 else ()) + ("tl-8", "tl-8-fp32") + (
        () if a.skip_batch1 else ("tl-1",))
    runs: dict[str, list] = {n: [] for n in names}
    for rep in range(a.repeats):                      # interleaved, so a load change hits every contestant
        for name in names:
            out = os.path.join(a.work, f"out-{name}")
            shutil.rmtree(out, ignore_errors=True)
            if name == "jaxlens":
                r = run_jaxlens(ckpt, data, out, a)
            elif name == "jaxlens-fp32":
                r = run_jaxlens(ckpt, data, out, a, ("--lens-matmul", "float32"), "jaxlens (fp32 lens GEMMs)")
            else:
                batch = 1 if name == "tl-1" else 8
                r = run_tuned_lens(a.tuned_lens_python, ckpt, data, out, a, batch, not name.endswith("fp32"), a.work)
            r["loadavg"] = os.getloadavg()[0]
            print(f"[{rep}] {r['name']:<48} {r['tokens_per_second']:>8.0f} tokens/s (steady step "
                  f"{r['steady_seconds_per_step']:.2f} s, first step {r['first_step_seconds']:.2f} s, wall "
                  f"{r['wall_seconds']:.1f} s, load {r['loadavg']:.1f})", flush=True)
            runs[name].append(r)
    results = []
    for name in names:
        best = max(runs[name], key=lambda r: r["tokens_per_second"])
        results.append(dict(best, tokens_per_second_median=statistics.median(
            r["tokens_per_second"] for r in runs[name]), tokens_per_second_runs=[
            r["tokens_per_second"] for r in runs[name]]))
    jl = results[0]
    print(f"\nbest of {a.repeats} (median) tokens/s:")
    for r in results:
        line = f"  {r['name']:<48} {r['tokens_per_second']:>8.0f} ({r['tokens_per_second_median']:.0f})"
        if r is not jl:
            r["jaxlens_speedup"] = jl["tokens_per_second"] / r["tokens_per_second"]
            r["jaxlens_speedup_median"] = jl["tokens_per_second_median"] / r["tokens_per_second_median"]
            line += f"   jaxlens {r['jaxlens_speedup']:.2f}x ({r['jaxlens_speedup_median']:.2f}x)"
        print(line, flush=True)
    ev = {} if a.no_eval else {r["name"]: evaluate(ckpt, held, r["lens"]) for r in results}
    for k, v in ev.items():
        print(f"held-out KL(final || lens) nats/token, {k}: " + " ".join(f"{x:.3f}" for x in v["tuned_kl_nats"]))
    if ev:
        print("held-out KL, logit lens:  " + " ".join(f"{x:.3f}" for x in next(iter(ev.values()))["logit_kl_nats"]))
    rec = {"model": "llama d=256 L=4 H=4 V=8003 (random, tests/hf_factory.py)", "steps": a.steps, "cpus": a.cpus,
           "tokens_per_step": a.tokens_per_step, "seq_len": a.seq_len, "platform": platform.platform(),
           "processor": platform.processor(), "cpu_count": os.cpu_count(), "loadavg_at_start": load,
           "loadavg_at_end": os.getloadavg(), "results": results, "runs": runs, "heldout_eval": ev}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rec, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
