"""Tuned-lens training at scale: per-device memory plans and the overhead of sharding on one host.

    python benchmarks/tuned_lens_scale.py --plan          # --plan-only tables (abstract parameters, fake devices)
    python benchmarks/tuned_lens_scale.py --throughput    # demo model: tokens/s, 1 device vs meshes of 8 fake devices

``--plan`` runs ``jaxlens train-lens --plan-only --fake-devices --json`` in a subprocess per (shape, mesh) for the
Llama-3-8B and -70B shapes (configs/shapes/, bf16 model, the tuned-lens recipe's 2^18 tokens of 2048 per step)
on meshes of 8 and 64 fake CPU devices, with the recipe's micro-batching and with one sequence per device per
micro-batch (``--micro-batch 1``), and prints a Markdown table.

``--throughput`` trains the bundled demo model's tuned lens for a few steps (fp32 lens GEMMs) on one device and on
8 fake CPU devices (data=8; data=2,fsdp=4; data=2,fsdp=2,tensor=2) -- the same plan everywhere -- and prints
the steady-state tokens/s (first step, the compile, excluded) from each lens card. On one CPU the 8 "devices"
share the same cores, so this measures the overhead of the partitioned program and its collectives, not a
speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = float(1 << 30)


def _env(n_devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}",
                PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAXLENS_COMPILE_CACHE="off")


def plan(shape: str, mesh: str, micro_batch=None) -> dict:
    sizes = dict(kv.split("=") for kv in mesh.split(","))
    n = 1
    for v in sizes.values():
        n *= int(v)
    cmd = [sys.executable, "-m", "jaxlens", "train-lens", "--plan-only", "--fake-devices", "--json", "--model",
           os.path.join(ROOT, "configs", "shapes", shape), "--dtype", "bfloat16", "--mesh", mesh]
    if micro_batch:
        cmd += ["--micro-batch", str(micro_batch)]
    p = subprocess.run(cmd, env=_env(n), capture_output=True, text=True, timeout=1200)
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    out = p.stdout
    return json.loads(out[out.index("\n{") + 1:])


def run_plans() -> None:
    rows = []
    cases = [("llama-3-8b", "data=8"), ("llama-3-8b", "data=2,fsdp=4"), ("llama-3-8b", "data=1,fsdp=8"),
             ("llama-3-8b", "data=2,fsdp=2,tensor=2"),
             ("llama-3-70b", "data=8,fsdp=8"), ("llama-3-70b", "data=1,fsdp=64"), ("llama-3-70b", "data=4,fsdp=8,tensor=2")]
    print("| shape | mesh | seqs / device / micro-batch | model / device (whole) | lens / device (whole) | "
          "optimizer / device | temporaries | peak estimate | compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape, mesh in cases:
        for mb in (None, 1):
            r = plan(shape, mesh, mb)
            pd, tot = r["per_device_bytes"], r["total_bytes"]
            rows.append(r)
            print(f"| {shape} | {mesh} | {r['plan']['sequences_per_device_per_micro_batch']} "
                  f"({'--micro-batch 1' if mb else 'auto'}) | {pd['model_params'] / GiB:.2f} ({tot['model_params'] / GiB:.1f}) | "
                  f"{pd['lens_params'] / GiB:.3f} ({tot['lens_params'] / GiB:.1f}) | {pd['optimizer_state'] / GiB:.3f} | "
                  f"{pd['temporaries'] / GiB:.1f} | **{pd['peak_estimate'] / GiB:.1f}** | {r['seconds']['compile']:.1f} |",
                  flush=True)


def run_throughput(steps: int) -> None:
    from jaxlens.demo.corpus import generate

    tmp = tempfile.mkdtemp(prefix="jaxlens-scale-")
    data = os.path.join(tmp, "train.txt")
    with open(data, "w") as f:
        f.write("\n\n".join(generate(seed=1, n_docs=3000)))
    print("| run | mesh | tokens / s (steady) | vs 1 device | first step s (compile) |")
    print("|---|---|---|---|---|")
    base = None
    for name, n, mesh in (("1 device", 1, None), ("8 fake", 8, "data=8"), ("8 fake", 8, "data=2,fsdp=4"),
                          ("8 fake", 8, "data=2,fsdp=2,tensor=2")):
        out = os.path.join(tmp, f"lens-{n}-{mesh or 'one'}")
        cmd = [sys.executable, "-m", "jaxlens", "train-lens", "--model", "demo", "--data", data, "--out", out,
               "--steps", str(steps), "--tokens-per-step", "4096", "--seq-len", "128", "--lens-matmul", "float32",
               "--checkpoint-every", str(steps), "--quiet"]
        if mesh:
            cmd += ["--mesh", mesh]
        p = subprocess.run(cmd, env=_env(n), capture_output=True, text=True, timeout=1800)
        if p.returncode:
            raise SystemExit(p.stderr[-3000:])
        card = json.load(open(os.path.join(out, "lens_card.json")))
        t = card["last_session"]
        tps = t["tokens_per_second"]
        base = base or tps
        print(f"| {name} | {mesh or '-'} | {tps:,.0f} | {tps / base:.2f}x | {t['first_step_seconds']:.1f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", action="store_true")
    ap.add_argument("--throughput", action="store_true")
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    if not (a.plan or a.throughput):
        a.plan = a.throughput = True
    if a.plan:
        run_plans()
    if a.throughput:
        run_throughput(a.steps)


if __name__ == "__main__":
    main()
