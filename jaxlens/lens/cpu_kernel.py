"""The CPU fast path of the streaming lens statistics: one chunk of a token block in one pass.

On XLA:CPU the streaming decode's statistics cost ~40 % of the GEMM's work at d 512 (eight separate
[rows, C] passes and a latency-bound top-k loop; benchmarks/RESULTS.md). ``cpu_stats.cc`` (next to
this file) does the same per-chunk update in one cache-resident pass per row, as an XLA FFI custom
call. It is compiled on first use with the system C++ compiler against jaxlib's FFI headers
(``-O3 -march=native``: ~3 s, once per machine and jax version) and cached under
``$JAXLENS_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/jaxlens/kernels``, else ``~/.cache/jaxlens/kernels``.
Where no compiler is found, the build fails, or ``JAXLENS_CPU_KERNEL=0``, ``available()`` is False
and stream.py keeps its pure-XLA path (the same top-k and ranks, statistics equal to fp32 rounding).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

_SRC = Path(__file__).with_name("cpu_stats.cc")
_TARGET = "jaxlens_chunk_stats"
# no -ffast-math: the statistics keep inf / NaN semantics; reassociation lets the sums vectorise
_FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-fassociative-math",
          "-fno-signed-zeros", "-fno-trapping-math", "-w"]
if platform.machine().lower() in ("x86_64", "amd64"):
    _FLAGS.insert(2, "-mprefer-vector-width=512")  # full AVX-512 registers where the CPU has them


def _cache_dir() -> Path:
    """$JAXLENS_KERNEL_CACHE, else $XDG_CACHE_HOME/jaxlens/kernels, else ~/.cache/jaxlens/kernels (the
    XLA compilation cache's neighbour, jaxlens/compile_cache.py)."""
    env = os.environ.get("JAXLENS_KERNEL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxlens" / "kernels"


def _cpu_id() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _library_path(cxx: str) -> Path:
    key = hashlib.sha256()
    for part in (_SRC.read_bytes(), jax.__version__.encode(), cxx.encode(), " ".join(_FLAGS).encode(),
                 _cpu_id().encode()):
        key.update(part)
    return _cache_dir() / f"libjaxlens_cpu_stats_{key.hexdigest()[:16]}.so"


def _compile(cxx: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SRC), "-o", tmp],
                       check=True, capture_output=True, text=True, timeout=300)
        os.replace(tmp, out)  # atomic: concurrent processes never load a half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when the CPU kernel is compiled (or cached) and registered with XLA."""
    if os.environ.get("JAXLENS_CPU_KERNEL", "1") == "0":
        return False
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx or not _SRC.exists():
        return False
    path = _library_path(cxx)
    try:
        if not path.exists():
            _compile(cxx, path)
        lib = ctypes.cdll.LoadLibrary(str(path))
        jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.JaxlensChunkStats), platform="cpu")
    except (OSError, subprocess.SubprocessError, AttributeError) as err:
        detail = getattr(err, "stderr", "") or err
        warnings.warn(f"jaxlens: CPU lens kernel unavailable, using the XLA path ({detail})", stacklevel=2)
        return False
    return True


def chunk_stats(z, acc, g, selfcol, id0, *, R, teacher_row, has_gold, k):
    """Fold chunk logits z [rows, C] (rows = tokens * R, fp32) into the accumulators.

    acc: dict of [rows] arrays m, S, Zc (and Ac, Bc with a teacher; cnt with gold) and
    [rows, k] tv / ti with top_k. g [rows]: gold logits; selfcol [rows]: the gold's own column in
    this chunk or -1; id0: global id of column 0. Returns the updated dict (same keys).
    """
    rows = z.shape[0]
    f32, i32 = jnp.float32, jnp.int32
    zero = jnp.zeros((rows,), f32)
    kb = max(k, 1)
    tv = acc["tv"] if k else jnp.full((rows, 1), -jnp.inf, f32)
    ti = acc["ti"] if k else jnp.zeros((rows, 1), i32)
    vec = jax.ShapeDtypeStruct((rows,), f32)
    out_types = (vec, vec, vec, vec, vec, jax.ShapeDtypeStruct((rows,), i32),
                 jax.ShapeDtypeStruct((rows, kb), f32), jax.ShapeDtypeStruct((rows, kb), i32))
    call = jax.ffi.ffi_call(_TARGET, out_types, vmap_method="sequential")
    m, S, Zc, Ac, Bc, cnt, tv, ti = call(
        z, acc["m"], acc["S"], acc["Zc"], acc.get("Ac", zero), acc.get("Bc", zero),
        acc.get("cnt", jnp.zeros((rows,), i32)), g if has_gold else zero,
        selfcol if has_gold else jnp.full((rows,), -1, i32), tv, ti, jnp.asarray(id0, i32).reshape(()),
        R=int(R), teacher_row=-1 if teacher_row is None else int(teacher_row),
        has_gold=int(bool(has_gold)), k=int(k),
    )
    new = {"m": m, "S": S, "Zc": Zc}
    if "Ac" in acc:
        new["Ac"], new["Bc"] = Ac, Bc
    if "cnt" in acc:
        new["cnt"] = cnt
    if k:
        new["tv"], new["ti"] = tv, ti
    return new
