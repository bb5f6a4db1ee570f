"""The tuned lens inside the probe (spec/probe.md §3.3-3.7): ``jaxlens probe --tuned LENS_DIR``.

Given a trained lens (any format :func:`jaxlens.load_lens` reads), the probe adds, with no extra forward
pass over the lens passes:

* tuned records (all positions) and tuned pure next-token rows (last position) for layers 1..n of every
  pass, their per-pass summaries (``tuned_lens.summaries``) and the ``*_tuned`` mirrors of the primary one;
* the unified metrics (rank milestones, KL at 25/50/75 % depth, first KL <= 1 against the norm lens);
* the rotation-vs-temperature attribution and ``prefer_tuned`` gate (§3.5);
* the tuned audit (§3.6): variant rows (tuned / rotation only / temperature only vs the norm lens), the
  position grid, the head-mismatch temperature, the audit summary and the provenance snapshot;
* the skip-layers sanity check (§3.7).

Every decode is a fused :func:`jaxlens.lens_stats` call: the tuned, rotation-only and temperature-only lenses
at the last position of every pass go through ONE streaming pass (:func:`jaxlens.lens.multi.multi_lens_stats`),
and so do the norm and tuned lenses at the position grid.

Reference bugs fixed here (spec Appendix A; ``--reference-quirks`` restores them): Q2 (the audit describes the
primary fact, not whichever pos/orig pass ran last), Q9 (skipping m blocks decodes layer n-m, not n-m+1) and
N3 (``prefer_tuned``'s rank rule needs the tuned lens to be strictly earlier).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Optional

import numpy as np

from jaxlens.probe import diagnostics as D
from jaxlens.probe.diagnostics.calibration import _log_softmax64
from jaxlens.probe import gold as gold_mod
from jaxlens.probe import metrics as M
from jaxlens.probe.passes import lens_pass_metrics
from jaxlens.models.decoder import ForwardOutput
from jaxlens.errors import JaxlensError
from jaxlens.lens.stats import lens_stats
from jaxlens.models.loader import pad_batch
from jaxlens.lens import multi as LM

MODES = ("auto", "off", "require")
SKIP_MS = (2, 4, 8)
DEPTH_FRACTIONS = (0.25, 0.5, 0.75)
#: head-mismatch temperature search (§3.6): 61 log-spaced values in [0.2, 5] plus 1.0, then 41 linear
#: points in [max(0.2, tau*/2), min(5, 1.5 tau*)]
HEAD_GRID = (0.2, 5.0, 61)
HEAD_REFINE = 41


# --------------------------------------------------------------------------------------------------
# finding and loading the lens


@dataclasses.dataclass
class TunedSource:
    """What ``--tuned`` resolved to: the lens (when loaded) and its JSON status block."""

    mode: str                        # auto / off / require
    status: str                      # loaded / missing / disabled / error
    path: Optional[str] = None
    lens: Any = None
    provenance: Optional[dict] = None
    error: Optional[str] = None

    def status_block(self) -> dict:
        out = {"status": self.status, "mode": self.mode, "path": self.path}
        if self.error:
            out["error"] = self.error
        return out


def portable_path(path: str) -> str:
    """How a run's JSON names a lens directory: one shipped inside jaxlens as ``jaxlens/...`` (the same on every
    machine), any other by its absolute path (as the reference does)."""
    full = os.path.abspath(path)
    pkg = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # holds jaxlens/
    rel = os.path.relpath(full, pkg)
    return rel if rel.split(os.sep)[0] == "jaxlens" else full


def default_locations(model) -> list:
    """Where ``--tuned auto`` looks: ``tuned_lenses/<name>/`` (the reference's layout, relative to the working
    directory), ``tuned_lens/`` inside the model directory (the bundled demo ships one there), and for a
    packaged real model (:mod:`jaxlens.models.packaged`) the lens jaxlens ships for it in
    ``jaxlens/lens/packaged/<alias>/``."""
    from jaxlens.lens.tuned import PACKAGED_LENSES_DIR
    from jaxlens.models.packaged import alias_of

    out = [os.path.join("tuned_lenses", model.name)]
    path = getattr(model, "path", None)
    if path and os.path.isdir(path):
        out.append(os.path.join(path, "tuned_lens"))
    alias = alias_of(model)
    if alias is not None:
        out.append(os.path.join(PACKAGED_LENSES_DIR, alias))
    return out


def lens_record(lens) -> Optional[dict]:
    """The lens's own record, as :func:`jaxlens.load_lens` read it: the jaxlens ``lens_card.json``, the
    reference's ``provenance.json`` or the tuned-lens package's ``config.json`` (None for a lens built in memory)."""
    card = getattr(lens, "card", None) or {}
    if "provenance" in card:
        return card["provenance"]
    if "tuned_lens_config" in card:
        return card["tuned_lens_config"]
    return card or None


def resolve(model, tuned=None, say=None) -> TunedSource:
    """``tuned``: None / "off" (disabled), "auto" (use a lens from :func:`default_locations` if there is one),
    "require" (the same, but an error if there is none), a lens directory (must load), or a lens object."""
    say = say or (lambda msg: None)
    if tuned is None or (isinstance(tuned, str) and tuned == "off"):
        return TunedSource(mode="off", status="disabled")
    if not isinstance(tuned, str):                       # a lens object
        return TunedSource(mode="require", status="loaded", path=getattr(tuned, "path", None), lens=tuned,
                           provenance=lens_record(tuned))
    from jaxlens.lens.tuned import load_lens

    if tuned in ("auto", "require"):
        mode = tuned
        found = [p for p in default_locations(model) if os.path.isdir(p)]
        if not found:
            where = " or ".join(default_locations(model))
            if mode == "require":
                raise JaxlensError(f"--tuned require: no tuned lens for {model.name} in {where}")
            return TunedSource(mode=mode, status="missing")
        path = found[0]
    else:
        mode, path = "require", os.path.expanduser(tuned)
        if not os.path.isdir(path):
            raise JaxlensError(f"--tuned {tuned}: no such lens directory")
    try:
        lens = load_lens(path, model=model)
    except JaxlensError as e:
        if mode == "require":
            raise JaxlensError(f"--tuned {path}: {e}") from None
        say(f"warning: the tuned lens in {path} could not be used ({e}); continuing without it")
        return TunedSource(mode=mode, status="error", path=portable_path(path), error=str(e))
    return TunedSource(mode=mode, status="loaded", path=portable_path(path), lens=lens,
                       provenance=lens_record(lens))


# --------------------------------------------------------------------------------------------------
# lens variants for the audit


@dataclasses.dataclass
class RotationOnly:
    """The tuned lens without its temperature (§3.6 ``rot_only``)."""

    lens: Any
    name: str = "tuned_rot_only"

    @property
    def base(self):
        return getattr(self.lens, "base", "norm")

    @property
    def base_layer0(self):
        return getattr(self.lens, "base_layer0", self.base)

    def translate(self, rows, layers):
        return self.lens.translate(rows, layers)

    def temperatures(self, layers):
        return None


def temperature_only(lens, n_layers: int) -> LM.TemperedLens:
    """The tuned lens's own base lens (the norm lens, or the logit lens for a ``base = "logit"`` lens) divided by
    its temperatures (§3.6 ``temp_only``; 1 where it has none)."""
    t = lens.temperatures(np.arange(n_layers + 1))
    return LM.TemperedLens(temperature=np.ones(n_layers + 1, np.float32) if t is None else t,
                           base=getattr(lens, "base", "norm"), name="tuned_temp_only")


# --------------------------------------------------------------------------------------------------
# pure functions (tested by hand in tests/test_probe_tuned.py)


def depth_layers(n_layers: int, fractions=DEPTH_FRACTIONS) -> list:
    """round(n f) for the depth fractions (Python round, as the reference)."""
    return [int(round(n_layers * float(f))) for f in fractions]


def _by_layer(cols) -> dict:
    return {int(layer): i for i, layer in enumerate(cols["layer"])}


def _at_layer(cols, name: str, layer: int):
    i = _by_layer(cols).get(int(layer))
    if i is None:
        return None
    v = cols[name][i]
    return None if v is None else float(v)


def _delta(a, b):
    return None if a is None or b is None else a - b


def unified_metrics(base_cols, tuned_cols, n_layers: int) -> dict:
    """``tuned_lens.summary.metrics`` (§3.4): rank milestones, KL at 25/50/75 % depth, first KL <= 1.0 of the
    norm lens (baseline) and the tuned lens, from their pure columns of the same pass."""
    def first_rank(cols, k):
        return M.first_layer([r is not None and int(r) <= k for r in cols["answer_rank"]], cols["layer"])

    def first_kl(cols, x):
        return M.first_layer([v is not None and float(v) <= x for v in cols["kl_to_final_bits"]], cols["layer"])

    rb = {f"le_{k}": first_rank(base_cols, k) for k in (10, 5, 1)}
    rt = {f"le_{k}": first_rank(tuned_cols, k) for k in (10, 5, 1)}
    names = ("p25", "p50", "p75")
    kb = {nm: _at_layer(base_cols, "kl_to_final_bits", L) for nm, L in zip(names, depth_layers(n_layers))}
    kt = {nm: _at_layer(tuned_cols, "kl_to_final_bits", L) for nm, L in zip(names, depth_layers(n_layers))}
    fb, ft = first_kl(base_cols, 1.0), first_kl(tuned_cols, 1.0)
    return {
        "rank_milestones": {"baseline": rb, "tuned": rt, "delta": {k: _delta(rt[k], rb[k]) for k in rb}},
        "kl_bits_at_percentiles": {"baseline": kb, "tuned": kt, "delta": {k: _delta(kb[k], kt[k]) for k in kb}},
        "first_kl_le_1.0": {"baseline": fb, "tuned": ft, "delta": _delta(ft, fb)},
    }


def attribution(base_cols, tuned_cols, kl_norm_temp: dict, n_layers: int, *, first_rank_le_5_baseline=None,
                first_rank_le_5_tuned=None, strict_earlier: bool = True) -> dict:
    """§3.5: at the depth layers, dKL_tuned = KL_norm - KL_tuned, dKL_temp = KL_norm - KL_norm_temp,
    dKL_rot = dKL_tuned - dKL_temp; ``prefer_tuned`` = dKL_rot(p50) >= 0.2, or the tuned lens reaches rank <= 5
    earlier than the norm lens by >= 2 layers or >= round(0.05 n) layers. ``kl_norm_temp``: {layer: bits}.

    ``strict_earlier`` (fix N3): "earlier" means at least one layer earlier; the reference's rule accepts a
    gain of 0 whenever round(0.05 n) = 0, i.e. on every model with fewer than 10 layers."""
    per = {}
    for nm, L in zip(("p25", "p50", "p75"), depth_layers(n_layers)):
        kn = _at_layer(base_cols, "kl_to_final_bits", L)
        kt = _at_layer(tuned_cols, "kl_to_final_bits", L)
        kx = kl_norm_temp.get(L)
        d_tuned = _delta(kn, kt)
        d_temp = _delta(kn, None if kx is None else float(kx))
        per[nm] = {"ΔKL_tuned": d_tuned, "ΔKL_temp": d_temp, "ΔKL_rot": _delta(d_tuned, d_temp)}
    rot50 = per["p50"]["ΔKL_rot"]
    prefer = rot50 is not None and rot50 >= 0.2
    if first_rank_le_5_baseline is not None and first_rank_le_5_tuned is not None:
        gain = first_rank_le_5_baseline - first_rank_le_5_tuned
        need = int(round(0.05 * n_layers))
        ok = gain >= 2 or gain >= need
        if strict_earlier:
            ok = ok and gain >= 1
        prefer = prefer or ok
    return {"percentiles": per, "prefer_tuned": bool(prefer)}


def variant_rows(layers, kl: dict, rank: dict, entropy: dict) -> list:
    """§3.6 variant rows. ``kl`` / ``rank``: {baseline, tuned, rot_only, temp_only: per-layer lists};
    ``entropy``: {baseline, tuned: per-layer lists}. Ranks may be None (no gold)."""
    rows = []
    for i, layer in enumerate(layers):
        kb = float(kl["baseline"][i])
        row = {"layer": int(layer)}
        for v in ("baseline", "tuned", "rot_only", "temp_only"):
            row[f"kl_bits_{v}"] = float(kl[v][i])
        for v in ("tuned", "rot_only", "temp_only"):
            row[f"delta_kl_bits_{v}"] = kb - row[f"kl_bits_{v}"]
        row["delta_kl_bits_interaction"] = row["delta_kl_bits_tuned"] - (
            row["delta_kl_bits_rot_only"] + row["delta_kl_bits_temp_only"])
        for v in ("baseline", "tuned", "rot_only", "temp_only"):
            r = rank[v][i] if rank.get(v) is not None else None
            row[f"answer_rank_{v}"] = None if r is None else int(r)
        for v in ("tuned", "rot_only", "temp_only"):
            row[f"rank_shift_{v}"] = _delta(row["answer_rank_baseline"], row[f"answer_rank_{v}"])
        row["entropy_bits_baseline"] = float(entropy["baseline"][i])
        row["entropy_bits_tuned"] = float(entropy["tuned"][i])
        rows.append(row)
    return rows


def head_mismatch(z_tuned_last, z_final, kl_bits_tuned_final: float) -> dict:
    """§3.6 head mismatch: tau* = argmin KL(softmax(z / tau) || P_final) over the coarse log grid plus 1.0,
    refined on a linear grid around it."""
    lo, hi, num = HEAD_GRID
    grid = np.unique(np.concatenate([D.temperature_grid(lo, hi, num), [1.0]]))
    tau, _ = D.temperature_probe(z_tuned_last, z_final, grid)
    fine = np.linspace(max(lo, tau / 2.0), min(hi, 1.5 * tau), HEAD_REFINE)
    tau2, kl2 = D.temperature_probe(z_tuned_last, z_final, np.unique(np.concatenate([fine, [tau]])))
    return {"kl_bits_tuned_final": float(kl_bits_tuned_final), "kl_bits_tuned_final_after_tau_star": kl2,
            "tau_star_modelcal": tau2}


def audit_summary(variants: list, positions: list, head: dict, fractions=D.POSITION_GRID,
                  quirks: M.ReferenceQuirks = M.ReferenceQuirks()) -> dict:
    """§3.6 ``audit_summary`` from the variant rows, the position-grid rows and the head mismatch.

    N4 (fixed): "calibration only" needs a positive tuned gain to attribute (tuned_p50 > 0); without one the
    reference rule compares noise around 0 (``quirks.n4_calibration_only_without_gain`` restores it)."""
    def pct(key, q):
        return M.percentile([r[key] for r in variants], q)

    rot = {f"delta_kl_rot_{p}": pct("delta_kl_bits_rot_only", q) for p, q in (("p25", .25), ("p50", .5), ("p75", .75))}
    temp = {f"delta_kl_temp_{p}": pct("delta_kl_bits_temp_only", q) for p, q in (("p25", .25), ("p50", .5),
                                                                                  ("p75", .75))}
    rvt = dict(rot, **temp, delta_kl_interaction_p50=pct("delta_kl_bits_interaction", .5),
               delta_kl_tuned_p50=pct("delta_kl_bits_tuned", .5))
    ind = M.percentile([r["delta_kl_bits_tuned"] for r in positions if r["pos_frac"] <= 0.92], .5)
    ood = M.percentile([r["delta_kl_bits_tuned"] for r in positions if r["pos_frac"] >= 0.96], .5)
    rot50, temp50, tuned50 = rvt["delta_kl_rot_p50"], rvt["delta_kl_temp_p50"], rvt["delta_kl_tuned_p50"]
    calib = bool(rot50 is not None and temp50 is not None and tuned50 is not None
                 and rot50 < 0.2 and temp50 >= 0.8 * tuned50
                 and (tuned50 > 0 or quirks.n4_calibration_only_without_gain))
    hint = "tuned_for_calibration_only" if calib else ("tuned" if (tuned50 is not None and tuned50 > 0.2) else "norm")
    return {"rotation_vs_temperature": rvt,
            "positional": {"pos_grid": [float(f) for f in fractions], "pos_in_dist_le_0.92": ind,
                           "pos_ood_ge_0.96": ood, "pos_ood_gap": _delta(ood, ind)},
            "head_mismatch": head, "tuned_is_calibration_only": calib, "preferred_semantics_lens_hint": hint}


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def provenance_snapshot(prov: Optional[dict], lens) -> dict:
    """§3.6 ``provenance_snapshot`` from the lens's record: the reference's ``provenance.json`` or a jaxlens
    ``lens_card.json`` (fields the record lacks are null)."""
    prov = prov or {}
    temps = None
    table = getattr(lens, "temperature_table", None)
    if callable(table):
        temps = [float(t) for t in table()]
    elif _get(prov, "translator", "temperatures"):
        temps = [float(t) for t in prov["translator"]["temperatures"]]
    tstats = None
    if temps:
        tstats = {"min": min(temps), "p25": M.percentile(temps, .25), "p50": M.percentile(temps, .5),
                  "p75": M.percentile(temps, .75), "max": max(temps)}
    if "training" in prov and "translator" in prov:              # the reference's provenance.json
        tr, ds = prov.get("training") or {}, _get(prov, "training", "dataset") or {}
        tps, steps = tr.get("tokens_per_step"), tr.get("total_steps")
        return {"dataset_id": ds.get("repo_id"), "dataset_revision": ds.get("revision"),
                "content_hash": ds.get("content_hash"), "train_pos_window": ds.get("position_fraction_range"),
                "sampled_layers_count": tr.get("layers_sampled_per_step"),
                "sampled_positions_count": ds.get("positions_per_seq"), "rank": _get(prov, "translator", "rank"),
                "preconditioner": {"whiten": bool(_get(prov, "translator", "has_preconditioner")),
                                   "orthogonal_rotation": bool(_get(prov, "translator", "preconditioner", "rotation"))},
                "temperatures_stats": tstats, "final_layer_identity": _get(prov, "translator", "final_identity"),
                "fit_total_tokens_est": float(tps * steps) if (tps and steps) else None,
                "optimizer": tr.get("optimizer"), "schedule": None}
    plan = _get(prov, "recipe", "plan") or {}
    data = prov.get("data") or {}
    tps, steps = plan.get("tokens_per_step"), _get(prov, "training", "steps_done") or plan.get("steps")
    opt = plan.get("optimizer")
    has_pre = getattr(lens, "precond", None) is not None
    return {"dataset_id": data.get("name") or (os.path.basename(data["path"]) if data.get("path") else None),
            "dataset_revision": data.get("revision"), "content_hash": data.get("content_hash"),
            "train_pos_window": plan.get("position_window"), "sampled_layers_count": plan.get("layers_per_step"),
            "sampled_positions_count": plan.get("positions_per_seq"),
            "rank": getattr(lens, "rank", None),
            "preconditioner": {"whiten": has_pre, "orthogonal_rotation": has_pre},
            "temperatures_stats": tstats, "final_layer_identity": True,
            "fit_total_tokens_est": float(tps * steps) if (tps and steps) else None,
            "optimizer": opt, "schedule": None if not isinstance(opt, dict) else opt.get("schedule")}


def skip_sanity(base_losses, tuned_losses: dict) -> tuple:
    """§3.7: value(m) = (ppl_tuned - ppl_base) / ppl_base with ppl = exp(mean loss over prompts).
    ``tuned_losses``: {m: [loss per prompt] or None}. Returns ({"m=2": v, ...}, regression)."""
    out = {}
    base = list(base_losses)
    ppl_b = math.exp(float(np.mean(base))) if base else None
    for m, losses in tuned_losses.items():
        if not losses or ppl_b is None:
            out[f"m={m}"] = None
            continue
        ppl_t = math.exp(float(np.mean(losses)))
        out[f"m={m}"] = (ppl_t - ppl_b) / ppl_b
    v2 = out.get("m=2")
    return out, bool(v2 is not None and v2 > 0.20)


# --------------------------------------------------------------------------------------------------
# the decodes and the assembly


@dataclasses.dataclass
class TunedResult:
    """Everything the tuned lens adds to a probe run."""

    source: TunedSource
    passes: list                     # probe.PassResult per pass (tuned pure columns, summary, records)
    inputs: D.TunedInputs            # what the diagnostics stage takes
    json_block: dict                 # top-level ``tuned_lens``
    diag_block: dict                 # diagnostics keys after ``tuned_lens`` (mirrors, skip sanity)
    sidecars: dict                   # csv kind -> rows
    timings: dict


def _slice_forward(fw, b: int) -> ForwardOutput:
    return ForwardOutput(fw.residuals[:, b:b + 1], fw.logits[b:b + 1], fw.attention_mask[b:b + 1])


def _audit_pass(inputs, suite, quirks) -> int:
    """The pass the audit describes: the primary fact (fix Q2), or with the Q2 quirk the last pos pass of the
    primary variant (the reference overwrote the audit in every such pass)."""
    if not getattr(quirks, "q2_tuned_audit_last_fact", False):
        return 0
    idx = [b for b, p in enumerate(inputs) if p.spec.prompt_id == "pos" and p.spec.variant == suite.primary_variant]
    return idx[-1] if idx else 0


def _skip_losses(model, suite, inputs, dec, lens, n, quirks) -> tuple:
    """Per skip prompt with a gold id: base loss -ln P_final(a) and tuned loss at each m (last position)."""
    key = {(p.spec.prompt_id, p.spec.variant, p.spec.fact_index): b for b, p in enumerate(inputs)}
    passes = suite.skip_layer_passes
    idx = [key.get((p.prompt_id, p.variant, p.fact_index)) for p in passes]
    if all(i is not None for i in idx):
        fw = dec["fw"]
        golds = np.asarray(dec["last_kwargs"]["gold_ids"])             # -1 where a pass has no gold
        sel = [i for i in idx if golds[i] >= 0]
    else:                                    # a suite whose skip prompts are not lens passes: one small forward
        tok = model.tokenizer
        seqs = [gold_mod.model_input_ids(tok, p.text) for p in passes]
        al = [gold_mod.align_gold(tok, p.text, p.answer, pieces_k=suite.thresholds.gold.pieces_k) for p in passes]
        ids, mask = pad_batch(seqs)
        fw = model.forward(ids, mask)
        golds = np.array([a.first_id if a.first_id is not None else -1 for a in al], np.int32)
        sel = [i for i in range(len(passes)) if golds[i] >= 0]
    if not sel:
        return [], {m: None for m in SKIP_MS}
    shift = 1 if getattr(quirks, "q9_skip_layer_index", False) else 0
    layer_of = {m: n - m + shift for m in SKIP_MS}
    want = sorted({L for L in layer_of.values() if 0 <= L <= n})
    lengths = np.asarray(fw.attention_mask).sum(1)
    final = np.asarray(fw.logits)[np.arange(len(lengths)), lengths - 1]                       # [B, V]
    lsm = _log_softmax64(final)
    base = [float(-lsm[i, golds[i]]) for i in sel]
    tuned = {m: None for m in SKIP_MS}
    if want:
        st = lens_stats(model, fw, lens, gold_ids=golds, top_k=0, positions="last", layers=want,
                        cosine=False).numpy()
        loss = (st.lse - st.gold_logit)[:, :, 0]                                            # [R, B] nats
        row = {int(L): j for j, L in enumerate(st.layers)}
        for m, L in layer_of.items():
            if L in row:
                tuned[m] = [float(loss[row[L], i]) for i in sel]
    return base, tuned


def run_tuned(model, suite, inputs, dec, norm_results, dd, decode, source: TunedSource,
              quirks: M.ReferenceQuirks = M.ReferenceQuirks()) -> TunedResult:
    """Every tuned-lens output of the probe (spec §3.4-3.7) for a loaded lens."""

    t0 = time.perf_counter()
    lens = source.lens
    spec = model.spec
    n = spec.n_layers
    layers = np.arange(1, n + 1)
    fw = dec["fw"]
    golds = np.asarray(dec["last_kwargs"]["gold_ids"])
    k_all = max(suite.records.top_k_verbose, suite.records.top_k_default)
    allpos = lens_stats(model, fw, lens, gold_ids=golds, top_k=k_all, positions="all", layers=layers,
                        cosine=False).numpy()
    kw = dict(dec["last_kwargs"], positions="last")
    tuned_last, rot_last, temp_last = (s.numpy() for s in LM.multi_lens_stats(
        model, fw, (lens, RotationOnly(lens), temperature_only(lens, n)), layers=layers, **kw))
    results = lens_pass_metrics(model, suite, inputs, dec, tuned_last, allpos, decode, lens="tuned", quirks=quirks)
    t1 = time.perf_counter()

    # unified metrics and attribution: the primary pass (fact 0, primary variant)
    base0, tuned0 = norm_results[0].pure, results[0].pure
    metrics = unified_metrics(base0, tuned0, n)
    kl_temp0 = {int(L): float(v) for L, v in enumerate(dd.kl_temp[:, 0])}
    attr = attribution(base0, tuned0, kl_temp0, n,
                       first_rank_le_5_baseline=metrics["rank_milestones"]["baseline"]["le_5"],
                       first_rank_le_5_tuned=metrics["rank_milestones"]["tuned"]["le_5"],
                       strict_earlier=not getattr(quirks, "n3_prefer_tuned_gain_zero", False))

    # the audit: variants at the last position, the position grid, the head mismatch
    b = _audit_pass(inputs, suite, quirks)
    last = dec["last"]
    has_gold = inputs[b].gold.first_id is not None
    base_rows = slice(1, n + 1)                                  # norm-lens layers 1..n

    def col(st, name, sl=slice(None)):
        return np.asarray(getattr(st, name))[sl, b, 0]

    kl = {"baseline": col(last, "kl_to_final_bits", base_rows), "tuned": col(tuned_last, "kl_to_final_bits"),
          "rot_only": col(rot_last, "kl_to_final_bits"), "temp_only": col(temp_last, "kl_to_final_bits")}
    rank = {k: (col(st, "gold_rank", sl) if has_gold else None) for k, st, sl in (
        ("baseline", last, base_rows), ("tuned", tuned_last, slice(None)), ("rot_only", rot_last, slice(None)),
        ("temp_only", temp_last, slice(None)))}
    ent = {"baseline": col(last, "entropy_bits", base_rows), "tuned": col(tuned_last, "entropy_bits")}
    variants = variant_rows(layers, kl, rank, ent)
    T = len(inputs[b].input_ids)
    grid = D.position_grid(T)
    pos = np.array([[p for _, p in grid]], np.int64)
    g_b = np.array([inputs[b].gold.first_id if has_gold else -1], np.int32)
    nb, tb = (s.numpy() for s in LM.multi_lens_stats(model, _slice_forward(fw, b), ("norm", lens), layers=layers,
                                                      gold_ids=g_b, top_k=0, positions=pos, cosine=False))
    positions = []
    for j, (frac, p) in enumerate(grid):
        last_pos = p == T - 1
        for i, layer in enumerate(layers):
            kb, kt = float(nb.kl_to_final_bits[i, 0, j]), float(tb.kl_to_final_bits[i, 0, j])
            rb = int(nb.gold_rank[i, 0, j]) if (last_pos and has_gold) else None
            rt = int(tb.gold_rank[i, 0, j]) if (last_pos and has_gold) else None
            positions.append({"pos_frac": frac, "pos_index": p, "layer": int(layer), "kl_bits_baseline": kb,
                              "kl_bits_tuned": kt, "delta_kl_bits_tuned": kb - kt, "answer_rank_baseline": rb,
                              "answer_rank_tuned": rt, "rank_shift_tuned": _delta(rb, rt),
                              "entropy_bits_baseline": float(nb.entropy_bits[i, 0, j]),
                              "entropy_bits_tuned": float(tb.entropy_bits[i, 0, j])})
    z_t = LM.target_logits(model, fw, b, T - 1, tuned_lens=lens, tuned_layers=[n])["tuned"][n]
    head = head_mismatch(z_t, np.asarray(fw.logits[b, T - 1]), float(kl["tuned"][-1]))
    audit = audit_summary(variants, positions, head, quirks=quirks)
    t2 = time.perf_counter()

    base_l, tuned_l = _skip_losses(model, suite, inputs, dec, lens, n, quirks)
    skip, regression = skip_sanity(base_l, tuned_l)
    t3 = time.perf_counter()

    summaries = [r.summary for r in results]
    mirrors = {k: v for k, v in summaries[0].items() if k.endswith("_tuned")}
    diag_block = dict(mirrors, skip_layers_sanity=skip, tuned_lens_regression=regression)
    if regression:
        diag_block["tuned_lens_skip_warning"] = True
    prov = source.provenance
    json_block = {"status": source.status, "path": source.path, "summaries": summaries, "provenance": prov,
                  "provenance_snapshot": provenance_snapshot(prov, lens), "summary": {"metrics": metrics},
                  "audit_summary": audit, "attribution": attr}
    primary_ranks = {int(L): (None if r is None else int(r)) for L, r in zip(tuned0["layer"], tuned0["answer_rank"])} \
        if tuned0.get("answer_rank") is not None else None
    inputs_d = D.TunedInputs(lens=lens, primary_ranks=primary_ranks, prefer_tuned=attr["prefer_tuned"],
                             audit_summary=audit)
    sidecars = {"pure-next-token-tuned-variants": variants, "positions-tuned-audit": positions}
    return TunedResult(source=source, passes=results, inputs=inputs_d, json_block=json_block, diag_block=diag_block,
                       sidecars=sidecars, timings={"tuned_decode_s": t1 - t0, "tuned_audit_s": t2 - t1,
                                                   "tuned_skip_s": t3 - t2})
