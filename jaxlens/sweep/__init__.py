"""``jaxlens sweep``: the layer-by-layer lenses over thousands of prompts x several models, batched, sharded,
multi-host and resumable, to Parquet (docs/sweep.md).

* :mod:`.inputs`  prompt sets: JSONL / CSV / Parquet / ``hf:`` datasets / the probe's TOML suites, row statuses
* :mod:`.engine`  length buckets, fixed padded shapes, one jitted forward + fused decode per bucket shape
* :mod:`.tables`  per-layer / per-prompt / per-position rows from the probe's metric functions
* :mod:`.store`   atomic Parquet shards, ``manifest.json``, resume (refused when the inputs changed)
* :mod:`.run`     the pipeline (tokenise / device / write threads), several models, the cross-model summary
* :mod:`.cli`     the ``jaxlens sweep`` subcommand
* the ``jax.distributed`` bootstrap and mesh helpers are :mod:`jaxlens.distributed` (shared with training)

The package is itself callable: ``jaxlens.sweep(models, prompts, out, ...)`` is :func:`run_sweep`. Importing it
is cheap (the engine, pyarrow and the model code load on first use).
"""
from __future__ import annotations

import sys
import types

__all__ = ["run_sweep", "read_table", "read_manifest", "SweepResult"]


def run_sweep(*args, **kwargs):
    """See :func:`jaxlens.sweep.run.run_sweep`."""
    from jaxlens.sweep.run import run_sweep as _run

    return _run(*args, **kwargs)


def read_table(model_dir, table="layers", *, sort=True):
    """One table of a finished sweep (``OUT/<name>``) as a pyarrow Table, in prompt / lens / layer order."""
    from jaxlens.sweep.store import read_table as _read

    return _read(model_dir, table, sort=sort)


def read_manifest(model_dir):
    from jaxlens.sweep.store import read_manifest as _read

    return _read(model_dir)


def __getattr__(name):
    if name == "SweepResult":
        from jaxlens.sweep.run import SweepResult

        return SweepResult
    raise AttributeError(name)


class _CallableModule(types.ModuleType):
    """Makes ``jaxlens.sweep(...)`` call :func:`run_sweep` while ``jaxlens.sweep.run`` etc. stay submodules."""

    def __call__(self, *args, **kwargs):
        return run_sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
