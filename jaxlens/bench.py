"""``jaxlens bench``: lens-decode speed on whatever device JAX has, against a bare GEMM of the same shape.

One run measures, on the default JAX device (CPU, GPU or TPU):

* ``forward``: the jitted model forward of ``batch`` x ``tokens`` random token ids (all residual streams);
* ``decode``: :func:`jaxlens.lens_stats` of every layer x position through the chosen lens (entropy, both
  KLs to the final layer, gold rank / probability of the next token, top-k), the fused streaming pass;
* ``gemm``: one bare ``[rows, d] x [d, V]`` GEMM (fp32 accumulation, the unembedding's dtype) with
  ``rows = (n_layers + 1) * batch * tokens``: the arithmetic every lens decode must do at least.

Warm times are medians of ``repeats`` calls after one warm-up call; ``compile_s`` is the first call's time
minus the warm median (with the on-disk compile cache it may be a cache hit). ``floor_ratio`` is
``(forward + decode) / (forward + gemm)``: 1.0 means the decode costs no more than its GEMM.
``peak_device_bytes`` is the backend's own peak (``Device.memory_stats()``; CPU backends report none);
``decode_temp_bytes`` is XLA's compiled temporary buffer size of the streaming kernel.
"""
from __future__ import annotations

import json
import platform
import time

import numpy as np

#: Keys of the JSON document (``--json``); tests/test_topk_groups.py checks them.
KEYS = ("jax", "jaxlens", "device", "model", "shape", "lens", "top_k", "repeats", "forward_s", "decode_s",
        "gemm_s", "compile_s", "rows", "rows_per_s", "tokens_per_s", "decode_gflop", "decode_gflops",
        "gemm_gflops", "decode_vs_gemm", "floor_ratio", "peak_device_bytes", "decode_temp_bytes")


def _median_time(fn, repeats: int) -> tuple[float, float]:
    """(first call seconds, median of ``repeats`` further calls). ``fn`` must block until done."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    ts = []
    for _ in range(max(1, int(repeats))):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return first, float(np.median(ts))


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _device_info(dev) -> dict:
    import os

    import jax

    return {"platform": dev.platform, "kind": getattr(dev, "device_kind", dev.platform),
            "count": jax.device_count(), "host": platform.machine(), "processor": _cpu_name(),
            "host_cores": os.cpu_count()}


def _peak_bytes(dev):
    try:
        stats = dev.memory_stats()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if not stats:
        return None
    for key in ("peak_bytes_in_use", "bytes_in_use"):
        if key in stats:
            return int(stats[key])
    return None


def _decode_temp_bytes(h_shape, W, teacher: bool, top_k: int, softcap):
    """XLA temp bytes of the compiled streaming kernel for rows of ``h_shape`` (best effort, else None)."""
    import jax
    import jax.numpy as jnp

    from jaxlens.lens import stream

    T, R, d = h_shape
    sds = jax.ShapeDtypeStruct
    try:
        if teacher:
            fn = lambda h, w, t, g: stream.stream_stats(h, w, teacher_h=t, gold=g, top_k=top_k,  # noqa: E731
                                                        softcap=softcap)
            args = (sds((T, R, d), W.dtype), sds(W.shape, W.dtype), sds((T, d), W.dtype), sds((T,), jnp.int32))
        else:
            fn = lambda h, w, g: stream.stream_stats(h, w, teacher_row=-1, gold=g, top_k=top_k,  # noqa: E731
                                                     softcap=softcap)
            args = (sds((T, R, d), W.dtype), sds(W.shape, W.dtype), sds((T,), jnp.int32))
        mem = jax.jit(fn).lower(*args).compile().memory_analysis()
        return int(mem.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - memory_analysis is best-effort on some backends
        return None


def run_bench(model="demo", *, tokens: int = 512, batch: int = 1, dtype: str = "float32", lens="norm",
              top_k: int = 20, repeats: int = 3, seed: int = 0) -> dict:
    """Time forward + decode of one model on the default device; returns the JSON document (see module doc).

    ``model``: a loaded :class:`~jaxlens.Model` or a source for :func:`jaxlens.load_model`. ``lens``: "norm",
    "logit", "raw", a lens object, or a lens directory (:func:`jaxlens.load_lens`).
    """
    import os

    import jax
    import jax.numpy as jnp

    import jaxlens
    from jaxlens.errors import JaxlensError
    from jaxlens.lens.stats import lens_stats
    from jaxlens.models.loader import Model, load_model

    if int(tokens) < 1 or int(batch) < 1:
        raise JaxlensError(f"--tokens and --batch must be positive (got {tokens}, {batch})")
    if not isinstance(model, Model):
        model = load_model(model, dtype=dtype)
    spec = model.spec
    lens_name = lens if isinstance(lens, str) else getattr(lens, "name", type(lens).__name__)
    if isinstance(lens, str) and lens not in ("norm", "logit", "raw"):
        if not os.path.isdir(os.path.expanduser(lens)):
            raise JaxlensError(f"--lens {lens}: not norm, logit, raw or a lens directory")
        lens = jaxlens.load_lens(os.path.expanduser(lens), model=model)
    B, T, V, d = int(batch), int(tokens), spec.vocab_size, spec.d_model
    R = spec.n_layers + 1
    ids = np.random.default_rng(seed).integers(0, V, size=(B, T + 1)).astype(np.int32)
    inp, gold = ids[:, :T], ids[:, 1:]          # gold = the next token at every position
    dev = jax.devices()[0]

    fw_holder = {}

    def forward():
        fw = model.forward(inp)
        jax.block_until_ready(fw.residuals)
        fw_holder["fw"] = fw

    fw_first, fw_s = _median_time(forward, repeats)
    fw = fw_holder["fw"]

    def decode():
        st = lens_stats(model, fw, lens, gold_ids=gold, top_k=top_k, cosine=False)
        jax.block_until_ready((st.entropy_bits, st.top_ids))

    dec_first, dec_s = _median_time(decode, repeats)

    W, _ = model.unembedding()
    rows = R * B * T
    X = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((rows, d)), W.dtype)
    gemm_fn = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
    gemm_first, gemm_s = _median_time(lambda: gemm_fn(X, W).block_until_ready(), repeats)
    del X

    flop = 2.0 * rows * d * V
    own_teacher = isinstance(lens, str) and lens in ("norm", "logit")
    temp = _decode_temp_bytes((B * T, R, d), W, not own_teacher, top_k, spec.final_softcap)
    return {
        "jax": jax.__version__,
        "jaxlens": jaxlens.__version__,
        "device": _device_info(dev),
        "model": {"name": model.name, "arch": spec.arch, "layers": spec.n_layers, "d_model": d, "vocab": V,
                  "dtype": jnp.dtype(model.dtype).name},
        "shape": {"batch": B, "tokens": T, "streams": R},
        "lens": lens_name,
        "top_k": int(top_k),
        "repeats": int(repeats),
        "forward_s": fw_s,
        "decode_s": dec_s,
        "gemm_s": gemm_s,
        "compile_s": {"forward": max(0.0, fw_first - fw_s), "decode": max(0.0, dec_first - dec_s),
                      "gemm": max(0.0, gemm_first - gemm_s)},
        "rows": rows,
        "rows_per_s": rows / dec_s,
        "tokens_per_s": B * T / (fw_s + dec_s),
        "decode_gflop": flop / 1e9,
        "decode_gflops": flop / dec_s / 1e9,
        "gemm_gflops": flop / gemm_s / 1e9,
        "decode_vs_gemm": dec_s / gemm_s,
        "floor_ratio": (fw_s + dec_s) / (fw_s + gemm_s),
        "peak_device_bytes": _peak_bytes(dev),
        "decode_temp_bytes": temp,
    }


def _rate(gflops: float) -> str:
    return f"{gflops / 1e3:,.2f} TFLOP/s" if gflops >= 1e3 else f"{gflops:,.1f} GFLOP/s"


def _mib(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.1f} MiB"


def format_report(r: dict) -> str:
    m, s, dv = r["model"], r["shape"], r["device"]
    c = r["compile_s"]
    peak = r["peak_device_bytes"]
    lines = [
        f"jaxlens bench: {m['name']} ({m['arch']}, {m['layers']} layers, d {m['d_model']}, V {m['vocab']:,}, "
        f"{m['dtype']}) on {dv['kind']} ({dv['platform']}, {dv['count']} device(s))",
        f"  {s['batch']} x {s['tokens']} tokens, {s['streams']} streams = {r['rows']:,} rows, "
        f"{r['lens']} lens, top-{r['top_k']}; medians of {r['repeats']}",
        f"  forward   {r['forward_s']:9.4f} s                       compile {c['forward']:.2f} s",
        f"  decode    {r['decode_s']:9.4f} s  {r['rows_per_s']:>12,.0f} rows/s  {_rate(r['decode_gflops'])}"
        f"   compile {c['decode']:.2f} s",
        f"  bare GEMM {r['gemm_s']:9.4f} s  [{r['rows']} x {m['d_model']}] x [{m['d_model']} x {m['vocab']}]"
        f"  {_rate(r['gemm_gflops'])}",
        f"  decode / GEMM {r['decode_vs_gemm']:.2f}x; forward + decode vs forward + GEMM (the floor) "
        f"{r['floor_ratio']:.2f}x; {r['tokens_per_s']:,.0f} tokens/s end to end",
        f"  peak device memory {_mib(peak) if peak is not None else 'not reported by this backend'}; "
        f"decode XLA temp {_mib(r['decode_temp_bytes'])}",
    ]
    return "\n".join(lines)


def _cmd_bench(args) -> int:
    r = run_bench(args.model, tokens=args.tokens, batch=args.batch, dtype=args.dtype, lens=args.lens,
                  top_k=args.top_k, repeats=args.repeats, seed=args.seed)
    print(json.dumps(r, indent=1) if args.json else format_report(r))
    return 0


def add_parser(subparsers) -> None:
    """Register the ``bench`` sub-command on the ``jaxlens`` parser's subparsers."""
    b = subparsers.add_parser(
        "bench", help="time forward + lens decode on this device against a bare GEMM of the same shape",
        description="Time the jitted forward and the fused lens decode (entropy, KLs, gold rank, top-k of every "
                    "layer x position) of random tokens on the default JAX device, and a bare [rows, d] x [d, V] "
                    "GEMM of the same shape: rows/s, achieved GFLOP/s, decode / GEMM and (forward + decode) / "
                    "(forward + GEMM), compile time, peak device memory where the backend reports it.")
    b.add_argument("--model", default="demo", help="'demo' (default), a local HF directory, or a hub id")
    b.add_argument("--tokens", type=int, default=512, help="tokens per sequence (default 512)")
    b.add_argument("--batch", type=int, default=1, help="sequences (default 1)")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    b.add_argument("--lens", default="norm", metavar="norm|logit|raw|LENS_DIR",
                   help="lens to decode through (default norm)")
    b.add_argument("--top-k", type=int, default=20, help="top tokens per row (default 20)")
    b.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up (median; default 3)")
    b.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    b.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    b.set_defaults(func=_cmd_bench)
