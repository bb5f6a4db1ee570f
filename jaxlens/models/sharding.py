"""Sharding, declared once: logical axis names (on every parameter, see decoder.param_layout) -> mesh axes.

The mesh has three axes: ``data`` (batch), ``fsdp`` (parameters sharded, gathered per use) and ``tensor``
(heads / MLP / vocab split). The same rule table serves one CPU, 8 fake CPU devices in tests, one GPU
and a TPU pod (after ``jax.distributed.initialize()``). A dimension that a mesh axis does not divide is
replicated instead (e.g. 2 kv heads on a 4-way tensor axis).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or None = replicated)
RULES: dict[str, str | tuple | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    "rows": ("data", "fsdp", "tensor"),
}


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types over the first data*fsdp*tensor devices."""
    devices = list(devices if devices is not None else jax.devices())
    n = data * fsdp * tensor
    if n > len(devices):
        from jaxlens.errors import JaxlensError

        raise JaxlensError(f"mesh {data}x{fsdp}x{tensor} needs {n} devices but only {len(devices)} exist")
    return Mesh(np.asarray(devices[:n]).reshape(data, fsdp, tensor), MESH_AXES)


def _mesh_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return int(np.prod([mesh.shape[a] for a in axes]))


def spec_for(shape: tuple, logical: tuple, mesh: Mesh, rules: dict | None = None) -> P:
    """PartitionSpec for an array of ``shape`` whose axes carry the ``logical`` names."""
    rules = RULES if rules is None else rules
    out, used = [], set()
    for dim, name in zip(shape, logical):
        axes = rules.get(name) if name else None
        if isinstance(axes, str):
            axes = (axes,)
        if axes:
            axes = tuple(a for a in axes if a in mesh.shape and a not in used)
        if not axes or dim % _mesh_size(mesh, axes) or _mesh_size(mesh, axes) == 1:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes if len(axes) > 1 else axes[0])
    return P(*out)


def sharding_for(shape: tuple, logical: tuple, mesh: Mesh, rules: dict | None = None) -> NamedSharding:
    return NamedSharding(mesh, spec_for(shape, logical, mesh, rules))


def shard_batch(x, mesh: Mesh | None):
    """Place a [B, ...] array with its batch axis over (data, fsdp); replicated if B does not divide."""
    if mesh is None:
        return x
    return jax.device_put(x, sharding_for(x.shape, ("batch",) + (None,) * (x.ndim - 1), mesh))


def layout_shardings(layout: dict, mesh: Mesh, rules: dict | None = None):
    """A tree of (shape, logical axes) leaves (``decoder.param_layout``) -> the same tree of NamedShardings."""
    is_leaf = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)  # noqa: E731
    return jax.tree.map(lambda leaf: sharding_for(tuple(leaf[0]), tuple(leaf[1]), mesh, rules), layout,
                        is_leaf=is_leaf)


def lookup_shardings(act: NamedSharding, d_model: int):
    """Shardings around an embedding lookup whose result must become ``act`` ([B, T, d], batch-sharded).

    The table is [vocab, embed] with ``embed`` on the fsdp axis: gathering rows with batch-sharded ids on
    that same axis makes the partitioner replicate the table. Instead the ids are split over the batch axes
    other than fsdp, the gather keeps d on fsdp, and one all-to-all moves to ``act``. Returns
    (ids sharding, gathered sharding), or None when the table's embed dimension is not sharded."""
    mesh = act.mesh
    e = RULES["embed"]
    if e not in mesh.shape or mesh.shape[e] == 1 or d_model % mesh.shape[e]:
        return None
    b = act.spec[0] if len(act.spec) else None
    b = (b,) if isinstance(b, str) else tuple(b or ())
    rest = tuple(a for a in b if a != e)
    bspec = rest if len(rest) > 1 else (rest[0] if rest else None)
    return NamedSharding(mesh, P(bspec, None)), NamedSharding(mesh, P(bspec, None, e))
