"""Tuned-lens training: recipe -> plan, one jitted SPMD step over a device mesh, orbax checkpoints, exact resume.

``train_lens(model_source, data, out, ...)`` is what ``jaxlens train-lens`` runs:

1. the recipe TOML (``configs/recipes/<name>.toml``) and the model give a :class:`Plan` (every number the run
   uses: sequence length, tokens per step, micro-batches, layers / positions per step, rank, optimizer);
2. the data source is tokenised and packed (:mod:`train_tuned.data`);
3. each optimizer step runs one jitted SPMD function over the (data, fsdp, tensor) mesh: for each micro-batch
   (``lax.scan``) the frozen model's forward (parameters by the logical-axis rules, activations batch-sharded)
   gives every residual stream; the trained layers are scored in groups (``layer_groups``): the translators
   map their rows (the lens parameters and optimizer state sharded over fsdp) and the vocabulary-parallel
   streaming loss (:func:`train_tuned.loss.vocab_parallel_ce`) scores them against the model's own output
   distribution; gradients are summed over groups, micro-batches and devices, constrained to the lens's
   sharding, and the optax update runs sharded;
4. every ``checkpoint_every`` steps and at the end (or at ``stop_at``) orbax saves the lens parameters,
   the optax state, the RNG key and a JSON item (step, data position, content hash, loss history), from
   every process; ``resume`` restores them against abstract targets that carry this run's mesh sharding
   (which may differ from the checkpointed run's: the micro-batching is kept);
5. the lens is written in jaxlens's format with its card (:func:`jaxlens.lens.tuned.save_lens`).

Determinism: the step-k RNG is ``fold_in(key(seed), k)`` and step k consumes sequences
``[(k-1) S, k S)`` of the data order, so a run stopped (or killed) after any checkpoint and resumed
performs exactly the same computation as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlens.models import decoder
from jaxlens.models.decoder import apply_norm
from jaxlens.errors import JaxlensError
from jaxlens.lens.tuned import LAYER_CONVENTIONS, THETA_INIT, FullRankLens, LowRankLens, NormSpec, fullrank_translate, lowrank_translate, reference_rank, save_lens, softplus_temperature

from . import data as data_mod
from .loss import DEFAULT_CHUNK, vocab_parallel_ce

F32 = jnp.float32
RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "recipes")
CKPT_DIR = "checkpoints"
RUN_FILE = "run_config.json"
HISTORY_TAIL = 20
AUTO_GROUP_LAYERS = 16         # layer_groups = "auto": the fewest groups of at most this many layers


# --------------------------------------------------------------------------------------------------
# Recipes and the plan


def load_recipe(name_or_path: str) -> dict:
    """A recipe by name (``configs/recipes/<name>.toml``) or path."""
    import tomllib

    path = name_or_path if os.path.exists(name_or_path) else os.path.join(RECIPES_DIR, f"{name_or_path}.toml")
    if not os.path.exists(path):
        names = sorted(f[:-5] for f in os.listdir(RECIPES_DIR) if f.endswith(".toml")) if os.path.isdir(
            RECIPES_DIR) else []
        raise JaxlensError(f"unknown recipe {name_or_path!r} (known: {', '.join(names) or 'none'}; or a .toml path)")
    try:
        with open(path, "rb") as f:
            rec = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise JaxlensError(f"recipe {path} is not valid TOML ({e})")
    for section in ("translator", "objective", "optimizer", "schedule", "data"):
        if section not in rec:
            raise JaxlensError(f"recipe {path} lacks the [{section}] section")
    fam = rec["translator"].get("family")
    if fam not in ("tuned-lens", "reference"):
        raise JaxlensError(f"recipe {path}: translator.family must be 'tuned-lens' or 'reference', got {fam!r}")
    rec.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    rec["_path"] = os.path.abspath(path)
    with open(path, "rb") as f:
        rec["_sha256"] = hashlib.sha256(f.read()).hexdigest()
    return rec


@dataclasses.dataclass
class Plan:
    """Every number a run uses (recorded in the lens card and checked on resume)."""

    recipe: str
    family: str
    n_layers: int
    d_model: int
    vocab: int
    trained_layers: list          # jaxlens layers with a trainable translator
    rank: int | None
    temperature: bool
    init: str
    seq_len: int
    seq_len_reason: str
    tokens_per_step: int
    tokens_per_step_reason: str
    seqs_per_step: int
    micro_batches: int
    micro_batch_seqs: int         # global sequences per micro-batch
    devices: int
    steps: int
    positions: str                # "all" | "sampled"
    positions_per_seq: int
    position_window: list         # [lo, hi) token positions
    layers_per_step: int
    loss: str
    layer_reduction: str
    l2: float
    smooth: float
    optimizer: dict
    seed: int
    chunk: int
    flops_per_token: float
    lens_rows_per_token: float
    lens_matmul: str = "float32"   # operand dtype of the vocabulary GEMMs (fp32 accumulation, fp32 statistics)
    base: str = "norm"             # reference family: the normaliser under the translators ("norm" | "logit")
    mesh: dict | None = None       # {"data": .., "fsdp": .., "tensor": ..} of the run (not part of the math)
    layer_groups: int = 1          # trained layers scored in this many groups per micro-batch (memory)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _block_params(spec) -> int:
    layout = decoder.param_layout(spec)["blocks"]
    leaves = jax.tree.leaves(layout, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2
                             and isinstance(x[0], tuple))
    return int(sum(math.prod(shape) for shape, _ in leaves))


def make_plan(model, recipe: dict, *, steps=None, tokens_per_step=None, seq_len=None, micro_batch=None,
              devices: int = 1, seed=None, chunk=None, tokenizer_max: int | None = None,
              lens_matmul: str | None = None, batching: dict | None = None, mesh_shape: dict | None = None,
              layer_groups: int | None = None) -> Plan:
    """Every number of a run (:class:`Plan`). ``devices``: the batch shards (data x fsdp of the mesh).
    ``batching``: a checkpointed plan's ``seqs_per_step`` / ``micro_batches`` / ``micro_batch_seqs`` to keep
    (a resume on another mesh runs the same micro-batches)."""
    spec = model.spec
    n, d, V = spec.n_layers, spec.d_model, spec.vocab_size
    tr, ob, op, sc = recipe["translator"], recipe["objective"], recipe["optimizer"], recipe["schedule"]
    auto = recipe.get("auto", {})
    family = tr["family"]
    if n < 2 and family == "reference":
        raise JaxlensError("the reference recipe needs a model with at least 2 layers")

    # sequence length
    want = int(seq_len) if seq_len else int(sc.get("seq_len", 2048))
    caps = [("max_position_embeddings", int(spec.max_positions))]
    if tokenizer_max and tokenizer_max < 10**9:
        caps.append(("tokenizer model_max_length", int(tokenizer_max)))
    T = want
    reason = "--seq-len" if seq_len else "recipe"
    for what, cap in caps:
        if cap < T:
            T, reason = cap, f"capped by the model's {what}"
    if T < 2:
        raise JaxlensError(f"sequence length {T} is too short")

    # layers and positions
    scale = min(1.0, math.sqrt(32000.0 / V))
    if family == "tuned-lens":
        trained = list(range(n))
        layers_per_step = n
        rank = None
    else:
        trained = list(range(1, n))
        lps = ob.get("layers_per_step", "auto")
        lps = min(24, max(8, round(24 * scale))) if lps == "auto" else int(lps)
        layers_per_step = max(1, min(lps, len(trained)))
        r = tr.get("rank", "auto")
        rank = reference_rank(d) if r == "auto" else int(r)
    if ob.get("positions", "all") == "sampled":
        lo_f, hi_f = ob.get("position_range", [0.6, 0.95])
        lo = max(0, int(math.floor(T * lo_f)))
        hi = min(T, max(lo + 1, int(math.ceil(T * hi_f))))
        pps = ob.get("positions_per_seq", "auto")
        pps = min(16, max(12, round(16 * scale))) if pps == "auto" else int(pps)
        positions, window = "sampled", [lo, hi]
    else:
        pps, positions, window = T, "all", [0, T]

    # cost model (flops per training token): the fused streaming loss costs 4 d V per lens row (logits + the
    # gradient accumulation) and 4 d V per teacher token; translators 6 d^2 (full rank) or 12 d k (low rank)
    rows_per_token = layers_per_step * pps / T
    per_row = 4.0 * d * V + (6.0 * d * d if family == "tuned-lens" else 12.0 * d * (rank or 0))
    teacher = 4.0 * d * V * (pps / T)
    fpt = 2.0 * _block_params(spec) + rows_per_token * per_row + teacher

    # tokens per step
    mb_fixed = int(sc.get("micro_batches", 0) or 0)
    if micro_batch is not None and mb_fixed:
        raise JaxlensError(f"the {recipe['name']} recipe fixes {mb_fixed} micro-batches per step; "
                           "--micro-batch applies to recipes with micro_batches = 0")
    gran = devices * (mb_fixed or 1)
    if tokens_per_step:
        req, treason = int(tokens_per_step), "--tokens-per-step"
    elif jax.default_backend() == "cpu" and auto.get("cpu_step_flop"):
        req = min(int(sc["tokens_per_step"]), int(float(auto["cpu_step_flop"]) / fpt))
        treason = (f"auto (CPU backend): about {float(auto['cpu_step_flop']):.3g} flop per step at an estimated "
                   f"{fpt / 1e6:.3g} MFLOP per token (recipe: {int(sc['tokens_per_step'])})")
    else:
        req, treason = int(sc["tokens_per_step"]), "recipe"
    seqs = max(gran, (max(1, round(req / T)) // gran) * gran)
    if mb_fixed:
        accum, mb_seqs = mb_fixed, seqs // mb_fixed
    else:
        per_dev = seqs // devices
        if micro_batch is not None:
            mpd = int(micro_batch)
            if mpd < 1 or per_dev % mpd:
                raise JaxlensError(f"--micro-batch {mpd} must divide the {per_dev} sequences per device per step")
        else:
            mpd = min(per_dev, max(1, int(auto.get("micro_batch_tokens", 8192)) // T))
            while per_dev % mpd:
                mpd -= 1
        accum, mb_seqs = per_dev // mpd, mpd * devices
    if batching is not None:
        seqs, accum, mb_seqs = (int(batching[k]) for k in ("seqs_per_step", "micro_batches", "micro_batch_seqs"))
        treason = batching.get("tokens_per_step_reason", treason)
    if mb_seqs % devices:
        raise JaxlensError(f"{mb_seqs} sequences per micro-batch do not split over {devices} devices")

    lm = lens_matmul or recipe.get("precision", {}).get("lens_matmul", "model")
    if lm == "model":
        lm = jnp.dtype(model.dtype).name
    if lm not in ("float32", "bfloat16", "float16"):
        raise JaxlensError(f"lens_matmul must be 'model', 'float32', 'bfloat16' or 'float16'; got {lm!r}")
    opt = {k: v for k, v in op.items()}
    if opt.get("name") == "sgd":
        opt["lr"] = float(opt.get("lr_scale", 1.0)) * (1.0 - float(opt.get("momentum", 0.9)))
        opt["lr_convention"] = "lr = lr_scale * (1 - momentum) (tuned-lens package)"
    groups = layer_groups or ob.get("layer_groups", "auto")
    if groups == "auto":            # groups of at most 16 layers: the live rows of a micro-batch stay bounded
        groups = next(g for g in range(1, layers_per_step + 1) if layers_per_step % g == 0
                      and layers_per_step // g <= AUTO_GROUP_LAYERS)
    groups = int(groups)
    if groups < 1 or layers_per_step % groups:
        divs = [g for g in range(1, layers_per_step + 1) if layers_per_step % g == 0]
        raise JaxlensError(f"--layer-groups {groups} must divide the {layers_per_step} layers scored per step "
                           f"(one of {', '.join(map(str, divs))})")
    base = str(tr.get("base", "norm"))
    if base not in ("norm", "logit") or (family == "tuned-lens" and base != "norm"):
        raise JaxlensError(f"recipe {recipe['name']}: translator base {base!r} is not supported (the reference family "
                           "takes 'norm', the norm lens, or 'logit', the final norm at every layer)")
    return Plan(
        recipe=recipe["name"], family=family, n_layers=n, d_model=d, vocab=V, trained_layers=trained, rank=rank,
        temperature=bool(tr.get("temperature", False)), init=str(tr.get("init", "zeros")),
        seq_len=T, seq_len_reason=reason, tokens_per_step=seqs * T, tokens_per_step_reason=treason,
        seqs_per_step=seqs, micro_batches=accum, micro_batch_seqs=mb_seqs, devices=devices,
        steps=int(steps) if steps else int(sc["steps"]), positions=positions, positions_per_seq=int(pps),
        position_window=window, layers_per_step=int(layers_per_step), loss=str(ob.get("loss", "kl")),
        layer_reduction=str(ob.get("layer_reduction", "sum")), l2=float(ob.get("l2", 0.0)),
        smooth=float(ob.get("smooth", 0.0)), optimizer=opt,
        seed=int(seed) if seed is not None else int(recipe["data"].get("seed", 0)),
        chunk=int(chunk) if chunk else min(DEFAULT_CHUNK, V), flops_per_token=fpt,
        lens_rows_per_token=rows_per_token, lens_matmul=lm, base=base,
        mesh=None if mesh_shape is None else {k: int(v) for k, v in mesh_shape.items()}, layer_groups=groups)


# --------------------------------------------------------------------------------------------------
# Parameters, optimizer


def init_lens_params(plan: Plan, key) -> dict:
    n, d = plan.n_layers, plan.d_model
    if plan.family == "tuned-lens":
        return {"W": jnp.zeros((n, d, d), F32), "b": jnp.zeros((n, d), F32)}
    nt, k = n - 1, plan.rank
    if plan.init == "zeros":
        U = jnp.zeros((nt, d, k), F32)
    elif plan.init == "u_normal":
        U = jax.random.normal(key, (nt, d, k), F32) / math.sqrt(d)
    else:
        raise JaxlensError(f"unknown translator init {plan.init!r} (use 'zeros' or 'u_normal')")
    p = {"U": U, "V": jnp.zeros((nt, d, k), F32), "c": jnp.zeros((nt, d), F32)}
    if plan.temperature:
        p["theta"] = jnp.full((nt,), THETA_INIT, F32)
    return p


def make_optimizer(plan: Plan) -> optax.GradientTransformation:
    o, steps = plan.optimizer, plan.steps
    name = o.get("name")
    warm = int(o.get("warmup_steps", 0))
    if o.get("schedule") == "linear":
        sched = optax.linear_schedule(float(o["lr"]), 0.0, steps)
    elif o.get("schedule") == "cosine":
        sched = optax.cosine_decay_schedule(float(o["lr"]), steps, alpha=0.0)
    elif o.get("schedule") == "constant":
        sched = optax.constant_schedule(float(o["lr"]))
    else:
        raise JaxlensError(f"unknown learning-rate schedule {o.get('schedule')!r}")
    if warm:
        sched = optax.join_schedules([optax.linear_schedule(0.0, float(o["lr"]), warm), sched], [warm])
    parts = []
    clip = float(o.get("clip_global_norm", 0.0) or 0.0)
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    if name == "sgd":
        if float(o.get("weight_decay", 0.0)):
            parts.append(optax.add_decayed_weights(float(o["weight_decay"])))       # coupled, like torch SGD
        parts.append(optax.trace(decay=float(o.get("momentum", 0.9)), nesterov=bool(o.get("nesterov", True))))
        parts.append(optax.scale_by_learning_rate(sched))
    elif name == "adamw":
        decay_t = bool(o.get("decay_temperatures", False))
        mask = lambda p: {k: (k != "theta" or decay_t) for k in p}  # noqa: E731
        parts.append(optax.adamw(sched, b1=float(o.get("b1", 0.9)), b2=float(o.get("b2", 0.999)),
                                 eps=float(o.get("eps", 1e-8)), weight_decay=float(o.get("weight_decay", 0.0)),
                                 mask=mask))
    else:
        raise JaxlensError(f"unknown optimizer {name!r} (use 'sgd' or 'adamw')")
    return optax.chain(*parts)


# --------------------------------------------------------------------------------------------------
# The step


def _norm_table(spec, params):
    """Norm-lens normaliser params stacked over jaxlens layers 0..n, and which layers apply one."""
    n = spec.n_layers
    final = params["final_norm"]
    if spec.pre_attn_norm:
        table = jax.tree.map(lambda blk, fin: jnp.concatenate([blk, fin[None]], 0), params["blocks"]["ln1"], final)
        return table, np.ones(n + 1, bool)
    table = jax.tree.map(lambda a: jnp.broadcast_to(a, (n + 1,) + a.shape), final)
    return table, np.arange(n + 1) == n


def _rows(plan: Plan, spec, lp, mp, res, layers, w_layer_sharding):
    """Student rows [R, N, d] (fp32) and inverse temperatures [R] (or None) for raw residuals res [R, N, d]
    at jaxlens layers ``layers`` (traced int [R])."""
    if plan.family == "tuned-lens":
        def one(_, inp):                            # every layer in order, one layer's W gathered at a time
            W_l, b_l, h_l = inp
            W_l = jax.lax.with_sharding_constraint(W_l, w_layer_sharding)   # its cotangent: reduce-scattered
            y = fullrank_translate(W_l[None], b_l[None], h_l[None], jnp.zeros((1,), jnp.int32), jnp.ones((1,), bool))
            return None, apply_norm(spec, mp["final_norm"], y[0])
        return jax.lax.scan(one, None, (lp["W"], lp["b"], res))[1], None
    if plan.base == "logit":                  # the logit lens under the translators: final norm everywhere
        x = apply_norm(spec, mp["final_norm"], res.astype(F32))
    else:
        table, applies = _norm_table(spec, mp)
        sel = jax.tree.map(lambda a: jnp.take(a, layers, axis=0), table)
        normed = jax.vmap(lambda p, h: apply_norm(spec, p, h))(sel, res.astype(F32))
        keep = jnp.take(jnp.asarray(applies), layers).reshape(-1, 1, 1)
        x = jnp.where(keep, normed, res.astype(F32))
    idx = layers - 1
    y = lowrank_translate(lp["U"], lp["V"], lp["c"], x, idx, jnp.ones(layers.shape, bool))
    it = None
    if "theta" in lp:
        it = 1.0 / softplus_temperature(jnp.take(lp["theta"], idx))
    return y, it


def _regulariser(plan: Plan, lp) -> jax.Array:
    """Per-translator regulariser [n_trainable] (reference recipe), neighbours detached."""
    if plan.family != "reference" or (plan.l2 == 0 and plan.smooth == 0):
        return jnp.zeros((len(plan.trained_layers),), F32)
    U, V, c = lp["U"], lp["V"], lp["c"]
    sq = lambda a: jnp.sum(jnp.square(a), axis=tuple(range(1, a.ndim)))  # noqa: E731
    reg = plan.l2 * (sq(U) + sq(V) + sq(c))
    if plan.smooth and U.shape[0] > 1:
        Us, Vs = jax.lax.stop_gradient(U), jax.lax.stop_gradient(V)
        prev = sq(U[1:] - Us[:-1]) + sq(V[1:] - Vs[:-1])      # i >= 1 with neighbour i-1
        nxt = sq(U[:-1] - Us[1:]) + sq(V[:-1] - Vs[1:])       # i <= nt-2 with neighbour i+1
        reg = reg + plan.smooth * (jnp.pad(prev, (1, 0)) + jnp.pad(nxt, (0, 1)))
    return reg


def _sample(plan: Plan, key):
    """Per-micro-batch (layers [M, Ls], positions [M, P]) from the step key (identical on every device)."""
    M = plan.micro_batches
    keys = jax.random.split(key, M)
    trained = jnp.asarray(plan.trained_layers, jnp.int32)
    lo, hi = plan.position_window

    def one(k):
        kl, kp = jax.random.split(k)
        if plan.layers_per_step < len(plan.trained_layers):
            layers = jnp.sort(jax.random.choice(kl, trained, (plan.layers_per_step,), replace=False))
        else:
            layers = trained
        if plan.positions == "sampled":
            pos = jax.random.randint(kp, (plan.positions_per_seq,), lo, hi, jnp.int32)
        else:
            pos = jnp.arange(plan.seq_len, dtype=jnp.int32)
        return layers, pos

    return jax.vmap(one)(keys)


# logical axes of the lens parameters: the input dimension is ZeRO-sharded over ``fsdp`` (rule "embed")
LENS_AXES = {"W": (None, "embed", None), "b": (None, "embed"), "U": (None, "embed", None),
             "V": (None, "embed", None), "c": (None, "embed"), "theta": (None,)}


def lens_shardings(lp, mesh) -> dict:
    """NamedSharding per lens parameter (its input dimension over fsdp where fsdp divides it)."""
    from jaxlens.models.sharding import sharding_for

    return {k: sharding_for(tuple(v.shape), LENS_AXES[k], mesh) for k, v in lp.items()}


def opt_shardings(abstract_opt, lp_shardings: dict, lp_shapes: dict, mesh):
    """Optimizer-state shardings: a leaf shaped like a lens parameter takes its sharding (Adam's moments, the
    momentum trace); anything else (step counts) is replicated."""
    by_shape = {tuple(lp_shapes[k]): lp_shardings[k] for k in lp_shapes}
    rep = NamedSharding(mesh, P())
    return jax.tree.map(lambda a: by_shape.get(tuple(a.shape), rep) if a.ndim else rep, abstract_opt)


def batch_axes(mesh) -> tuple:
    """The mesh axes the sequences of a batch are split over (the sharding rules' "batch")."""
    return tuple(a for a in ("data", "fsdp") if a in mesh.shape)


def ids_sharding(mesh) -> NamedSharding:
    """[micro-batches, sequences, T] token ids: sequences over (data, fsdp)."""
    return NamedSharding(mesh, P(None, batch_axes(mesh), None))


def build_step(model, plan: Plan, optimizer, mesh, lp_sharding: dict, opt_sharding, mp_sharding) -> Callable:
    """The jitted optimizer step (params, opt_state, model_params, ids [M, B, T], key) -> (params, opt, metrics).

    One SPMD program over the (data, fsdp, tensor) mesh, partitioned by its input / output shardings (no
    hand-written gathers): the frozen model's parameters as ``load_model(mesh=...)`` placed them (the
    logical-axis rules), the lens parameters and optimizer state over ``fsdp``, the sequences of each
    micro-batch over (data, fsdp), and the vocabulary GEMMs over ``tensor`` through
    :func:`train_tuned.loss.vocab_parallel_ce` (online statistics merged by collectives). Gradients are
    constrained to the lens parameters' sharding (a reduce-scatter), so the update runs sharded.
    """
    from .loss import vocab_parallel_ce

    spec = model.spec
    n = spec.n_layers
    nt = len(plan.trained_layers)
    M = plan.micro_batches
    n_tok_micro = plan.micro_batch_seqs * plan.positions_per_seq        # global rows per layer per micro-batch
    Ls = plan.layers_per_step
    layer_div = Ls if plan.layer_reduction == "mean" else 1
    first = plan.trained_layers[0]
    bax = batch_axes(mesh)
    rows_sh = NamedSharding(mesh, P(None, bax, None))
    act_sh = NamedSharding(mesh, P(bax, None, None))                         # [b, T, d]: sequences sharded
    w_layer = None                                                           # one translator's sharding [d, d]
    if "W" in lp_sharding:
        w_layer = NamedSharding(mesh, P(*lp_sharding["W"].spec[1:]))
    constrain = jax.lax.with_sharding_constraint

    ng = plan.layer_groups
    G = Ls // ng

    def micro_grads(lp, mp, ids, layers, pos):
        """Data loss, statistics and lens gradient of one micro-batch (all its sequences), normalised by the
        step's token count. The frozen forward runs once; the trained layers' rows are then scored in
        ``layer_groups`` groups (a scan), each differentiated on its own, so only one group's
        [layers x tokens x d] rows and Jacobian rows are live at a time."""
        fw = decoder.apply(spec, mp, ids, act_sharding=act_sh)
        res_all = jax.lax.stop_gradient(fw.residuals)                           # [n+1, b, T, d]
        if plan.positions == "sampled":
            res_all = jnp.take(res_all, pos, axis=2)                             # [n+1, b, P, d]
        b = ids.shape[0]
        N = b * pos.shape[0]
        teacher = apply_norm(spec, mp["final_norm"], res_all[n]).reshape(N, -1)
        if Ls == nt:                                                             # every trained layer: a slice
            res = res_all[first:first + nt].reshape(Ls, N, -1)
        else:
            res = jnp.take(res_all, layers, axis=0).reshape(Ls, N, -1)
        res = constrain(res, rows_sh)
        W, bias = decoder.unembedding(spec, mp)
        cdt = jnp.dtype(plan.lens_matmul)
        Wc = W.astype(cdt)

        def group_loss(lp, gi, res_g, lay_g):
            lpg = lp
            if ng > 1 and plan.family == "tuned-lens":                          # this group's translators
                lpg = {k: jax.lax.dynamic_slice_in_dim(v, gi * G, G, 0) for k, v in lp.items()}
            rows, it = _rows(plan, spec, lpg, mp, res_g, lay_g, w_layer)         # [G, N, d]
            ce, H = vocab_parallel_ce(jnp.swapaxes(rows, 0, 1), teacher, Wc, bias, it, mesh=mesh,
                                      softcap=spec.final_softcap, chunk=plan.chunk, compute_dtype=cdt)
            kl = ce - H[:, None]                                                 # [N, G]
            obj = kl if plan.loss == "kl" else ce
            loss = jnp.sum(obj) / (n_tok_micro * layer_div * M)
            slot = lay_g - first
            kl_sum = jnp.zeros((nt,), F32).at[slot].add(jnp.sum(kl, axis=0))
            ce_sum = jnp.zeros((nt,), F32).at[slot].add(jnp.sum(ce, axis=0))
            cnt = jnp.zeros((nt,), F32).at[slot].add(jnp.float32(kl.shape[0]))
            return loss, (kl_sum, ce_sum, cnt, jnp.where(gi == 0, jnp.sum(H), 0.0))

        vg = jax.value_and_grad(group_loss, has_aux=True)
        def body(acc, inp):
            gi, res_g, lay_g = inp
            (loss, stats), g = vg(lp, gi, res_g, lay_g)
            gsum, lsum, st = acc
            return (constrain(jax.tree.map(jnp.add, gsum, g), lp_sharding), lsum + loss,
                    tuple(a + s_ for a, s_ in zip(st, stats))), None

        z = jnp.zeros((nt,), F32)
        acc0 = (constrain(jax.tree.map(jnp.zeros_like, lp), lp_sharding), jnp.float32(0), (z, z, z, jnp.float32(0)))
        (g, loss, stats), _ = jax.lax.scan(body, acc0, (jnp.arange(ng, dtype=jnp.int32),
                                                         res.reshape((ng, G) + res.shape[1:]), layers.reshape(ng, G)))
        return loss, stats, g

    def data_grads(lp, mp, ids, layers, pos):
        def body(acc, inp):
            ids_m, lay_m, pos_m = inp
            loss, stats, g = micro_grads(lp, mp, ids_m, lay_m, pos_m)
            gsum, lsum, kls, ces, cnts, hs = acc
            return (jax.tree.map(jnp.add, gsum, g), lsum + loss, kls + stats[0], ces + stats[1],
                    cnts + stats[2], hs + stats[3]), None

        z = jnp.zeros((nt,), F32)
        acc0 = (constrain(jax.tree.map(jnp.zeros_like, lp), lp_sharding), jnp.float32(0), z, z, z, jnp.float32(0))
        acc, _ = jax.lax.scan(body, acc0, (ids, layers, pos))
        return acc

    def reg_loss(lp, layers):
        reg = _regulariser(plan, lp)                                             # [nt]
        per_micro = jnp.sum(jnp.take(reg, layers - first), axis=-1) / layer_div  # [M]
        return jnp.mean(per_micro)

    def step(lp, opt_state, mp, ids, key):
        layers, pos = _sample(plan, key)
        g, data_loss, kl_sum, ce_sum, cnt, h_sum = data_grads(lp, mp, ids, layers, pos)
        rl, rg = jax.value_and_grad(reg_loss)(lp, layers)
        grads = constrain(jax.tree.map(jnp.add, g, rg), lp_sharding)
        updates, opt_state = optimizer.update(grads, opt_state, lp)
        lp = optax.apply_updates(lp, updates)
        metrics = {"loss": data_loss + rl, "data_loss": data_loss, "reg": rl,
                   "kl": kl_sum / jnp.maximum(cnt, 1), "ce": ce_sum / jnp.maximum(cnt, 1), "count": cnt,
                   "teacher_entropy": h_sum / (M * n_tok_micro), "grad_norm": _global_norm(grads)}
        return lp, opt_state, metrics

    rep = NamedSharding(mesh, P())
    return jax.jit(step, donate_argnums=(0, 1),
                   in_shardings=(lp_sharding, opt_sharding, mp_sharding, ids_sharding(mesh), rep),
                   out_shardings=(lp_sharding, opt_sharding, rep))


def _global_norm(tree):
    tree_norm = getattr(getattr(optax, "tree", None), "norm", None)
    return tree_norm(tree) if tree_norm is not None else optax.global_norm(tree)


_STEP_CACHE: dict = {}


def _cached_step(model, plan: Plan, optimizer, mesh, lp_sharding, opt_sharding, mp_sharding):
    """build_step, reused across runs in one process with the same spec, plan and mesh (no recompile)."""
    key = (model.spec, json.dumps(plan.as_dict(), sort_keys=True), tuple(d.id for d in mesh.devices.flat),
           tuple(mesh.shape.items()), tuple(jax.tree.leaves(mp_sharding)))
    if key not in _STEP_CACHE:
        if len(_STEP_CACHE) >= 8:
            _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
        _STEP_CACHE[key] = build_step(model, plan, optimizer, mesh, lp_sharding, opt_sharding, mp_sharding)
    return _STEP_CACHE[key]


# --------------------------------------------------------------------------------------------------
# Checkpoints (orbax)


def _ckpt_manager(out: str, create: bool = True):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(out), CKPT_DIR),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=create, enable_async_checkpointing=True),
        item_names=("lens", "opt", "rng", "meta"))


def _save(mngr, step: int, lp, opt_state, key_data, meta: dict) -> None:
    import orbax.checkpoint as ocp

    mngr.save(step, args=ocp.args.Composite(
        lens=ocp.args.StandardSave(lp), opt=ocp.args.StandardSave(opt_state),
        rng=ocp.args.StandardSave({"key": key_data}), meta=ocp.args.JsonSave(meta)), force=True)


def _restore(mngr, step: int, abstract_lp, abstract_opt, abstract_key):
    import orbax.checkpoint as ocp

    r = mngr.restore(step, args=ocp.args.Composite(
        lens=ocp.args.StandardRestore(abstract_lp), opt=ocp.args.StandardRestore(abstract_opt),
        rng=ocp.args.StandardRestore({"key": abstract_key}), meta=ocp.args.JsonRestore()))
    return r["lens"], r["opt"], r["rng"]["key"], r["meta"]


def _abstract_sharded(tree, shardings):
    """Abstract restore targets: ``tree``'s shapes / dtypes with one sharding per leaf (a matching tree)."""
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree, shardings)


# --------------------------------------------------------------------------------------------------
# Bookkeeping


def model_fingerprint(model) -> dict:
    """Model id / revision and a cheap fingerprint (config + weight file names and sizes)."""
    path = model.path or ""
    h = hashlib.sha256()
    files = []
    if path and os.path.isdir(path):
        with open(os.path.join(path, "config.json"), "rb") as f:
            h.update(f.read())
        for name in sorted(os.listdir(path)):
            if name.endswith((".safetensors", ".bin", ".msgpack", ".json")) and "tokenizer" not in name:
                size = os.path.getsize(os.path.join(path, name))
                files.append([name, size])
                h.update(f"{name}:{size}".encode())
    elif path and os.path.isfile(path):            # a GGUF file: its name and size
        name, size = os.path.basename(path), os.path.getsize(path)
        files.append([name, size])
        h.update(f"{name}:{size}".encode())
    revision = None
    parts = os.path.normpath(path).split(os.sep)
    if "snapshots" in parts and parts.index("snapshots") + 1 < len(parts):
        revision = parts[parts.index("snapshots") + 1]
    return {"id": model.source, "name": model.name, "path": path, "revision": revision, "arch": model.spec.arch,
            "n_layers": model.spec.n_layers, "d_model": model.spec.d_model, "vocab_size": model.spec.vocab_size,
            "dtype": str(jnp.dtype(model.dtype).name), "fingerprint": h.hexdigest(), "files": files}


def _run_config(plan: Plan, recipe: dict, model_fp: dict, data_desc: dict) -> dict:
    return {"plan": plan.as_dict(), "recipe": {"name": recipe["name"], "path": recipe["_path"],
                                               "sha256": recipe["_sha256"]},
            "model": {k: model_fp[k] for k in ("id", "fingerprint", "dtype", "arch")},
            "data": {k: data_desc.get(k) for k in ("kind", "sha256", "seq_len", "join_eos", "shuffle", "shuffle_seed")}}


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


@dataclasses.dataclass
class TrainResult:
    out: str
    step: int
    complete: bool
    lens: Any
    card: dict
    history: list


def _lens_from_params(plan: Plan, model, lp, card: dict, final_norm=None):
    lp = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), lp)
    if plan.family == "tuned-lens":
        fn = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), F32),
                          dict(final_norm if final_norm is not None else model.params["final_norm"]))
        return FullRankLens(lp["W"], lp["b"], NormSpec.of(model.spec), fn, card=card)
    return LowRankLens(lp["U"], lp["V"], lp["c"], lp.get("theta"), n_layers=plan.n_layers, card=card, base=plan.base)


def _losses_summary(plan: Plan, first: dict | None, history: list) -> dict:
    tail = history[-min(10, len(history)):] if history else []

    def mean_over(key):
        arr = np.array([h[key] for h in tail], np.float64)
        cnt = np.array([h["count"] for h in tail], np.float64)
        w = (cnt > 0).astype(np.float64)
        s = (arr * w).sum(0)
        c = w.sum(0)
        return [None if cc == 0 else float(v / cc) for v, cc in zip(s, c)]

    last = history[-1] if history else None
    return {
        "layers": plan.trained_layers,
        "units": "nats per token (KL(final || lens) and CE to the teacher); objective includes regularisers",
        "final_step": None if last is None else {
            "step": last["step"], "loss": last["loss"],
            "kl_nats": [None if c == 0 else v for v, c in zip(last["kl"], last["count"])]},
        "mean_last_steps": len(tail),
        "kl_nats_mean_last": mean_over("kl") if tail else None,
        "ce_nats_mean_last": mean_over("ce") if tail else None,
        "first_step": None if first is None else {
            "step": first["step"], "loss": first["loss"],
            "kl_nats": [None if c == 0 else v for v, c in zip(first["kl"], first["count"])]},
    }


# --------------------------------------------------------------------------------------------------
# The driver


# the plan keys that may differ on resume: where the run executes, not what it computes
_RESUME_FREE = ("plan.devices", "plan.mesh", "plan.layer_groups")


def _to_host(tree):
    """Whole numpy copies of (possibly sharded, multi-process) arrays, on every process."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def _local_value(x) -> np.ndarray:
    """A replicated (or fully addressable) array's value, from this process's first shard."""
    return np.asarray(x) if getattr(x, "is_fully_addressable", True) else np.asarray(x.addressable_data(0))


def resolve_mesh(mesh=None, devices=1):
    """The training mesh: ``mesh`` (a Mesh, a dict or "data=N,fsdp=N,tensor=N"), else ``devices`` data-parallel
    devices (0 / "all" = every device)."""
    from jaxlens import distributed as DI
    from jaxlens.models.sharding import make_mesh

    if mesh is not None:
        return mesh if hasattr(mesh, "devices") else DI.mesh_from_spec(mesh)
    ndev = len(jax.devices()) if devices in (0, "all") else int(devices)
    return make_mesh(data=ndev)


def _batch_shards(mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


def _model_params(model, mesh):
    """The frozen model's parameters on ``mesh`` by the logical-axis rules, and their shardings."""
    from jaxlens.models.sharding import layout_shardings

    shardings = layout_shardings(decoder.param_layout(model.spec), mesh)
    params = model.params
    leaves = jax.tree.leaves(params)
    if getattr(model, "mesh", None) is mesh or all(
            getattr(a, "sharding", None) == sh for a, sh in zip(leaves, jax.tree.leaves(shardings))):
        return params, shardings
    if jax.process_count() > 1 and not all(getattr(a, "is_fully_addressable", True) for a in leaves):
        raise JaxlensError("a model loaded on another mesh cannot be re-placed across processes; pass its source "
                           "(or load_model(..., mesh=<the training mesh>))")
    return jax.device_put(params, shardings), shardings


def train_lens(model_source, data: str, out: str, *, steps=None, recipe: str = "tuned-lens", stop_at=None,
               resume: bool = False, tokens_per_step=None, seq_len=None, micro_batch=None, devices: int = 1,
               mesh=None, coordinator=None, num_processes=None, process_id=None, distributed_auto: bool = False,
               checkpoint_every=None, seed=None, dtype: str = "float32", text_field: str = "text", chunk=None,
               lens_matmul: str | None = None, layer_groups: int | None = None, progress: bool = True,
               log: Callable[[str], None] | None = None) -> TrainResult:
    """Train (or resume) a tuned lens; see the module docstring. ``model_source`` is a source string or a Model.

    ``mesh``: "data=N,fsdp=N,tensor=N" (or a Mesh): the frozen model sharded by the logical-axis rules, the
    lens and optimizer state over fsdp, sequences over (data, fsdp), the vocabulary over tensor; without it,
    ``devices`` data-parallel devices. ``coordinator`` / ``num_processes`` / ``process_id`` (or
    ``distributed_auto``): join a ``jax.distributed`` job first (every process runs this with the same
    arguments; each feeds its own sequences; checkpoints are written by all, the lens by process 0).
    ``layer_groups``: score the trained layers in this many groups per micro-batch (less memory; a resume
    may change it).
    """
    from jaxlens import distributed as DI
    from jaxlens.models.loader import load_model
    from jaxlens.writers import write_json

    DI.initialize(coordinator, num_processes, process_id, auto=distributed_auto)   # before any backend use
    lead = jax.process_index() == 0
    say0 = log or (lambda msg: print(f"[jaxlens] {msg}", file=sys.stderr, flush=True))
    say = say0 if lead else (lambda msg: None)
    rec = load_recipe(recipe)
    if stop_at is not None and int(stop_at) < 1:
        raise JaxlensError("--stop-at must be at least 1")
    mesh = resolve_mesh(mesh, devices)
    shards = _batch_shards(mesh)
    model = load_model(model_source, dtype=dtype, mesh=mesh) if isinstance(model_source, str) else model_source
    tok = model.tokenizer
    tok_max = getattr(tok, "model_max_length", None)
    out = os.path.abspath(out)
    run_path = os.path.join(out, RUN_FILE)
    ckpt_path = os.path.join(out, CKPT_DIR)
    saved = None
    if resume and os.path.exists(run_path):
        with open(run_path) as f:
            saved = json.load(f)
    batching = None
    if saved is not None:                       # resume: the checkpointed run's micro-batches, on any mesh
        sp = saved["plan"]
        batching = {k: sp[k] for k in ("seqs_per_step", "micro_batches", "micro_batch_seqs", "tokens_per_step_reason")}
        if int(sp["micro_batch_seqs"]) % shards:
            raise JaxlensError(f"--resume: the checkpointed run's micro-batches of {sp['micro_batch_seqs']} sequences "
                               f"do not split over the {shards} data x fsdp shards of this mesh "
                               f"({dict(mesh.shape)}); resume on a mesh whose data x fsdp divides "
                               f"{sp['micro_batch_seqs']}")
    plan = make_plan(model, rec, steps=steps, tokens_per_step=tokens_per_step, seq_len=seq_len,
                     micro_batch=None if batching else micro_batch, devices=shards, seed=seed, chunk=chunk,
                     tokenizer_max=tok_max, lens_matmul=lens_matmul, batching=batching, mesh_shape=dict(mesh.shape),
                     layer_groups=layer_groups)
    if plan.steps < 1:
        raise JaxlensError("--steps must be at least 1")
    src = data_mod.open_source(data, tok, plan.seq_len, join_eos=bool(rec["data"].get("join_eos", True)),
                               seed=plan.seed, shuffle=bool(rec["data"].get("shuffle", True)), text_field=text_field,
                               vocab_size=model.spec.vocab_size)
    data_desc = src.describe()
    mfp = model_fingerprint(model)
    run_cfg = _run_config(plan, rec, mfp, data_desc)
    DI.agree(json.dumps(run_cfg, sort_keys=True, default=str), "the run's settings (model, data, recipe, plan)")
    every = int(checkpoint_every) if checkpoint_every else max(1, min(50, plan.steps // 4))
    have_ckpt = os.path.isdir(ckpt_path) and any(name.isdigit() for name in os.listdir(ckpt_path))
    if have_ckpt and not resume:
        raise JaxlensError(f"{out} already holds training checkpoints; pass --resume to continue, or use a new --out")
    if saved is not None:
        diff = [k for k in _diff(saved, json.loads(json.dumps(run_cfg))) if not k.startswith(_RESUME_FREE)]
        if diff:
            raise JaxlensError(f"--resume: this run's settings differ from the checkpointed run's in {', '.join(diff[:6])}")
    if lead:
        os.makedirs(out, exist_ok=True)
        write_json(run_path, run_cfg)
    DI.barrier("jaxlens-train-setup")

    optimizer = make_optimizer(plan)
    base_key = jax.random.key(plan.seed)
    rep = NamedSharding(mesh, P())
    abs_lp = jax.eval_shape(lambda: init_lens_params(plan, jax.random.fold_in(base_key, 0)))
    lp_sh = lens_shardings(abs_lp, mesh)
    abs_opt = jax.eval_shape(optimizer.init, abs_lp)
    opt_sh = opt_shardings(abs_opt, lp_sh, {k: v.shape for k, v in abs_lp.items()}, mesh)
    mparams, mp_sh = _model_params(model, mesh)
    mngr = _ckpt_manager(out)
    start, position, chash = 0, 0, data_mod.EMPTY_HASH
    first, tail, curve = None, [], []          # step-1 record, the last HISTORY_TAIL records, every step's loss
    if resume and mngr.latest_step() is not None:
        last = mngr.latest_step()
        abs_key = jax.ShapeDtypeStruct(jax.random.key_data(base_key).shape, jnp.uint32, sharding=rep)
        lp, opt_state, key_data, meta = _restore(mngr, last, _abstract_sharded(abs_lp, lp_sh),
                                                 _abstract_sharded(abs_opt, opt_sh), abs_key)
        if int(meta["step"]) != last:
            raise JaxlensError(f"checkpoint {last} in {ckpt_path} is inconsistent (meta step {meta['step']})")
        base_key = jax.random.wrap_key_data(jnp.asarray(_local_value(key_data)))
        start, position, chash = last, int(meta["data_position"]), meta["content_hash"]
        first, tail, curve = meta["first"], list(meta["tail"]), list(meta["curve"])
        say(f"resumed from step {last} (data position {position})")
    else:
        init = jax.jit(lambda: init_lens_params(plan, jax.random.fold_in(jax.random.key(plan.seed), 0)),
                       out_shardings=lp_sh)
        lp = init()
        opt_state = jax.jit(optimizer.init, in_shardings=(lp_sh,), out_shardings=opt_sh)(lp)
    key_data = DI.global_batch(np.asarray(_local_value(jax.random.key_data(base_key))), rep,
                               tuple(jax.random.key_data(base_key).shape))          # replicated on the mesh
    step_fn = _cached_step(model, plan, optimizer, mesh, lp_sh, opt_sh, mp_sh)
    ids_sh = ids_sharding(mesh)
    M, B, T = plan.micro_batches, plan.micro_batch_seqs, plan.seq_len
    lo, hi = DI.local_rows(DI.batch_sharding(mesh, B, 1), B)
    end = plan.steps if stop_at is None else min(plan.steps, int(stop_at))
    say(f"{plan.recipe} recipe on {model.name}: {plan.steps} steps x {plan.tokens_per_step} tokens "
        f"({plan.seqs_per_step} x {plan.seq_len}; {plan.micro_batches} micro-batches; mesh "
        f"{','.join(f'{k}={v}' for k, v in mesh.shape.items())}, {jax.process_count()} process(es)); "
        f"layers {plan.trained_layers[0]}..{plan.trained_layers[-1]}")
    bar = None
    if progress and lead:
        from tqdm import tqdm

        bar = tqdm(total=plan.steps, initial=start, unit="step", file=sys.stderr, dynamic_ncols=True,
                   desc="train-lens")
    timing = {"steps_timed": 0, "seconds": 0.0, "cpu_seconds": 0.0, "first_step_seconds": None}
    sleep = float(os.environ.get("JAXLENS_TRAIN_STEP_SLEEP", "0") or 0)   # test hook: widen the kill window
    try:
        for k in range(start + 1, end + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            batch = src.batch(position, plan.seqs_per_step)      # the whole step (its hash), fed by row shares
            chash = data_mod.chain_hash(chash, batch)
            local = np.ascontiguousarray(batch.reshape(M, B, T)[:, lo:hi])
            ids = DI.global_batch(local, ids_sh, (M, B, T))
            lp, opt_state, m = step_fn(lp, opt_state, mparams, ids, jax.random.fold_in(base_key, k))
            m = {name: _local_value(v) for name, v in m.items()}
            position += plan.seqs_per_step
            dt = time.perf_counter() - t0
            if timing["first_step_seconds"] is None:
                timing["first_step_seconds"] = dt
            else:
                timing["steps_timed"] += 1
                timing["seconds"] += dt
                timing["cpu_seconds"] += time.process_time() - c0
            rec_k = {"step": k, "loss": float(m["loss"]), "reg": float(m["reg"]),
                     "kl": [float(x) for x in m["kl"]], "ce": [float(x) for x in m["ce"]],
                     "count": [float(x) for x in m["count"]], "grad_norm": float(m["grad_norm"]),
                     "teacher_entropy": float(m["teacher_entropy"])}
            first = first or rec_k
            tail = (tail + [rec_k])[-HISTORY_TAIL:]
            curve.append(rec_k["loss"])
            if not np.isfinite(m["loss"]):
                raise JaxlensError(f"the loss became {float(m['loss'])} at step {k}")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(m['loss']):.4f}")
            if k % every == 0 or k == end:
                meta = {"step": k, "data_position": position, "content_hash": chash, "first": first,
                        "tail": tail, "curve": curve}
                _save(mngr, k, lp, opt_state, key_data, meta)
            if sleep:
                time.sleep(sleep)
        mngr.wait_until_finished()
    finally:
        if bar is not None:
            bar.close()
        mngr.close()
    final_step = max(end, start)
    complete = final_step >= plan.steps
    if timing["steps_timed"]:
        timing["tokens_per_second"] = timing["steps_timed"] * plan.tokens_per_step / timing["seconds"]
    card = {
        "model": {k: mfp[k] for k in ("id", "name", "revision", "arch", "n_layers", "d_model", "vocab_size",
                                       "dtype", "fingerprint")},
        "layer_convention": dict(LAYER_CONVENTIONS[plan.family], **(
            {"input": "final-normed residual (logit lens: the final norm at every layer)",
             "input_layer_0": "layer 0 (no translator) stays the norm lens"} if plan.base == "logit" else {})),
        "recipe": {"name": rec["name"], "summary": rec.get("summary"), "path": rec["_path"],
                   "sha256": rec["_sha256"], "notes": rec.get("notes", {}), "plan": plan.as_dict()},
        "data": {**data_desc, "content_hash": chash, "sequences_consumed": position,
                 "tokens_consumed": position * plan.seq_len},
        "training": {"complete": complete, "steps_done": final_step, "steps": plan.steps,
                     "tokens": final_step * plan.tokens_per_step, "tokens_per_step": plan.tokens_per_step,
                     "micro_batches": plan.micro_batches, "micro_batch_seqs": plan.micro_batch_seqs,
                     "devices": int(mesh.size), "mesh": {k: int(v) for k, v in mesh.shape.items()},
                     "processes": jax.process_count(), "checkpoint_every": every, "seed": plan.seed,
                     "lens_params_dtype": "float32", "model_dtype": mfp["dtype"],
                     "lens_matmul_dtype": plan.lens_matmul,
                     "jax": jax.__version__, "optax": optax.__version__, "backend": jax.default_backend()},
        "final_losses": _losses_summary(plan, first, tail),
        "loss_curve": [round(x, 6) for x in curve],
        "last_session": timing,
    }
    host_lp = _to_host(lp)
    final_norm = _to_host(dict(mparams["final_norm"])) if plan.family == "tuned-lens" else None
    lens = _lens_from_params(plan, model, host_lp, card, final_norm)
    if lead:
        save_lens(lens, out, card=card)
    DI.barrier("jaxlens-train-lens-written")
    say(f"{'finished' if complete else 'stopped'} at step {final_step}/{plan.steps}; lens written to {out}")
    return TrainResult(out=out, step=final_step, complete=complete, lens=lens, card=card, history=tail)
