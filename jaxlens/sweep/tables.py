"""The sweep's tables: per-layer rows and per-prompt summaries, from the engine's fetched outputs, with the
probe's own metric functions (one implementation of each metric).

* per-layer (``layers``): one row per prompt x lens x layer, every column of
  :func:`jaxlens.probe.metrics.pure_next_token_metrics` under its pure-CSV name (``entropy_bits``,
  ``kl_to_final_bits``, ``answer_rank``, ``p_answer``, the copy flags, ``cos_to_final``, ...), plus
  ``kl_final_to_layer_bits`` (the tuned-lens direction, from the same streaming pass), ``top1..topK`` /
  ``prob1..probK`` and ``top_ids``. The arguments are built exactly as the probe's
  :func:`jaxlens.probe.passes.lens_pass_metrics` builds them, so a suite's prompts give the probe's pure rows.
* per-prompt (``prompts``): one row per prompt x lens with its status, the summary of
  :func:`jaxlens.probe.summaries.summarize_pass` (L_copy, L_copy_soft_k*, L_semantic, first_rank_le_*,
  first_kl_below_*, ...), depth fractions (every lens, :func:`jaxlens.probe.metrics.depth_fraction`),
  confirmed semantics (:func:`jaxlens.probe.diagnostics.semantics.confirmed_semantics`, on the norm lens's
  row when the raw or tuned lens is swept) and the input's carried columns.
* positions (``--positions all``): records-style rows, one per prompt x lens x layer x position.

Layer conventions are the probe's: norm / logit / raw / prism over 0..n, tuned over 1..n.
Schemas are fixed before the first shard (so every shard of a table has the same columns and types).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional, Sequence

import numpy as np

from jaxlens.probe import metrics as M
from jaxlens.probe import summaries as SU
from jaxlens.probe.diagnostics.semantics import confirmed_semantics

FLOAT_COLS = ["rest_mass", "p_top1", "p_top5", "p_answer", "answer_minus_uniform", "teacher_entropy_bits",
              "kl_to_final_bits", "kl_final_to_layer_bits", "cos_to_final", "cos_to_answer", "cos_to_prompt_max",
              "echo_mass_prompt", "answer_mass", "answer_minus_echo_mass", "mass_ratio_ans_over_prompt",
              "topk_prompt_mass@50", "control_margin", "answer_logit_gap", "answer_vs_top1_gap"]
BOOL_COLS = ["entropy_collapse", "is_answer", "semantic_margin_ok", "geom_crossover"]
PROMPT_BASE = ["prompt_index", "prompt_id", "lens", "status", "status_detail", "n_tokens", "n_layers", "answer",
               "answer_ids", "answer_variant", "control_answer"]


@dataclasses.dataclass
class LensPlan:
    """One swept lens: its name (the ``lens`` column), the lens object and the layers it reports."""

    name: str
    lens: Any
    layers: np.ndarray        # reported layers (subset of the decoded 0..n)
    tag: str                  # the probe's lens tag for the metric functions ("norm", "tuned", "prism", ...)


def copy_columns(th) -> list:
    return ["copy_collapse"] + M.copy_flag_columns(th.copy)


def summary_int_cols(th) -> list:
    soft = list(dict.fromkeys(int(k) for k in th.copy.soft_window_ks))
    kl = [f"first_kl_below_{float(x)}" for x in th.semantic.kl_milestones]
    rk = [f"first_rank_le_{k}" for k in th.semantic.rank_milestones]
    return (["L_copy", "L_copy_H", "L_semantic", "delta_layers"] + kl + rk + [f"L_copy_soft_k{k}" for k in soft]
            + ["L_semantic_margin_ok", "L_semantic_run2", "L_semantic_strong", "L_semantic_strong_run2",
               "L_semantic_top2_ok", "L_surface_to_meaning", "L_geom", "L_topk_decay", "L_semantic_confirmed"])


def fraction_cols(th) -> list:
    soft = sorted(dict.fromkeys(int(k) for k in th.copy.soft_window_ks))
    return (["L_semantic_frac", "first_rank_le_5_frac", "L_copy_strict_frac"]
            + [f"L_copy_soft_k{k}_frac" for k in soft]
            + ["L_semantic_run2_frac", "L_semantic_strong_frac", "L_semantic_strong_run2_frac",
               "first_kl_below_1.0_frac"])


def schemas(th, top_k: int, extra: dict, positions: bool, residuals: bool) -> dict:
    """pyarrow schemas of the tables. ``extra``: carried column name -> pyarrow type."""
    import pyarrow as pa

    f64, i32, i64, s, b = pa.float64(), pa.int32(), pa.int64(), pa.string(), pa.bool_()
    layer = [("prompt_index", i64), ("prompt_id", s), ("lens", s), ("layer", i32), ("pos", i32),
             ("entropy_bits", f64)]
    for j in range(1, top_k + 1):
        layer += [(f"top{j}", s), (f"prob{j}", f64)]
    layer += [("top_ids", pa.list_(i32))]
    layer += [(c, b) for c in copy_columns(th)]
    layer += [(c, b) for c in BOOL_COLS]
    layer += [(c, f64) for c in FLOAT_COLS]
    layer += [("answer_rank", i32)]
    prompt = [("prompt_index", i64), ("prompt_id", s), ("lens", s), ("status", s), ("status_detail", s),
              ("n_tokens", i32), ("n_layers", i32), ("answer", s), ("answer_ids", pa.list_(i32)),
              ("answer_variant", s), ("control_answer", s)]
    prompt += [(c, i32) for c in summary_int_cols(th)]
    prompt += [(c, f64) for c in fraction_cols(th)]
    prompt += [("confirmed_source", s), ("copy_stability", s), ("entropy_gap_p25", f64), ("entropy_gap_p50", f64),
               ("entropy_gap_p75", f64)]
    if residuals:
        prompt += [("residual_file", s), ("residual_row", i64)]
    prompt += list(extra.items())
    out = {"layers": pa.schema(layer), "prompts": pa.schema(prompt)}
    if positions:
        pos = [("prompt_index", i64), ("prompt_id", s), ("lens", s), ("layer", i32), ("pos", i32), ("token", s),
               ("entropy_bits", f64), ("kl_to_final_bits", f64), ("answer_rank", i32), ("p_answer", f64)]
        for j in range(1, top_k + 1):
            pos += [(f"top{j}", s), (f"prob{j}", f64)]
        pos += [("rest_mass", f64), ("top_ids", pa.list_(i32))]
        out["positions"] = pa.schema(pos)
    return out


def carried_types(prompt_set, reserved_names: Sequence[str]) -> tuple:
    """(name map input column -> output column, output column -> pyarrow type) for the carried columns."""
    import pyarrow as pa

    taken = set(reserved_names)
    names, types = {}, {}
    for c in prompt_set.extra_columns:
        out = c if c not in taken else f"input.{c}"
        names[c] = out
        vals = [r.extra.get(c) for r in prompt_set.rows]
        try:
            t = pa.array(vals).type
            if pa.types.is_null(t):
                t = pa.string()
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError):
            t = pa.string()
        types[out] = t
    return names, types


def _carried_value(v, t):
    import pyarrow as pa

    if pa.types.is_string(t) and v is not None and not isinstance(v, str):
        return json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v)
    return v


class TableBuilder:
    """Column buffers of one table part; ``batch()`` turns them into a pyarrow RecordBatch."""

    def __init__(self, schema):
        self.schema = schema
        self.cols: dict = {f.name: [] for f in schema}
        self.batches: list = []
        self.rows = 0

    def add(self, row: dict) -> None:
        for name, col in self.cols.items():
            col.append(row.get(name))
        self.rows += 1

    def flush(self) -> None:
        import pyarrow as pa

        if self.cols and len(next(iter(self.cols.values()))):
            self.batches.append(pa.RecordBatch.from_pydict(self.cols, schema=self.schema))
            self.cols = {f.name: [] for f in self.schema}

    def table(self):
        import pyarrow as pa

        self.flush()
        return pa.Table.from_batches(self.batches, schema=self.schema)


# --------------------------------------------------------------------------------------------------
# rows of one prompt


def _f(x):
    return None if x is None else float(x)


def lens_columns(out: dict, b: int, j: int, n: int, lp: LensPlan, job, *, V: int, decode, th, top_k: int) -> dict:
    """The pure next-token columns of prompt b (row of the fetched batch) for stacked lens block j, built
    as :func:`jaxlens.probe.passes.lens_pass_metrics` builds them."""
    sel = j * (n + 1) + np.asarray(lp.layers, np.int64)          # rows of this lens's reported layers
    g = job.gold
    gid = g.first_id if (g is not None and g.ok) else None
    gl = out["gathered"][b][sel]                                   # [L, S]: answer, control answer, prompt vocab
    lse = out["lse"][b][sel]
    top_ids = out["top_ids"][b][sel]
    top_probs = out["top_probs"][b][sel]
    with np.errstate(divide="ignore"):
        top_scores = np.log(top_probs.astype(np.float64)) + lse[:, None]
    pv = job.prompt_vocab
    prompt_probs = np.exp(gl[:, 2:2 + len(pv)].astype(np.float64) - lse[:, None])
    rows = out["rows"][b][sel].astype(np.float32)                  # h_geom [L, d]
    W_sub = np.ascontiguousarray(out["Wg"][b].astype(np.float32).T)    # [d, S]: W_U at the gathered ids
    cos_answer, cos_prompt = M.geom_cosines(rows, W_sub, 0 if gid is not None else None, list(range(2, 2 + len(pv))))
    control = None
    c = job.control
    if c is not None and c.ok and gid is not None:
        control = (np.exp(gl[:, 0] - lse), np.exp(gl[:, 1] - lse))
    teacher_H = M.teacher_entropy_bits(out["final_logits"][b])
    t = len(job.ids) - 1
    cols = M.pure_next_token_metrics(
        entropy_bits=out["entropy_bits"][b][sel], kl_to_final_bits=out["kl_to_final_bits"][b][sel],
        top_ids=top_ids, top_probs=top_probs, teacher_entropy_bits=teacher_H, vocab_size=V,
        ctx_ids=job.ctx_ids, decode=decode, gold_id=gid, gold_string=g.string if (g is not None and g.ok) else None,
        gold_rank=out["gold_rank"][b][sel] if gid is not None else None,
        gold_prob=out["gold_prob"][b][sel] if gid is not None else None,
        answer_score=gl[:, 0] if gid is not None else None, top_scores=top_scores,
        cos_to_final=out["cos_to_final"][b][sel], cos_to_answer=cos_answer, cos_to_prompt=cos_prompt,
        prompt_probs=prompt_probs, prompt_vocab_ids=pv, control_probs=control,
        layers=[int(x) for x in lp.layers], lens=lp.tag, thresholds=th, pure_top_k=top_k, pos=t)
    cols["kl_final_to_layer_bits"] = [float(x) for x in out["kl_final_to_layer_bits"][b][sel]]
    return cols


def layer_rows(cols: dict, job, lens_name: str, decode, top_k: int, copy_cols: list) -> list:
    t = len(job.ids) - 1
    out = []
    base = {"prompt_index": job.row.index, "prompt_id": job.row.id, "lens": lens_name, "pos": t}
    for i, layer in enumerate(cols["layer"]):
        row = dict(base, layer=int(layer), entropy_bits=_f(cols["entropy_bits"][i]))
        ids = cols["top_ids"][i]
        for k in range(top_k):
            row[f"top{k + 1}"] = decode(int(ids[k])) if k < len(ids) else None
            row[f"prob{k + 1}"] = _f(cols["top_probs"][i][k]) if k < len(ids) else None
        row["top_ids"] = [int(x) for x in ids]
        for name in copy_cols + BOOL_COLS:
            v = cols.get(name, [None] * len(cols["layer"]))[i]
            row[name] = None if v is None else bool(v)
        for name in FLOAT_COLS:
            v = cols.get(name, [None] * len(cols["layer"]))[i]
            row[name] = _f(v)
        r = cols["answer_rank"][i]
        row["answer_rank"] = None if r is None else int(r)
        out.append(row)
    return out


def prompt_row(job, lens_name: str, summary: Optional[dict], *, n_layers: int, th, status: str,
               detail: Optional[str], carried: dict, confirmed: Optional[dict] = None, n_tokens=None,
               residual: Optional[tuple] = None) -> dict:
    r = job.row if hasattr(job, "row") else job
    g = getattr(job, "gold", None)
    row = {"prompt_index": r.index, "prompt_id": r.id, "lens": lens_name, "status": status, "status_detail": detail,
           "n_tokens": n_tokens, "n_layers": int(n_layers), "answer": r.answer, "control_answer": r.control_answer,
           "answer_ids": list(g.answer_ids) if (g is not None and g.ok) else None,
           "answer_variant": g.variant if g is not None else None}
    for name, v in carried.items():
        row[name] = v
    if residual is not None:
        row["residual_file"], row["residual_row"] = residual
    if summary is None:
        return row
    s = summary
    for k in ["L_copy", "L_copy_H", "L_semantic", "delta_layers", "L_semantic_margin_ok", "L_semantic_run2",
              "L_semantic_strong", "L_semantic_strong_run2", "L_semantic_top2_ok"]:
        row[k] = s.get(k)
    for x in th.semantic.kl_milestones:
        row[f"first_kl_below_{float(x)}"] = s.get(f"first_kl_below_{float(x)}")
    for k in th.semantic.rank_milestones:
        row[f"first_rank_le_{k}"] = s.get(f"first_rank_le_{k}")
    for k, v in (s.get("L_copy_soft") or {}).items():
        row[f"L_copy_soft_k{int(k)}"] = v
    for base in ("L_surface_to_meaning", "L_geom", "L_topk_decay"):
        key = next((key for key in s if key.startswith(base + "_") or key == base), None)
        row[base] = s.get(key) if key else None
    n = int(n_layers)
    soft = sorted(dict.fromkeys(int(k) for k in th.copy.soft_window_ks))
    row["L_semantic_frac"] = M.depth_fraction(s.get("L_semantic"), n)
    row["first_rank_le_5_frac"] = M.depth_fraction(s.get("first_rank_le_5"), n)
    row["L_copy_strict_frac"] = M.depth_fraction(s.get("L_copy"), n)
    for k in soft:
        row[f"L_copy_soft_k{k}_frac"] = M.depth_fraction((s.get("L_copy_soft") or {}).get(k), n)
    row["L_semantic_run2_frac"] = M.depth_fraction(s.get("L_semantic_run2"), n)
    row["L_semantic_strong_frac"] = M.depth_fraction(s.get("L_semantic_strong"), n)
    row["L_semantic_strong_run2_frac"] = M.depth_fraction(s.get("L_semantic_strong_run2"), n)
    row["first_kl_below_1.0_frac"] = M.depth_fraction(s.get("first_kl_below_1.0"), n)
    row["copy_stability"] = (s.get("copy_thresholds") or {}).get("stability")
    pct = s.get("entropy_gap_bits_percentiles") or {}
    for q in ("p25", "p50", "p75"):
        row[f"entropy_gap_{q}"] = pct.get(q)
    if confirmed is not None:
        row["L_semantic_confirmed"] = confirmed.get("L_semantic_confirmed")
        row["confirmed_source"] = confirmed.get("confirmed_source")
    return row


def prompt_metrics(out: dict, b: int, job, plans: Sequence[LensPlan], *, n: int, V: int, decode, th, quirks,
                   top_k: int) -> list:
    """[(lens plan, pure columns, summary)] of one prompt, every swept lens."""
    res = []
    for j, lp in enumerate(plans):
        cols = lens_columns(out, b, j, n, lp, job, V=V, decode=decode, th=th, top_k=top_k)
        summary = SU.summarize_pass(cols, n_layers=n, lens=lp.tag, p_uniform=1.0 / V, thresholds=th, quirks=quirks)
        res.append((lp, cols, summary))
    return res


def confirmed_for(results: list, th) -> Optional[dict]:
    """Confirmed semantics of the norm lens from the raw / tuned ranks (None when neither is swept)."""
    by = {lp.name: (lp, cols, s) for lp, cols, s in results}
    if "norm" not in by or not ({"raw", "tuned"} & set(by)):
        return None

    def ranks(key):
        if key not in by:
            return None
        _, cols, _ = by[key]
        return {int(layer): r for layer, r in zip(cols["layer"], cols["answer_rank"])}
    return confirmed_semantics(by["norm"][2].get("L_semantic"), ranks("raw") or {}, ranks("tuned"),
                               window=th.semantic.confirm_window)


def position_rows(out: dict, b: int, j: int, n: int, lp: LensPlan, job, token_strs: list, decode, top_k: int) -> list:
    sel = j * (n + 1) + np.asarray(lp.layers, np.int64)
    T = len(job.ids)
    ent = out["pos_entropy_bits"][b][:T][:, sel]                   # [T, L]
    kl = out["pos_kl_to_final_bits"][b][:T][:, sel]
    tid = out["pos_top_ids"][b][:T][:, sel]
    tpr = out["pos_top_probs"][b][:T][:, sel]
    has_gold = job.gold is not None and job.gold.ok
    rk = out["pos_gold_rank"][b][:T][:, sel] if has_gold else None
    pr = out["pos_gold_prob"][b][:T][:, sel] if has_gold else None
    rest = M.rest_mass(tpr[..., :top_k])
    rows = []
    for i, layer in enumerate(lp.layers):
        for t in range(T):
            row = {"prompt_index": job.row.index, "prompt_id": job.row.id, "lens": lp.name, "layer": int(layer),
                   "pos": t, "token": token_strs[t], "entropy_bits": float(ent[t, i]),
                   "kl_to_final_bits": float(kl[t, i]),
                   "answer_rank": None if rk is None else int(rk[t, i]),
                   "p_answer": None if pr is None else float(pr[t, i])}
            for k in range(top_k):
                row[f"top{k + 1}"] = decode(int(tid[t, i, k]))
                row[f"prob{k + 1}"] = float(tpr[t, i, k])
            row["rest_mass"] = float(rest[t, i])
            row["top_ids"] = [int(x) for x in tid[t, i, :top_k]]
            rows.append(row)
    return rows
