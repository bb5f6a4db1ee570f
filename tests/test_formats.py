"""One checkpoint, four on-disk formats, identical parameters.

The same seeded model is saved as a single ``model.safetensors``, a 2-shard ``model.safetensors.index.json``,
a ``pytorch_model.bin`` and an HF Flax ``flax_model.msgpack``; ``jaxlens.load_model`` must give exactly the
same parameter pytree (structure, dtype and every value) from each.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import hf_factory as F

# gpt2: Conv1D [in, out] weights and a tied head; llama: biases + GQA + untied head; gemma2: (1 + w) norms,
# tied head; gpt_neox: fused qkv, LayerNorm, ``embed_out``; qwen3: q/k norms + tied head.
FORMAT_ARCHS = ["gpt2", "llama", "gemma2", "gpt_neox", "qwen3"]


@pytest.fixture(scope="module", params=FORMAT_ARCHS)
def format_dirs(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(f"formats-{arch}")
    dirs = {}
    for fmt in F.FORMATS:
        d = str(root / fmt)
        F.build_checkpoint(arch, d, seed=11, fmt=fmt)
        dirs[fmt] = d
    return arch, dirs


def _flat(tree):
    import jax

    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): leaf for p, leaf in leaves}, treedef


def test_factory_formats_hold_the_same_tensors(format_dirs):
    """The factory's four directories contain the same HF tensors (checked without jaxlens)."""
    import torch
    from flax.serialization import msgpack_restore
    from safetensors.numpy import load_file

    arch, dirs = format_dirs
    single = load_file(os.path.join(dirs["safetensors"], "model.safetensors"))

    with open(os.path.join(dirs["sharded"], "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) >= 2
    sharded = {}
    for shard in sorted(set(weight_map.values())):
        sharded.update(load_file(os.path.join(dirs["sharded"], shard)))
    assert sharded.keys() == single.keys()
    for k in single:
        np.testing.assert_array_equal(sharded[k], single[k], err_msg=k)

    binary = torch.load(os.path.join(dirs["bin"], "pytorch_model.bin"), weights_only=True)
    assert binary.keys() == single.keys()
    for k in single:
        np.testing.assert_array_equal(binary[k].numpy(), single[k], err_msg=k)

    with open(os.path.join(dirs["msgpack"], "flax_model.msgpack"), "rb") as f:
        tree = msgpack_restore(f.read())
    flat = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, prefix + (k,))
            else:
                flat[prefix + (k,)] = np.asarray(v)

    walk(tree, ())
    assert len(flat) == len(single), (sorted(flat)[:5], sorted(single)[:5])
    for k, v in single.items():
        parts = tuple(k.split("."))
        if parts[-1] == "bias":
            candidates = {"bias": None}
        else:
            assert parts[-1] == "weight", k
            candidates = {"embedding": None, "scale": None, "weight": None, "kernel": np.transpose}
        found = [(leaf, fn) for leaf, fn in candidates.items() if parts[:-1] + (leaf,) in flat]
        assert len(found) == 1, f"{k}: msgpack has {found}"
        leaf, fn = found[0]
        got = flat[parts[:-1] + (leaf,)]
        got = got if fn is None else fn(got)
        np.testing.assert_array_equal(got, v, err_msg=k)
    # HF Flax naming: Conv1D / Linear kernels transposed, embeddings renamed, layer indices as string keys
    any_kernel = [k for k in flat if k[-1] == "kernel"]
    any_embedding = [k for k in flat if k[-1] == "embedding"]
    assert any_kernel and any_embedding
    assert any(part == "0" for k in flat for part in k)


@pytest.fixture(scope="module")
def loaded(format_dirs):
    import jaxlens

    arch, dirs = format_dirs
    return arch, {fmt: jaxlens.load_model(d) for fmt, d in dirs.items()}


def test_param_trees_identical_across_formats(loaded):
    arch, loaded = loaded
    ref_flat, ref_def = _flat(loaded["safetensors"].params)
    assert ref_flat, "empty parameter tree"
    for fmt, model in loaded.items():
        assert model.spec.arch == F.variant_arch(arch)[0]
        flat, treedef = _flat(model.params)
        assert treedef == ref_def, f"{arch}/{fmt}: parameter tree structure differs from safetensors"
        for key, want in ref_flat.items():
            got = flat[key]
            assert got.dtype == want.dtype, f"{arch}/{fmt}{key}: dtype {got.dtype} != {want.dtype}"
            assert got.shape == want.shape, f"{arch}/{fmt}{key}: shape {got.shape} != {want.shape}"
            g, w = np.asarray(got), np.asarray(want)
            if not np.array_equal(g, w):
                raise AssertionError(f"{arch}/{fmt}{key}: values differ from safetensors "
                                     f"(max |Δ| {float(np.abs(g.astype(np.float64) - w).max()):.3e})")


def test_formats_give_the_same_forward(loaded):
    """Belt and braces: identical params must give bit-identical logits (same program, same inputs)."""
    import jax.numpy as jnp

    arch, models = loaded
    ids = jnp.asarray(np.arange(3, 14, dtype=np.int32)[None])
    out = {fmt: np.asarray(m.forward(ids).logits) for fmt, m in models.items()}
    for fmt, logits in out.items():
        np.testing.assert_array_equal(logits, out["safetensors"], err_msg=f"{arch}/{fmt}")
