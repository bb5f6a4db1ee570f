"""``jaxlens train-lens --plan-only``: the per-device memory of one training step, from abstract parameters.

Nothing is allocated: the model's architecture comes from its config alone (a config.json, a model
directory, a .gguf file's metadata or a hub id's config), every array of the step -- the frozen model's
parameters, the lens, the optimizer state, a step's token ids -- is a ``jax.ShapeDtypeStruct`` carrying
its sharding on the requested mesh, and the step (:func:`train_tuned.train.build_step`, the same function
training runs) is lowered and compiled. XLA's ``memory_analysis()`` of the compiled SPMD program gives
the per-device argument, output, alias (donated buffers) and temporary sizes; the peak estimate is
arguments + outputs + temporaries - aliased. Planned on fake CPU devices (``--fake-devices``) the numbers
are XLA:CPU's buffer assignment, which tracks an accelerator's closely for parameters, lens and optimizer
state (exact shard sizes) and approximately for temporaries (fusion differs by backend).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlens.errors import JaxlensError
from jaxlens.models import decoder
from jaxlens.models.sharding import layout_shardings
from jaxlens.models.spec import spec_from_config

from .train import (_batch_shards, build_step, ids_sharding, init_lens_params, lens_shardings, load_recipe, make_optimizer,
                    make_plan, opt_shardings, resolve_mesh)

GiB = float(1 << 30)


@dataclasses.dataclass
class AbstractModel:
    """A model's architecture without its weights (what make_plan / build_step read)."""

    spec: object
    dtype: object
    name: str
    source: str
    path: str | None = None
    params: dict | None = None


def read_model_config(source: str) -> tuple[dict, str]:
    """(config dict, where it came from) for a config.json file, a model directory, a .gguf file, a
    packaged / demo model name or a hub id (only its config.json is fetched)."""
    from jaxlens.models.loader import read_config, resolve_source

    path = os.path.expanduser(str(source))
    if os.path.isfile(path) and path.endswith(".json"):
        try:
            with open(path) as f:
                return json.load(f), path
        except json.JSONDecodeError as e:
            raise JaxlensError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})")
    if not os.path.exists(path) and source.count("/") == 1 and source != "demo" and not source.endswith(".gguf"):
        try:                                                 # a hub id: its config only, not the weights
            from huggingface_hub import hf_hub_download

            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
            cfg_path = hf_hub_download(source, "config.json", local_files_only=offline)
            with open(cfg_path) as f:
                return json.load(f), source
        except Exception:  # noqa: BLE001 - fall through to the loader's own resolution and its error
            pass
    path = resolve_source(source)
    if path.endswith(".gguf"):
        from jaxlens.models.gguf import GGUFFile

        return GGUFFile(path).config(), path
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        from jaxlens.models.gguf import find_gguf

        g = find_gguf(path)
        if g is not None:
            from jaxlens.models.gguf import GGUFFile

            return GGUFFile(g).config(), g
    return read_config(path), path


def abstract_model(source: str, dtype: str = "float32") -> AbstractModel:
    cfg, where = read_model_config(source)
    spec = spec_from_config(cfg, where=where)
    name = os.path.basename(str(source).rstrip("/"))
    if name == "config.json":
        name = os.path.basename(os.path.dirname(os.path.abspath(os.path.expanduser(str(source)))))
    return AbstractModel(spec=spec, dtype=jnp.dtype(dtype), name=name, source=str(source), path=where)


def _shard_bytes(tree_abstract, shardings) -> tuple[int, int]:
    """(bytes on the device holding the most of ``tree``, total unsharded bytes)."""
    per, total = 0, 0
    for a, sh in zip(jax.tree.leaves(tree_abstract), jax.tree.leaves(shardings)):
        item = jnp.dtype(a.dtype).itemsize
        total += math.prod(a.shape) * item
        per += math.prod(sh.shard_shape(tuple(a.shape))) * item
    return per, total


def _with(tree, shardings):
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree, shardings)


def plan_memory(model_source, *, recipe: str = "tuned-lens", mesh=None, devices: int = 1, dtype: str = "float32",
                steps=None, tokens_per_step=None, seq_len=None, micro_batch=None, chunk=None,
                lens_matmul: str | None = None, layer_groups: int | None = None) -> dict:
    """Compile one training step on abstract inputs and report its per-device memory (module docstring).

    ``model_source``: a config.json, model directory, .gguf, packaged name or hub id (or an object with
    ``spec`` / ``dtype`` / ``name``). Without ``tokens_per_step`` the recipe's value is used (not the CPU
    backend's scaled-down default), so the plan is the accelerator run's.
    """
    rec = load_recipe(recipe)
    mesh = resolve_mesh(mesh, devices)
    model = abstract_model(model_source, dtype) if isinstance(model_source, (str, os.PathLike)) else model_source
    shards = _batch_shards(mesh)
    plan = make_plan(model, rec, steps=steps, tokens_per_step=tokens_per_step or int(rec["schedule"]["tokens_per_step"]),
                     seq_len=seq_len, micro_batch=micro_batch, devices=shards, chunk=chunk, lens_matmul=lens_matmul,
                     mesh_shape=dict(mesh.shape), layer_groups=layer_groups)
    optimizer = make_optimizer(plan)
    abs_lp = jax.eval_shape(lambda: init_lens_params(plan, jax.random.key(0)))
    lp_sh = lens_shardings(abs_lp, mesh)
    abs_opt = jax.eval_shape(optimizer.init, abs_lp)
    opt_sh = opt_shardings(abs_opt, lp_sh, {k: v.shape for k, v in abs_lp.items()}, mesh)
    layout = decoder.param_layout(model.spec)
    mp_sh = layout_shardings(layout, mesh)
    abs_mp = decoder.param_shapes(model.spec, model.dtype)
    rep = NamedSharding(mesh, P())
    M, B, T = plan.micro_batches, plan.micro_batch_seqs, plan.seq_len
    abs_ids = jax.ShapeDtypeStruct((M, B, T), jnp.int32, sharding=ids_sharding(mesh))
    k = jax.eval_shape(lambda: jax.random.key(0))
    abs_key = jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=rep)
    step = build_step(model, plan, optimizer, mesh, lp_sh, opt_sh, mp_sh)
    t0 = time.perf_counter()
    lowered = step.lower(_with(abs_lp, lp_sh), _with(abs_opt, opt_sh), _with(abs_mp, mp_sh), abs_ids, abs_key)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    ma = compiled.memory_analysis()
    if ma is None:
        raise JaxlensError(f"the {jax.default_backend()} backend gives no memory analysis of compiled programs")
    model_dev, model_total = _shard_bytes(abs_mp, mp_sh)
    lens_dev, lens_total = _shard_bytes(abs_lp, lp_sh)
    opt_dev, opt_total = _shard_bytes(abs_opt, opt_sh)
    ids_dev = math.prod(abs_ids.sharding.shard_shape(abs_ids.shape)) * 4
    arg, out, alias, temp = (int(getattr(ma, f"{n}_size_in_bytes")) for n in ("argument", "output", "alias", "temp"))
    return {
        "model": {"name": model.name, "source": str(getattr(model, "source", model.name)), "arch": model.spec.arch,
                  "n_layers": model.spec.n_layers, "d_model": model.spec.d_model, "vocab_size": model.spec.vocab_size,
                  "dtype": jnp.dtype(model.dtype).name},
        "mesh": {k_: int(v) for k_, v in mesh.shape.items()}, "devices": int(mesh.size),
        "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
        "plan": {"recipe": plan.recipe, "family": plan.family, "seq_len": T, "tokens_per_step": plan.tokens_per_step,
                 "micro_batches": M, "micro_batch_seqs": B, "sequences_per_device_per_micro_batch": B // shards,
                 "layers_per_step": plan.layers_per_step, "rank": plan.rank, "lens_matmul": plan.lens_matmul,
                 "chunk": plan.chunk, "layer_groups": plan.layer_groups},
        "per_device_bytes": {"model_params": model_dev, "lens_params": lens_dev, "optimizer_state": opt_dev,
                             "token_ids": ids_dev, "arguments": arg, "outputs": out, "aliased": alias,
                             "temporaries": temp, "peak_estimate": arg + out + temp - alias},
        "total_bytes": {"model_params": model_total, "lens_params": lens_total, "optimizer_state": opt_total},
        "seconds": {"lower": round(t1 - t0, 2), "compile": round(t2 - t1, 2)},
    }


def format_plan(r: dict) -> str:
    """The human-readable table ``--plan-only`` prints."""
    g = lambda b: f"{b / GiB:9.3f} GiB"  # noqa: E731
    pd, tot, pl, m = r["per_device_bytes"], r["total_bytes"], r["plan"], r["model"]
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [
        f"train-lens plan: {m['name']} ({m['arch']}, {m['n_layers']} layers, d {m['d_model']}, V {m['vocab_size']}, "
        f"{m['dtype']}) on mesh {mesh} ({r['devices']} {r['backend']} devices, {r['device_kind']})",
        f"  {pl['recipe']} recipe: {pl['tokens_per_step']} tokens per step = {pl['micro_batches']} micro-batches x "
        f"{pl['micro_batch_seqs']} sequences x {pl['seq_len']} ({pl['sequences_per_device_per_micro_batch']} per "
        f"device), {pl['layer_groups']} layer group(s) of {pl['layers_per_step'] // pl['layer_groups']}, lens GEMMs in "
        f"{pl['lens_matmul']}",
        f"  {'':24s}{'per device':>13s}{'whole':>15s}",
    ]
    for key, label in (("model_params", "frozen model"), ("lens_params", "lens"), ("optimizer_state", "optimizer state")):
        lines.append(f"  {label:24s}{g(pd[key])}  {g(tot[key])}")
    for key, label in (("token_ids", "token ids"), ("arguments", "step arguments"), ("outputs", "step outputs"),
                       ("aliased", "donated (aliased)"), ("temporaries", "temporaries")):
        lines.append(f"  {label:24s}{g(pd[key])}")
    lines.append(f"  {'peak estimate':24s}{g(pd['peak_estimate'])}   (arguments + outputs + temporaries - aliased)")
    lines.append(f"  compiled in {r['seconds']['compile']:.1f} s (lowered in {r['seconds']['lower']:.1f} s); "
                 "nothing was allocated")
    if r["backend"] == "cpu" and m["dtype"] in ("bfloat16", "float16"):
        lines.append(f"  note: XLA:CPU converts {m['dtype']} weights to float32 for its GEMMs, so these temporaries "
                     "include an fp32 copy of the per-device weights that a TPU / GPU does not make")
    return "\n".join(lines)
