"""Real models and the compile cache: GGUF load time and peak host memory, and `jaxlens probe` wall time cold
and warm (a fresh on-disk XLA cache, then the same command again), with byte-identical outputs checked.

    python benchmarks/real_models.py [--models smollm2,gemma3-270m] [--probe demo,smollm2] [--json OUT]

Each measurement runs in its own process. Peak memory is the process's max RSS (ru_maxrss) minus its RSS just
before `load_model` (jax, transformers and gguf already imported), next to the dequantised parameters' size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

_LOAD = r"""
import json, resource, sys, time
import jax, jaxlens, numpy as np
from jaxlens.models import gguf as _g, packaged
import transformers  # noqa: F401
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
path = packaged.resolve(sys.argv[1])
before = rss()
t0 = time.perf_counter()
m = jaxlens.load_model(sys.argv[1])
jax.block_until_ready(m.params)
t1 = time.perf_counter()
nbytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(m.params))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"model": sys.argv[1], "file_mb": round(__import__("os").path.getsize(path) / 2**20, 1),
                  "load_s": round(t1 - t0, 2), "params_mb": round(nbytes / 2**20, 1),
                  "rss_before_mb": round(before, 1), "peak_rss_mb": round(peak, 1),
                  "peak_minus_before_mb": round(peak - before, 1)}))
"""


def measure_load(name: str) -> dict:
    r = subprocess.run([sys.executable, "-c", _LOAD, name], capture_output=True, text=True, timeout=1200)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def _probe(model: str, out: str, cache: str) -> float:
    env = dict(os.environ, JAXLENS_COMPILE_CACHE=cache)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "jaxlens", "probe", "--quiet", "--model", model, "--out", out],
                       capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    return time.perf_counter() - t0


def measure_probe(model: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "xla")
        cold = _probe(model, os.path.join(tmp, "cold"), cache)
        warm = _probe(model, os.path.join(tmp, "warm"), cache)
        files = sorted(os.listdir(os.path.join(tmp, "cold")))
        same = all(open(os.path.join(tmp, "cold", f), "rb").read() == open(os.path.join(tmp, "warm", f), "rb").read()
                   for f in files)
        n_cache = sum(len(fs) for _, _, fs in os.walk(cache))
    return {"model": model, "cold_s": round(cold, 2), "warm_s": round(warm, 2), "speedup": round(cold / warm, 2),
            "files": len(files), "byte_identical": same, "cache_entries": n_cache}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,gemma3-270m")
    ap.add_argument("--probe", default="demo,smollm2")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load": [], "probe": []}
    for name in filter(None, a.models.split(",")):
        out["load"].append(measure_load(name))
        print(json.dumps(out["load"][-1]), flush=True)
    for name in filter(None, a.probe.split(",")):
        out["probe"].append(measure_probe(name))
        print(json.dumps(out["probe"][-1]), flush=True)
    out["loadavg"] = os.getloadavg()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
