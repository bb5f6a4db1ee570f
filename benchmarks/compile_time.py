"""Compile time of the jitted forward vs depth (scan over layers keeps it flat).

Usage: python benchmarks/compile_time.py [--layers 8 32 80] [--d 256] [--tokens 128] [--unroll]
Lowers and compiles jaxlens.models.decoder.apply on abstract parameters (nothing is allocated) for a Llama-shaped
model and prints trace+lower and compile seconds per depth, and the ratio to the shallowest.
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import time

import jax
import jax.numpy as jnp

from jaxlens.models import decoder
from jaxlens.models.spec import spec_from_config


def llama_config(n_layers: int, d: int) -> dict:
    return {"model_type": "llama", "hidden_size": d, "intermediate_size": 4 * d, "num_hidden_layers": n_layers,
            "num_attention_heads": max(1, d // 64), "num_key_value_heads": max(1, d // 128),
            "vocab_size": 32000, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}


def measure(n_layers: int, d: int, tokens: int, unroll: bool) -> dict:
    spec = spec_from_config(llama_config(n_layers, d))
    shapes = decoder.param_shapes(spec, jnp.float32)
    ids = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
    fn = jax.jit(functools.partial(decoder.apply, spec, unroll=n_layers if unroll else 1))
    t0 = time.perf_counter()
    lowered = fn.lower(shapes, ids)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"layers": n_layers, "trace_lower_s": round(t1 - t0, 3), "compile_s": round(t2 - t1, 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 32, 80])
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--unroll", action="store_true", help="fully unrolled scan, for comparison")
    args = ap.parse_args()
    measure(4, args.d, args.tokens, args.unroll)  # warm up jax itself
    rows = [measure(n, args.d, args.tokens, args.unroll) for n in args.layers]
    base = rows[0]["trace_lower_s"] + rows[0]["compile_s"]
    for r in rows:
        r["total_vs_first"] = round((r["trace_lower_s"] + r["compile_s"]) / base, 2)
        print(json.dumps(r))
    print(f"# jax {jax.__version__}, {jax.devices()[0].platform}, {platform.processor() or platform.machine()}")


if __name__ == "__main__":
    main()
