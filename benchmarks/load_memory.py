"""Peak host memory of jaxlens.load_model vs the checkpoint size.

Usage: python benchmarks/load_memory.py [--d 1024] [--layers 12] [--vocab 32000]
Writes a random Llama-shaped fp32 checkpoint (safetensors) to a temp dir, then loads it in a fresh process
and reports that process's peak RSS (VmHWM) minus the RSS of a process that only imported jax+jaxlens.
On the CPU backend the loaded parameters themselves live in host memory, so ~1.0x is the floor there;
on an accelerator the device copies do not count against host memory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

CHILD = r"""
import sys, time, json
import jax, jaxlens
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
base = hwm()
if sys.argv[2] == "load":
    t = time.perf_counter()
    m = jaxlens.load_model(sys.argv[1])
    jax.block_until_ready(m.params)
    dt = time.perf_counter() - t
else:
    dt = 0.0
peak = hwm()
print(json.dumps({"base_kib": base, "peak_kib": peak, "seconds": dt}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    a = ap.parse_args()
    from safetensors.numpy import save_file

    from jaxlens.models import convert
    from jaxlens.models import decoder
    from jaxlens.models.spec import spec_from_config

    cfg = {"model_type": "llama", "hidden_size": a.d, "intermediate_size": 4 * a.d, "num_hidden_layers": a.layers,
           "num_attention_heads": a.d // 64, "num_key_value_heads": a.d // 128, "vocab_size": a.vocab,
           "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    spec = spec_from_config(cfg)
    rng = np.random.default_rng(0)
    shapes = decoder.param_shapes(spec, np.float32)
    import jax

    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, dtype=np.float32) * 0.02, shapes)
    sd = convert.export_state_dict(spec, params)
    del params
    with tempfile.TemporaryDirectory() as d:
        save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        size = os.path.getsize(os.path.join(d, "model.safetensors"))
        del sd
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f)
        res = {}
        for mode in ("import", "load"):
            out = subprocess.run([sys.executable, "-c", CHILD, d, mode], capture_output=True, text=True, check=True)
            res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    extra = (res["load"]["peak_kib"] - res["import"]["peak_kib"]) * 1024
    print(json.dumps({"checkpoint_mb": round(size / 2**20, 1), "load_peak_extra_mb": round(extra / 2**20, 1),
                      "ratio_to_checkpoint": round(extra / size, 2), "load_seconds": round(res["load"]["seconds"], 2)}))


if __name__ == "__main__":
    main()
