"""Prism inside the probe (spec/probe.md §4.3): ``jaxlens probe --prism auto|on|off|DIR``.

With a Prism (a directory :func:`jaxlens.lens.prism.load_prism` reads; ``jaxlens fit-prism`` writes one) the
probe adds, with no extra forward pass:

* Prism records (every layer 0..n x position of every pass, the norm records' top-k policy) and Prism pure
  next-token rows (``-records-prism.csv``, ``-pure-next-token-prism.csv``, the reference's headers). The pure
  rows carry what the reference fills for Prism: top-5, the strict 0.95 and soft copy flags (the strict
  sweep stays blank), entropy, KL to final, answer rank / probability, answer - uniform, teacher entropy,
  cos_to_final (of the Prism logits), control margin on control rows, the answer gaps; the surface,
  geometry, normalisation and temperature columns stay blank;
* ``diagnostics.prism_summary``: {mode, artifact_path, present, compatible, k, layers, error, metrics} as the
  reference, ``metrics`` = the unified metrics of the tuned lens (§3.4) with the Prism in place of the tuned
  lens (rank milestones, KL at 25/50/75 % depth and first KL <= 1, with deltas against the norm lens), plus
  jaxlens's ``verdict`` (:func:`verdict`) and the artifact's ``provenance``.

Both decodes are fused :func:`jaxlens.lens_stats` calls (all positions; last position with the answer,
control and prompt-token logits gathered), the Prism being an affine lens like a tuned lens.

Modes: ``off``; ``auto`` (default) uses ``prisms/<name>/`` (relative to the working directory, the reference's
layout) or the model directory's ``prism/`` when one exists, and otherwise (or when it does not fit the
model) reports ``present`` / ``compatible`` false and goes on; ``on`` is the same but a missing or unusable
Prism is an error; a directory must hold a usable Prism (mode ``on``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Optional

import numpy as np

from jaxlens.errors import JaxlensError
from jaxlens.lens.stats import lens_stats
from jaxlens.probe import metrics as M
from jaxlens.probe import summaries as SU
from jaxlens.probe.passes import lens_pass_metrics, pure_rows
from jaxlens.probe.tuned import depth_layers
from jaxlens.probe.tuned import unified_metrics as _unified_tuned

MODES = ("auto", "on", "off")
#: verdict threshold (bits) on the median KL gain over the 25/50/75 % depth layers; the same 0.2-bit scale as
#: the tuned lens's prefer_tuned gate (spec §3.5)
VERDICT_KL_BITS = 0.2
#: pure columns the reference leaves blank for Prism (surface, geometry, normalisation, temperature)
BLANK_COLUMNS = ("semantic_margin_ok", "kl_to_final_bits_norm_temp", "topk_jaccard_raw_norm@50",
                 "topk_jaccard_consecutive@50", "cos_to_answer", "cos_to_prompt_max", "geom_crossover",
                 "echo_mass_prompt", "answer_mass", "answer_minus_echo_mass", "mass_ratio_ans_over_prompt",
                 "topk_prompt_mass@50", "resid_norm_ratio", "delta_resid_cos")


# --------------------------------------------------------------------------------------------------
# finding and loading


@dataclasses.dataclass
class PrismSource:
    """What ``--prism`` resolved to: the lens (when usable) and the fields of ``prism_summary``."""

    mode: str                        # auto / on / off
    path: Optional[str] = None
    lens: Any = None
    present: bool = False
    compatible: bool = False
    error: Optional[str] = None

    @property
    def usable(self) -> bool:
        return self.lens is not None and self.compatible

    def summary_block(self, metrics: Optional[dict] = None, extra: Optional[dict] = None) -> dict:
        lens = self.lens
        out = {"mode": self.mode, "artifact_path": self.path, "present": self.present,
               "compatible": self.compatible, "k": None if lens is None else lens.k,
               "layers": None if lens is None else lens.layers, "error": self.error, "metrics": metrics}
        out.update(extra or {})
        return out


def default_locations(model) -> list:
    """Where ``--prism auto`` looks: ``prisms/<name>/`` (the reference's layout, relative to the working
    directory), then ``prism/`` inside the model directory."""
    out = [os.path.join("prisms", model.name)]
    if getattr(model, "path", None):
        out.append(os.path.join(model.path, "prism"))
    return out


def resolve(model, prism="auto", say=None) -> PrismSource:
    """``prism``: None / "off", "auto", "on", a Prism directory, or a :class:`~jaxlens.lens.prism.PrismLens`."""
    from jaxlens.lens.prism import PrismLens, find_format, load_prism

    say = say or (lambda msg: None)
    if prism is None or (isinstance(prism, str) and prism == "off"):
        return PrismSource(mode="off")
    if isinstance(prism, PrismLens):
        err = prism.check(model)
        if err:
            raise JaxlensError(err)
        return PrismSource(mode="on", path=prism.path, lens=prism, present=True, compatible=True)
    if not isinstance(prism, str):
        raise JaxlensError(f"--prism must be auto, on, off or a directory; got {type(prism).__name__}")
    if prism in ("auto", "on"):
        mode = prism
        found = [p for p in default_locations(model) if os.path.isdir(p) and find_format(p)]
        if not found:
            if mode == "on":
                raise JaxlensError(f"--prism on: no Prism for {model.name} in {' or '.join(default_locations(model))}")
            return PrismSource(mode=mode)
        path = found[0]
    else:
        mode, path = "on", os.path.expanduser(prism)
        if not os.path.isdir(path):
            raise JaxlensError(f"--prism {prism}: no such Prism directory")
    apath = os.path.abspath(path)
    try:
        lens = load_prism(path)
    except JaxlensError as e:
        if mode == "on":
            raise JaxlensError(f"--prism {path}: {e}") from None
        say(f"warning: the Prism in {path} could not be read ({e}); continuing without it")
        return PrismSource(mode=mode, path=apath, present=True, error=str(e))
    err = lens.check(model)
    if err:
        if mode == "on":
            raise JaxlensError(err)
        say(f"warning: {err}; continuing without it")
        return PrismSource(mode=mode, path=apath, lens=lens, present=True, compatible=False, error=err)
    return PrismSource(mode=mode, path=apath, lens=lens, present=True, compatible=True)


def reference_fit(source: Optional[PrismSource]) -> Optional[bool]:
    """Whether the decoded Prism was fitted with the reference's recipe (Q6 not fixed): True / False, or
    None when no Prism is decoded or its provenance does not say (e.g. an artifact of the reference itself,
    which then counts as the reference's recipe)."""
    if source is None or not source.usable:
        return None
    rec = source.lens.recipe
    if rec is None:
        return True if source.lens.format == "reference" else None
    return rec == "reference"


# --------------------------------------------------------------------------------------------------
# pure functions (tested by hand in tests/test_prism.py)


def unified_metrics(base_cols, prism_cols, n_layers: int) -> dict:
    """``prism_summary.metrics``: the tuned lens's unified metrics (§3.4) with the Prism as the second lens:
    rank milestones {baseline, prism, delta = prism - baseline}, KL at round(n {0.25, 0.5, 0.75})
    {baseline, prism, delta = baseline - prism} and first KL <= 1.0 {baseline, prism, delta = prism - baseline}."""
    m = _unified_tuned(base_cols, prism_cols, n_layers)
    return {key: {("prism" if k == "tuned" else k): v for k, v in block.items()} for key, block in m.items()}


def verdict(metrics: dict, threshold: float = VERDICT_KL_BITS, *, entropy_bits=None, vocab_size=None) -> dict:
    """helpful / neutral / regressive from the unified metrics (jaxlens's rule; the reference says it in prose).

    gain = the median over p25/p50/p75 of KL_norm - KL_prism (bits; positive = the Prism is closer to the
    model's output). "helpful" if gain >= ``threshold``, "regressive" if gain <= -``threshold``. Between the two
    the first rank milestone both lenses can be compared on (rank <= 1, else <= 5) decides: the Prism reaching
    it >= 2 layers earlier -> "helpful", >= 2 layers later (or never, where the norm lens does) ->
    "regressive", else "neutral". A Prism that is near uniform at the depth layers (``entropy_bits``: its
    entropies there; median >= log2(``vocab_size``) - 1 bit) says nothing, so it is never "helpful" (capped at
    "neutral"), however far a confidently wrong norm lens is behind it on KL. ``label`` None when no KL delta
    exists."""
    kd = [v for v in (metrics.get("kl_bits_at_percentiles", {}).get("delta") or {}).values() if v is not None]
    if not kd:
        return {"label": None, "kl_gain_bits_median": None, "threshold_bits": threshold, "rank_shift_layers": None,
                "rule": VERDICT_RULE}
    gain = float(np.median(kd))
    rm = metrics.get("rank_milestones", {})
    shift, key = None, None
    for k in ("le_1", "le_5"):
        b, p = (rm.get("baseline") or {}).get(k), (rm.get("prism") or {}).get(k)
        if b is not None or p is not None:
            key = k
            if b is not None and p is not None:
                shift = b - p                                   # > 0: Prism earlier
            elif b is not None:
                shift = float("-inf")                           # the Prism never gets there
            else:
                shift = float("inf")
            break
    if gain >= threshold:
        label = "helpful"
    elif gain <= -threshold:
        label = "regressive"
    elif shift is not None and shift >= 2:
        label = "helpful"
    elif shift is not None and shift <= -2:
        label = "regressive"
    else:
        label = "neutral"
    ent = [float(e) for e in (entropy_bits or []) if e is not None]
    near_uniform = None
    if ent and vocab_size:
        near_uniform = bool(np.median(ent) >= math.log2(float(vocab_size)) - NEAR_UNIFORM_BITS)
        if near_uniform and label == "helpful":
            label = "neutral"
    rs = None if shift is None else (shift if np.isfinite(shift) else ("never" if shift < 0 else "prism_only"))
    return {"label": label, "kl_gain_bits_median": gain, "threshold_bits": threshold,
            "rank_shift_layers": rs, "rank_milestone": key, "prism_near_uniform": near_uniform,
            "rule": VERDICT_RULE}


VERDICT_RULE = ("gain = median over the 25/50/75% depth layers of KL_norm - KL_prism (bits); helpful if gain >= 0.2, "
                "regressive if gain <= -0.2; otherwise the first rank milestone (le_1, else le_5) decides: Prism "
                ">= 2 layers earlier -> helpful, >= 2 layers later or never -> regressive, else neutral; a Prism "
                "whose median entropy at those layers is within 1 bit of log2(V) (near uniform) is at most neutral")
NEAR_UNIFORM_BITS = 1.0


def prism_columns(cols: dict) -> dict:
    """The reference's Prism pure columns: ``cols`` with :data:`BLANK_COLUMNS` blanked."""
    out = dict(cols)
    n = len(out["layer"])
    for name in BLANK_COLUMNS:
        if name in out:
            out[name] = [None] * n
    return out


# --------------------------------------------------------------------------------------------------
# the decodes and the assembly


@dataclasses.dataclass
class PrismResult:
    """Everything Prism adds to a probe run."""

    source: PrismSource
    passes: list                     # probe.PassResult per pass (Prism pure columns, summary, records)
    summary_block: dict              # diagnostics.prism_summary
    sidecars: dict                   # csv kind -> rows
    timings: dict


def run_prism(model, suite, inputs, dec, norm_results, decode, source: PrismSource,
              quirks: M.ReferenceQuirks = M.ReferenceQuirks()) -> PrismResult:
    """Every Prism output of the probe (spec §4.3) for a usable Prism."""
    t0 = time.perf_counter()
    lens = source.lens
    n = model.spec.n_layers
    th = suite.thresholds
    try:
        lens.place()
    except Exception as e:  # noqa: BLE001 - the reference disables Prism on a placement failure
        msg = f"placement_error: {e.__class__.__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        src = dataclasses.replace(source, error=msg)
        return PrismResult(source=src, passes=[], summary_block=src.summary_block(), sidecars={},
                           timings={"prism_decode_s": time.perf_counter() - t0})
    fw = dec["fw"]
    golds = np.asarray(dec["last_kwargs"]["gold_ids"])
    k_all = max(suite.records.top_k_verbose, suite.records.top_k_default)
    allpos = lens_stats(model, fw, lens, gold_ids=golds, top_k=k_all, positions="all", cosine=False).numpy()
    last = lens_stats(model, fw, lens, **dict(dec["last_kwargs"], positions="last")).numpy()
    results = lens_pass_metrics(model, suite, inputs, dec, last, allpos, decode, lens="prism", quirks=quirks)
    for r in results:
        r.pure = prism_columns(r.pure)
        r.summary = SU.summarize_pass(r.pure, n_layers=n, lens="prism", p_uniform=1.0 / model.spec.vocab_size,
                                      thresholds=th, quirks=quirks)
    t1 = time.perf_counter()
    prim = results[0].pure
    metrics = unified_metrics(norm_results[0].pure, prim, n)
    at = {int(L): e for L, e in zip(prim["layer"], prim["entropy_bits"])}
    ent = [at.get(L) for L in depth_layers(n)]
    extra = {"verdict": verdict(metrics, entropy_bits=ent, vocab_size=model.spec.vocab_size),
             "provenance": lens.provenance}
    block = source.summary_block(metrics, extra)
    k_pure = suite.records.pure_top_k
    sidecars = {"records-prism": [row for res in results for row in res.records],
                "pure-next-token-prism": [row for res in results for row in pure_rows(res, decode, k_pure)]}
    return PrismResult(source=source, passes=results, summary_block=block, sidecars=sidecars,
                       timings={"prism_decode_s": t1 - t0, "prism_rows_s": time.perf_counter() - t1})
