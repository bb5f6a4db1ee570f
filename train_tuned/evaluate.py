"""``jaxlens eval-lens``: per-layer cross-entropy, entropy and KL of the logit lens and a tuned lens.

Same metrics as the tuned-lens package's ``tuned-lens eval`` (spec/tuned_lens.md §3.1), computed with the
streaming decode (:func:`jaxlens.lens_stats`, no [layers x tokens x vocab] logits):

* ``ce``: cross-entropy of the lens distribution against the next token (token shift 1; the last position
  of each sequence has no target and is dropped),
* ``entropy`` of the lens distribution (all positions),
* ``kl``: KL(p_final || q_lens) at the same position (all positions), the tuned-lens training objective,

averaged over tokens, in nats per token and in bits per byte (the package's units: nats x
``nats_to_bpb`` = (tokens / UTF-8 bytes of the text) / ln 2). ``baseline`` is the model itself (its CE
and entropy). A reference-family lens (which translates the norm lens's rows) is also compared with the
norm lens. Layers are jaxlens layers 0..n (layer n is the model's output for both lenses).

Sharded / multi-host (``mesh=`` / ``--mesh data=N,fsdp=N,tensor=N``, ``--coordinator`` ...): the model is
loaded sharded by its logical-axis rules, the lens replicated, and each batch of ``batch_seqs`` sequences is
split over (data, fsdp). A batch the (data x fsdp) shards do not divide (the last one, or any ``--batch``)
is padded with dummy rows of token 0 that are excluded from every sum. Each process feeds the rows its devices
hold (:func:`jaxlens.distributed.local_rows`), reads back the per-token values of the rows it owns
(:func:`jaxlens.distributed.owned_rows`: a row replicated over several processes is counted once), sums them
in float64, and the per-layer sums are added across processes in process order, so every process returns the
same dict; it equals the one-device result up to fp32 rounding of the sharded contractions (~1e-7
relative; the KL at layer n, ~0, only in absolute terms).
"""
from __future__ import annotations

import math
import os
import sys
import time

import numpy as np

from jaxlens.errors import JaxlensError
from jaxlens.lens.stats import lens_stats

from .data import FileData

LN2 = math.log(2.0)


def evaluate_lens(model, lens, data_path: str, *, seq_len: int | None = None, max_tokens: int | None = None,
                  batch_seqs: int = 8, text_field: str = "text", join_eos: bool = True, progress: bool = True,
                  lenses: tuple | None = None, mesh=None, dtype: str = "float32") -> dict:
    """Evaluate ``lens`` (and the logit lens; the norm lens too for a lens on the norm lens's rows) on
    ``data_path``; returns the JSON-able result dict.

    ``model``: a loaded Model or a source (loaded with ``dtype``, sharded over ``mesh``); ``lens``: a lens
    object or a lens directory. ``mesh``: a :class:`jax.sharding.Mesh` or ``"data=N,fsdp=N,tensor=N"``
    (default: the model's own mesh, if it was loaded with one): the parameters stay as loaded, the lens is
    replicated, and each batch is split over (data, fsdp); under ``jax.distributed`` each process feeds the
    rows its devices hold (module docstring). Every process returns the same dict."""
    from jaxlens import distributed as DI

    if mesh is not None and not hasattr(mesh, "shape"):
        mesh = DI.mesh_from_spec(mesh)
    if isinstance(model, str):
        from jaxlens.models.loader import load_model

        model = load_model(model, dtype=dtype, mesh=mesh)
    elif mesh is None:
        mesh = getattr(model, "mesh", None)
    elif getattr(model, "mesh", None) is None or model.mesh != mesh:
        raise JaxlensError("a loaded model evaluated on a mesh must have been loaded with that mesh "
                           "(load_model(..., mesh=...)); or pass its source instead")
    if isinstance(lens, str):
        from jaxlens.lens.tuned import load_lens

        lens = load_lens(lens, model=model)
    if lenses is None:
        lenses = ("logit", "tuned") + (("norm",) if getattr(lens, "base", None) == "norm" else ())
    tok = model.tokenizer
    card = getattr(lens, "card", {}) or {}
    plan = (card.get("recipe") or {}).get("plan") or {}
    if seq_len is None:
        seq_len = int(plan.get("seq_len") or min(2048, model.spec.max_positions))
    seq_len = min(int(seq_len), int(model.spec.max_positions))
    batch_seqs = int(batch_seqs)
    if batch_seqs < 1:
        raise JaxlensError(f"--batch must be a positive number of sequences; got {batch_seqs}")
    src = FileData(data_path, tok, seq_len, join_eos=join_eos, shuffle=False, text_field=text_field,
                   vocab_size=model.spec.vocab_size)
    n_seq = src.n_sequences
    if max_tokens:
        n_seq = min(n_seq, max(1, int(max_tokens) // seq_len))
    if mesh is not None:
        DI.agree(f"{src.sha256} {n_seq} {seq_len} {batch_seqs} {sorted(lenses)}", "the evaluation data and plan")
    n = model.spec.n_layers
    which = {"logit": "logit", "tuned": _placed(lens, mesh), "norm": "norm"}
    shards = 1 if mesh is None else int(mesh.shape["data"]) * int(mesh.shape["fsdp"])
    # this process's sums over the rows it owns (float64, on the host); added across processes at the end
    sums = np.zeros((len(lenses), 3, n + 1))
    cnt_ce = cnt_all = 0
    bar = None
    if progress and DI.info().is_coordinator:
        from tqdm import tqdm

        bar = tqdm(total=n_seq * seq_len, unit="tok", unit_scale=True, file=sys.stderr, dynamic_ncols=True,
                   desc="eval-lens")
    t0 = time.perf_counter()
    try:
        for s in range(0, n_seq, batch_seqs):
            nb = min(batch_seqs, n_seq - s)
            ids = src.batch(s, nb)
            B = -(-nb // shards) * shards                 # padded with dummy rows (id 0) that are not summed
            if B > nb:
                ids = np.concatenate([ids, np.zeros((B - nb, seq_len), ids.dtype)])
            gold = np.full_like(ids, -1)
            gold[:, :-1] = ids[:, 1:]
            if mesh is None:
                own = (0, nb)
                x = ids
            else:
                sh = DI.batch_sharding(mesh, B, 2)
                lo, hi = DI.local_rows(sh, B)
                olo, ohi = DI.owned_rows(sh, B)
                own = (olo, max(olo, min(ohi, nb)))
                x = DI.global_batch(ids[lo:hi], sh, ids.shape)
            fw = model.forward(x)
            # lens_stats reads the mask on the host (every position is a token, the dummy rows' too): numpy
            fw = fw._replace(attention_mask=np.ones(ids.shape, bool))
            for li, name in enumerate(lenses):
                st = lens_stats(model, fw, lens=which[name], gold_ids=gold, top_k=0, cosine=False)
                per_tok = _per_token(mesh, B)(st.lse, st.gold_logit, st.entropy_bits, st.kl_final_to_layer_bits)
                if own[1] > own[0]:
                    v = DI.host_rows(per_tok, *own).astype(np.float64)        # [rows, 3, n+1, T]
                    sums[li, 0] += v[:, 0, :, :-1].sum(axis=(0, 2))
                    sums[li, 1] += v[:, 1].sum(axis=(0, 2)) * LN2
                    sums[li, 2] += v[:, 2].sum(axis=(0, 2)) * LN2
            cnt_ce += nb * (seq_len - 1)
            cnt_all += nb * seq_len
            if bar is not None:
                bar.update(nb * seq_len)
    finally:
        if bar is not None:
            bar.close()
    if cnt_all == 0:
        raise JaxlensError(f"{data_path} gave no sequences to evaluate")
    if mesh is not None:                 # without a mesh every process evaluated every row by itself
        sums = _sum_over_processes(sums)
    bpb = src.nats_to_bpb
    out = {
        "model": {"id": model.source, "name": model.name, "arch": model.spec.arch, "n_layers": n},
        "lens": {"family": getattr(lens, "family", None), "source": card.get("source"),
                 "model": (card.get("model") or {}).get("id"),
                 "layer_convention": card.get("layer_convention")},
        "data": {**src.describe(), "sequences_evaluated": n_seq, "tokens_evaluated": cnt_all},
        "layers": list(range(n + 1)),
        "units": {"nats": "nats per token", "bpb": "bits per byte = nats x nats_to_bpb (tuned-lens eval units)"},
        "nats_to_bpb": bpb,
        "mesh": None if mesh is None else {k: int(v) for k, v in mesh.shape.items()},
        "processes": DI.info().process_count,
        "seconds": time.perf_counter() - t0,
    }
    for li, name in enumerate(lenses):
        ce = sums[li, 0] / cnt_ce
        ent = sums[li, 1] / cnt_all
        kl = sums[li, 2] / cnt_all
        out[name] = {"ce_nats": ce.tolist(), "entropy_nats": ent.tolist(), "kl_nats": kl.tolist(),
                     "ce_bpb": (ce * bpb).tolist(), "entropy_bpb": (ent * bpb).tolist(), "kl_bpb": (kl * bpb).tolist()}
    ref = lenses[0]
    base_ce = out[ref]["ce_nats"][n]
    base_h = out[ref]["entropy_nats"][n]
    out["baseline"] = {"ce_nats": base_ce, "entropy_nats": base_h, "ce_bpb": base_ce * bpb, "entropy_bpb": base_h * bpb}
    return out


def _placed(lens, mesh):
    """``lens`` with its arrays replicated over ``mesh`` (under jax.distributed a computation may only mix
    arrays that live on the mesh); unchanged without a mesh."""
    if mesh is None or isinstance(lens, str):
        return lens
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxlens.sweep.engine import split_lens

    arrays, rebuild = split_lens(lens)
    if not arrays:
        return lens
    rep = NamedSharding(mesh, P())
    return rebuild(jax.tree.map(lambda a: jax.device_put(np.asarray(a), rep), arrays))


_PER_TOKEN: dict = {}


def _per_token(mesh, B: int):
    """jit (lse, gold_logit, entropy_bits, kl_bits) [R, B, T] -> [B, 3, R, T] fp32 (ce = lse - gold logit),
    batch-major and placed like the batch, so that each process reads its own rows back."""
    import jax
    import jax.numpy as jnp

    key = (id(mesh), B)
    if key not in _PER_TOKEN:
        kw = {}
        if mesh is not None:
            from jaxlens.distributed import batch_sharding

            kw["out_shardings"] = batch_sharding(mesh, B, 4)

        def fn(lse, g, ent, kl):
            v = jnp.stack([lse - g, ent, kl]).astype(jnp.float32)                 # [3, R, B, T]
            return jnp.transpose(v, (2, 0, 1, 3))

        _PER_TOKEN[key] = (jax.jit(fn, **kw), mesh)
        while len(_PER_TOKEN) > 16:
            _PER_TOKEN.pop(next(iter(_PER_TOKEN)))
    return _PER_TOKEN[key][0]


def _sum_over_processes(x: np.ndarray) -> np.ndarray:
    """The float64 sum of ``x`` over all processes, added in process order (the same on every process)."""
    import jax

    x = np.ascontiguousarray(x, np.float64)
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    raw = np.asarray(multihost_utils.process_allgather(x.reshape(-1).view(np.uint8)))
    parts = raw.reshape(jax.process_count(), -1).view(np.float64)
    total = np.zeros(x.size)
    for row in parts:
        total = total + row
    return total.reshape(x.shape)


def format_table(res: dict) -> str:
    """A fixed-width per-layer table (nats per token, and bits per byte for KL)."""
    lenses = [k for k in ("logit", "tuned", "norm") if k in res]
    head = ["layer"] + [f"{m}_{k}" for m in ("ce", "H", "kl") for k in lenses] + [f"kl_bpb_{k}" for k in lenses]
    lines = ["  ".join(f"{h:>10}" for h in head)]
    key = {"ce": "ce_nats", "H": "entropy_nats", "kl": "kl_nats"}
    for layer in res["layers"]:
        cells = [f"{layer:>10d}"]
        for m in ("ce", "H", "kl"):
            cells += [f"{res[k][key[m]][layer]:>10.4f}" for k in lenses]
        cells += [f"{res[k]['kl_bpb'][layer]:>10.4f}" for k in lenses]
        lines.append("  ".join(cells))
    b = res["baseline"]
    lines.append(f"baseline (model): ce {b['ce_nats']:.4f} nats/token ({b['ce_bpb']:.4f} bits/byte), "
                 f"entropy {b['entropy_nats']:.4f} nats/token; {res['data']['tokens_evaluated']} tokens")
    return "\n".join(lines)


def default_out(lens_dir: str, data_path: str) -> str:
    stem = os.path.splitext(os.path.basename(data_path.rstrip("/")))[0] or "data"
    return os.path.join(lens_dir, f"eval-{stem}.json")


__all__ = ["evaluate_lens", "format_table", "default_out"]
