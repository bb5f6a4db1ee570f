"""Checkpoint readers: one interface (names, shapes, read one tensor) over every HF weights format.

* ``model.safetensors`` and sharded ``model.safetensors.index.json``: the header is parsed here and each
  tensor is read only when asked for, so a truncated file is caught up front; ``fill`` reads a tensor
  straight into the parameter being built (or in ~4 MB pieces where it is cast or transposed on the way).
* ``pytorch_model.bin`` (and its sharded index): ``torch.load(mmap=True, weights_only=True)``; needs the
  ``torch`` extra.
* ``flax_model.msgpack``: HF's Flax layout (``kernel`` = transposed Linear weight, ``embedding``,
  ``scale``), mapped back to PyTorch names so one conversion table serves every format.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np

from jaxlens.errors import JaxlensError

try:
    import ml_dtypes

    _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes ships with jax
    _BF16 = None

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": _BF16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "flax_model.msgpack")


class TensorSource:
    """Names and shapes of every tensor in a checkpoint, and lazy access to each one.

    ``get(key)`` returns the tensor; ``fill(key, out)`` writes it into ``out`` (the tensor's shape, any
    dtype, any strides: a view of the parameter being built), casting as ``out[...] = get(key)`` would.
    Formats that can stream a tensor in pieces pass a ``fill`` that never holds a whole copy of it."""

    def __init__(self, shapes: dict[str, tuple], getter, description: str, fill=None):
        self.shapes = shapes
        self._get = getter
        self._fill = fill
        self.description = description

    def get(self, key: str) -> np.ndarray:
        return self._get(key)

    def fill(self, key: str, out: np.ndarray) -> None:
        if self._fill is not None:
            self._fill(key, out)
        else:
            out[...] = self._get(key)


def _safetensors_file(path: str):
    name = os.path.basename(path)
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise JaxlensError(f"{name} is truncated or not a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise JaxlensError(f"{name} is truncated or corrupt: its header claims {n} bytes "
                                   f"but the file has {size}")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise JaxlensError(f"{name} is corrupt: unreadable safetensors header ({e.__class__.__name__})")
    header.pop("__metadata__", None)
    start = 8 + n
    need = max((v["data_offsets"][1] for v in header.values()), default=0)
    if start + need > size:
        raise JaxlensError(f"{name} is truncated: its tensors need {start + need} bytes but the file "
                           f"has {size}")
    shapes, getters, fillers = {}, {}, {}
    for key, meta in header.items():
        dt = _ST_DTYPES.get(meta["dtype"])
        if dt is None:
            raise JaxlensError(f"{name}: tensor {key} has unsupported dtype {meta['dtype']}")
        a, b = meta["data_offsets"]
        shapes[key] = tuple(meta["shape"])

        def get(a=a, b=b, dt=dt, shape=tuple(meta["shape"])):
            # A plain read (not a memory map): pages of a mapped file would count against host memory.
            with open(path, "rb") as fh:
                fh.seek(start + a)
                buf = np.frombuffer(fh.read(b - a), dtype=np.uint8)
            return buf.view(dt).reshape(shape)

        def fill(out, a=a, b=b, dt=np.dtype(dt), shape=tuple(meta["shape"])):
            with open(path, "rb") as fh:
                fh.seek(start + a)
                if out.dtype == dt and out.flags.c_contiguous:          # straight into the parameter
                    if fh.readinto(out.reshape(-1).view(np.uint8)) != b - a:
                        raise JaxlensError(f"{name} changed or was truncated while open")
                    return
                if not shape:
                    out[...] = np.frombuffer(fh.read(b - a), dt).reshape(shape)
                    return
                row = (b - a) // max(1, shape[0])
                step = max(1, (1 << 22) // max(1, row))                 # ~4 MB of the file per read
                for i in range(0, shape[0], step):
                    j = min(shape[0], i + step)
                    buf = fh.read((j - i) * row)
                    if len(buf) != (j - i) * row:
                        raise JaxlensError(f"{name} changed or was truncated while open")
                    out[i:j] = np.frombuffer(buf, dt).reshape((j - i,) + shape[1:])

        getters[key] = get
        fillers[key] = fill
    return shapes, getters, fillers


def _torch_file(path: str):
    try:
        import torch
    except ImportError:
        raise JaxlensError(f"{os.path.basename(path)} is a PyTorch pickle; reading it needs PyTorch: "
                           f"pip install 'jaxlens[torch]' (or convert the checkpoint to safetensors)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any torch failure means the file is unusable
        raise JaxlensError(f"{os.path.basename(path)} could not be read by torch.load: {str(e).splitlines()[0]}")

    def get(key):
        t = sd[key]
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(_BF16)
        return t.numpy()

    return {k: tuple(v.shape) for k, v in sd.items()}, {k: (lambda k=k: get(k)) for k in sd}, {}


def _flax_file(path: str):
    from flax import serialization

    try:
        with open(path, "rb") as f:
            tree = serialization.msgpack_restore(f.read())
    except Exception as e:  # noqa: BLE001
        raise JaxlensError(f"{os.path.basename(path)} is corrupt: {str(e).splitlines()[0]}")
    flat: dict[str, np.ndarray] = {}

    def walk(node, parts):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, parts + [str(k)])
            return
        arr = np.asarray(node)
        leaf = parts[-1]
        if leaf == "kernel":
            arr, leaf = arr.T, "weight"
        elif leaf in ("embedding", "scale"):
            leaf = "weight"
        flat[".".join(parts[:-1] + [leaf])] = arr

    walk(tree, [])
    return {k: v.shape for k, v in flat.items()}, {k: (lambda v=v: v) for k, v in flat.items()}, {}


def open_checkpoint(directory: str) -> TensorSource:
    """Open the weights in a HF model directory (first match in :data:`WEIGHT_FILES` order)."""
    present = [f for f in WEIGHT_FILES if os.path.exists(os.path.join(directory, f))]
    if not present:
        raise JaxlensError(f"no weights file in {directory} (looked for {', '.join(WEIGHT_FILES)})")
    chosen = present[0]
    path = os.path.join(directory, chosen)
    if chosen.endswith(".index.json"):
        try:
            with open(path) as f:
                wmap = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise JaxlensError(f"{chosen} is not a valid index file ({e.__class__.__name__})")
        reader = _safetensors_file if chosen.startswith("model.safetensors") else _torch_file
        shapes, getters, fillers = {}, {}, {}
        for shard in sorted(set(wmap.values())):
            sp = os.path.join(directory, shard)
            if not os.path.exists(sp):
                raise JaxlensError(f"{chosen} lists shard {shard}, which is missing from {directory}")
            s, g, fl = reader(sp)
            for k in s:
                if wmap.get(k) == shard:
                    shapes[k], getters[k] = s[k], g[k]
                    if k in fl:
                        fillers[k] = fl[k]
        missing = [k for k, shard in wmap.items() if k not in shapes]
        if missing:
            raise JaxlensError(f"{chosen} lists tensor {missing[0]} but its shard does not contain it")
        desc = f"{chosen} ({len(set(wmap.values()))} shards)"
    elif chosen == "model.safetensors":
        shapes, getters, fillers = _safetensors_file(path)
        desc = chosen
    elif chosen == "pytorch_model.bin":
        shapes, getters, fillers = _torch_file(path)
        desc = chosen
    else:
        shapes, getters, fillers = _flax_file(path)
        desc = chosen

    def fill(k, out):
        if k in fillers:
            fillers[k](out)
        else:
            out[...] = getters[k]()

    return TensorSource(shapes, lambda k: getters[k](), desc, fill=fill)


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
