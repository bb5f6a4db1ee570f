"""Peak host memory of ``jaxlens.load_model`` vs the bytes of the parameters it returns.

Usage:
    python benchmarks/load_memory.py                      # demo, smollm2 fp32/bf16, gemma3-270m fp32/bf16
    python benchmarks/load_memory.py --models smollm2 --dtypes float32 --repeat 3
    python benchmarks/load_memory.py --synthetic [--d 1024] [--layers 12] [--vocab 32000]

Each measurement is a fresh Python process that imports jax + jaxlens and starts the jax backend, records
its resident memory (VmRSS), resets the high-water mark (``/proc/self/clear_refs``, so import-time peaks do not count), calls
``load_model`` and blocks on the parameters, and reads the high-water mark again (VmHWM). The table shows
``peak increase = VmHWM after - VmRSS before`` and its ratio to the parameter bytes. Everything ``load_model``
does counts: imports it triggers (transformers for a GGUF config), the GGUF reader, dequantisation, staging.
On the CPU backend the parameters themselves live in host memory, so 1.0x is the floor there; on an
accelerator the device copies do not count against host memory.

Packaged models that are not installed (``jaxlens.models.packaged``) are skipped with a note.
``--synthetic`` writes a random Llama-shaped fp32 ``model.safetensors`` to a temp dir and loads that instead.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
import jax, numpy as np
import jaxlens

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

source, dtype = sys.argv[1], sys.argv[2]
jax.devices()                                        # the backend exists before any model does
base = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:     # VmHWM := VmRSS (Linux >= 4.0)
        f.write("5")
    reset = True
except OSError:
    reset = False
t = time.perf_counter()
m = jaxlens.load_model(source, dtype=dtype)
jax.block_until_ready(m.params)
dt = time.perf_counter() - t
peak = status("VmHWM")
after = status("VmRSS")
nbytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(m.params))
print(json.dumps({"base": base, "peak": peak, "after": after, "param_bytes": nbytes, "seconds": dt,
                  "hwm_reset": reset, "jaxlens": jaxlens.__file__}))
"""

DEFAULT_MODELS = ("demo", "smollm2", "gemma3-270m")
MB = 2 ** 20


def measure(source: str, dtype: str) -> dict:
    """One fresh-process measurement of ``load_model(source, dtype)``."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    out = subprocess.run([sys.executable, "-c", CHILD, source, dtype], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"load_model({source!r}, {dtype}) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def available(source: str) -> str | None:
    """None if ``source`` can be loaded here, else why not."""
    from jaxlens.models import packaged

    if source not in packaged.ALIASES:
        return None
    if packaged._package_dir(packaged.ALIASES[source]["module"]) is None:
        return f"not installed ({packaged.ALIASES[source]['install']})"
    return None


def synthetic_checkpoint(d: int, layers: int, vocab: int, directory: str) -> None:
    import jax
    import numpy as np
    from safetensors.numpy import save_file

    from jaxlens.models import convert, decoder
    from jaxlens.models.spec import spec_from_config

    cfg = {"model_type": "llama", "hidden_size": d, "intermediate_size": 4 * d, "num_hidden_layers": layers,
           "num_attention_heads": d // 64, "num_key_value_heads": d // 128, "vocab_size": vocab,
           "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    spec = spec_from_config(cfg)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, dtype=np.float32) * 0.02,
                          decoder.param_shapes(spec, np.float32))
    sd = convert.export_state_dict(spec, params)
    del params
    save_file(sd, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS))
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--repeat", type=int, default=1, help="processes per row (the row shows medians)")
    ap.add_argument("--json", action="store_true", help="also print each row as JSON")
    ap.add_argument("--synthetic", action="store_true", help="a random Llama-shaped safetensors checkpoint")
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    a = ap.parse_args()

    tmp = None
    models = a.models
    if a.synthetic:
        tmp = tempfile.TemporaryDirectory()
        synthetic_checkpoint(a.d, a.layers, a.vocab, tmp.name)
        models = [tmp.name]
    print("| model | dtype | params (MB) | baseline RSS (MB) | peak RSS increase (MB) | ratio | load (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    try:
        for source in models:
            why = available(source)
            if why:
                print(f"| {source} | - | - | - | skipped: {why} | - | - |")
                continue
            for dtype in a.dtypes:
                if source == "demo" and dtype != "float32" and "float32" in a.dtypes:
                    continue                                 # the demo is tiny: one row is enough
                runs = [measure(source, dtype) for _ in range(a.repeat)]
                r = runs[0]
                inc = statistics.median(x["peak"] - x["base"] for x in runs)
                seconds = statistics.median(x["seconds"] for x in runs)
                name = "synthetic" if a.synthetic else source
                print(f"| {name} | {dtype} | {r['param_bytes'] / MB:,.0f} | {r['base'] / MB:,.0f} | "
                      f"{inc / MB:,.0f} | {inc / r['param_bytes']:.2f}x | {seconds:.1f} |", flush=True)
                if a.json:
                    for x in runs:
                        print(json.dumps({"model": name, "dtype": dtype, **x}), flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
