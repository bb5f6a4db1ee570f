"""JAX's persistent (on-disk) compilation cache for CLI runs.

Every ``jaxlens`` command is a fresh process, so without a cache it pays the whole XLA compile of the
forward and the lens decodes again. The CLI turns the cache on before any compilation:

* location: ``$JAXLENS_COMPILE_CACHE`` if set, else ``$XDG_CACHE_HOME/jaxlens/xla``, else
  ``~/.cache/jaxlens/xla``;
* off: ``jaxlens --no-compile-cache ...`` or ``JAXLENS_COMPILE_CACHE=off``.

Every executable is cached, however short its compile (the probe's are many and small), and the cache
only changes how an executable is obtained, never what it computes: a warm run's outputs are
byte-identical to a cold run's. The Python API leaves JAX's configuration alone; call
:func:`enable_compile_cache` to opt in there.
"""
from __future__ import annotations

import os
from typing import Optional

ENV = "JAXLENS_COMPILE_CACHE"
_OFF = {"off", "0", "false", "no", "none", ""}


def default_cache_dir() -> Optional[str]:
    """The cache directory the CLI uses, or None when ``$JAXLENS_COMPILE_CACHE`` turns it off."""
    env = os.environ.get(ENV)
    if env is not None:
        return None if env.strip().lower() in _OFF else os.path.abspath(os.path.expanduser(env))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxlens", "xla")


def enable_compile_cache(path: Optional[str] = None) -> Optional[str]:
    """Point JAX's persistent compilation cache at ``path`` (default :func:`default_cache_dir`) and cache
    every executable. Returns the directory, or None when the cache is off or cannot be created (a
    read-only home must not stop a run: it only costs the compile)."""
    path = path or default_cache_dir()
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
