"""The probe: the reference pipeline (spec/probe.md, logos-in-layers experiment 001) in one batched run.

All lens passes of a suite (5 facts x 2 variants + the control for the reference suite) go through ONE
jitted forward (right-padded), the final-head probes through a second, and each lens decode is a fused
``lens_stats`` call over every (layer, pass, position) row. There are no per-layer or per-position loops
over model or vocabulary work: the Python loops below only format rows.

Stages (each a function, so the diagnostics of spec §2.12-2.28 can slot in after :func:`run_passes`):

1. :func:`prepare`       tokenise every pass (BOS policy of the tokenizer) and align its gold answer
2. :func:`run_passes`    forward + norm-lens stats (all positions, top-20) + pure next-token stats
                         (last position, top-50, gathered answer / control / prompt-token logits)
3. :func:`pass_metrics`  spec §2 metrics and per-pass summaries (jaxlens.probe.metrics)
   diagnostics           spec §2.12-2.20, 2.23, 2.26, 2.28 (jaxlens.probe.diagnostics): a fused decode stage before
                         pass_metrics (raw-vs-norm pair stats, norm temperatures, re-decode) and a summary
                         stage after it; no extra forward pass (except the optional forward-of-two gate)
4. :func:`assemble`      records / pure rows, the JSON document
5. :func:`write_outputs` atomic writes (all files or none)
"""
from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlens.lens import multi as LM
from jaxlens.models.loader import pad_batch
from jaxlens.probe import diagnostics as D
from jaxlens.probe import gold as gold_mod
from jaxlens.probe import metrics as M
from jaxlens.probe import prism as PP
from jaxlens.probe import summaries as SU
from jaxlens.probe import tuned as PT
from jaxlens.probe.passes import pass_metrics, prepare, pure_rows, run_passes
from jaxlens.probe.suite import Suite, load_suite

SEED = 316

# Reference bugs this pipeline fixes (spec Appendix A); recorded in the JSON provenance and the README.
FIXED_REFERENCE_BUGS = {
    "Q1": "answer_logit_gap reaches the semantic-gate summaries (reference: always null); "
          "--reference-quirks restores the reference",
    "N1": "copy_thresholds.stability looks up the 0.7 threshold under the key it was stored with "
          "(reference: '0.70' lookup, so the result could only be 'none' or 'mixed')",
    "Q4": "Gemma-2's final logit softcap is applied in every lens, so the last-layer KL is 0 "
          "(reference: ~1 bit on Gemma-2)",
    # diagnostics (jaxlens.probe.diagnostics); see docs/reference_bugs.md
    "Q3": "the position window scores the gold answer at every grid position (reference: only at the last, "
          "so rank1_frac < 0.5 always); --reference-quirks restores the reference",
    "Q5": "the raw-lens sample summary uses the samples of every sampled pass and sets the window radius of "
          "every pass, the primary's included (reference: primary samples only, primary radius always 4); "
          "--reference-quirks restores the reference",
    "Q13": "the forward-of-two gate compares top-10 token strings as requested (reference: top-5); "
           "--reference-quirks restores the reference",
    "N2": "each pure row carries its own pass's raw/consecutive top-50 Jaccards (reference: every pos row of a "
          "variant shows the last fact's values); --reference-quirks restores the reference",
    # tuned lens (jaxlens.probe.tuned)
    "Q2": "the tuned audit (variants, positions, head mismatch, audit summary) describes the primary fact "
          "(reference: the last pos/orig pass, Canada); --reference-quirks restores the reference",
    "Q9": "skip-layers sanity at m decodes layer n-m, i.e. really skips m blocks (reference: layer n-m+1); "
          "--reference-quirks restores the reference",
    "N3": "prefer_tuned's rank rule needs the tuned lens to reach rank <= 5 at least one layer earlier "
          "(reference: a gain of 0 passes on models with < 10 layers); --reference-quirks restores the reference",
    "N4": "tuned_is_calibration_only needs a positive tuned gain (tuned_p50 > 0); without one the reference rule "
          "decides on rounding noise around 0; --reference-quirks restores the reference",
    # Prism (train_tuned.prism fits, jaxlens.probe.prism decodes)
    "Q6": "Prism is fitted on the normalised residuals the decoder whitens, its Q is saved as the matrix the "
          "decoder right-multiplies and its rows are every position of a real data stream (reference: raw-residual "
          "statistics, transposed Q, 10 prompts cycled); a Prism fitted with fit-prism --reference-quirks (or by "
          "the reference) removes this entry",
}


@dataclasses.dataclass
class ProbeResult:
    model_name: str
    json: dict
    records: list
    pure_rows: list
    passes: list
    timings: dict
    paths: list = dataclasses.field(default_factory=list)
    sidecars: dict = dataclasses.field(default_factory=dict)    # csv kind -> rows (raw lens, milestones, audit)
    tuned: Any = None                                            # probe_tuned.TunedResult when a tuned lens ran
    prism: Any = None                                            # probe.prism.PrismResult when a Prism ran

    def milestones_table(self) -> str:
        return milestones_table(self)


def _norm_type(spec) -> str:
    return "LayerNorm" if spec.norm == "layer" else "RMSNorm"


def _env(model) -> dict:
    dev = jax.devices()[0]
    return {"jaxlens_version": _version(), "jax_version": jax.__version__, "jaxlib_version": _jaxlib_version(),
            "device": dev.platform, "device_kind": getattr(dev, "device_kind", dev.platform),
            "device_count": jax.device_count(), "dtype_compute": str(jnp.dtype(model.dtype)),
            "deterministic_algorithms": True, "seed": SEED, "python": platform.python_version(),
            "platform": platform.platform()}


def _version():
    from jaxlens import __version__

    return __version__


def _jaxlib_version():
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:  # noqa: BLE001
        return None


def assemble(model, suite: Suite, results: list, dec: dict, decode, test_logits: dict,
             quirks: M.ReferenceQuirks = M.ReferenceQuirks(), dg: "D.DiagnosticsResult | None" = None,
             tuned_source: "PT.TunedSource | None" = None, tuned: "PT.TunedResult | None" = None,
             prism_block: dict | None = None) -> tuple:
    """Records, pure rows and the JSON document; ``dg`` (the diagnostics stage's result) adds the
    diagnostics blocks at their reference positions (left out without it); ``tuned_source`` / ``tuned``
    the tuned lens's status and blocks (status "disabled" without them)."""
    sec = (lambda name: dg.json(name)) if dg is not None else (lambda name: {})
    spec = model.spec
    n = spec.n_layers
    th = suite.thresholds
    prim = results[0]
    ps = prim.inp.spec
    records = [r for res in results for r in res.records]
    k_pure = suite.records.pure_top_k
    pure = [r for res in results for r in pure_rows(res, decode, k_pure)]
    # positions of each pass's first pure row among all pure rows (micro-suite citations)
    offsets, acc = {}, 0
    for res in results:
        offsets[(res.inp.spec.prompt_id, res.inp.spec.variant, res.inp.spec.fact_index)] = acc
        acc += len(res.pure["layer"])
    by_key = {(r.inp.spec.prompt_id, r.inp.spec.variant, r.inp.spec.fact_index): r for r in results}
    orig_v = suite.primary_variant
    abl_v = suite.ablation_variant
    W, b = model.unembedding()
    logits = np.asarray(dec["fw"].logits)
    T0 = len(prim.inp.input_ids)
    fin = SU.final_head_probe(logits[0, T0 - 1], decode, top_k=suite.final_head.final_prediction_top_k)
    facts = []
    for f in suite.facts:
        r = by_key[("pos", orig_v, f.index)]
        facts.append({"fact_key": f.key, "fact_index": f.index, "summary": r.summary,
                      "row_offset": offsets[("pos", orig_v, f.index)],
                      # confirmed semantics exist for the primary fact only (reference, Q11)
                      "L_semantic_confirmed": dg.L_semantic_confirmed if (dg is not None and f.index == 0) else None})
    micro = SU.micro_suite(facts, n_layers=n, notes=suite.micro_suite_notes)
    ctl = next(r for r in results if r.inp.spec.is_control)
    control_sum = SU.control_summary(ctl.pure, control_answer_id=ctl.inp.gold.first_id,
                                    delta_top2_logit=th.control.delta_top2_logit)
    ablation = None
    if abl_v is not None:
        ablation = SU.ablation_summary(prim.summary, by_key[("pos", abl_v, 0)].summary)
    order = suite.gold_alignment_order()
    by_pass = {(r.inp.spec.prompt_id, r.inp.spec.variant, r.inp.spec.fact_index): r.inp for r in results}
    gold_prompts = []
    for p in order:
        inp = by_pass[(p.prompt_id, p.variant, p.fact_index)]
        gold_prompts.append(inp.gold.prompt_entry(p.prompt_id, p.variant, p.fact_key, p.fact_index))
    diag = {
        "type": "diagnostics", "model": model.source, "device": jax.devices()[0].platform,
        "use_norm_lens": True, "use_fp32_unembed": False, "unembed_dtype": str(jnp.dtype(W.dtype)),
        "first_block_ln1_type": _norm_type(spec) if spec.pre_attn_norm else None,
        "final_ln_type": _norm_type(spec),
        "layernorm_bias_fix": "not_needed_rms_model" if spec.norm == "rms" else "layernorm_bias_kept",
        "norm_alignment_fix": "using_next_block_ln1_for_post_block",
        "layer0_norm_fix": "using_real_ln1_on_embeddings" if spec.pre_attn_norm else "no_ln1_raw_embeddings",
        "mixed_precision_fix": "fp32_statistics_streaming_decode",
        "layer0_position_info": "additive_pos_embed_included" if spec.positional == "learned"
        else "token_only_rotary_model",
        "context_prompt": ps.text,
        "target_prediction": f"first unseen token (likely '{ps.answer}')",
        "surface_diagnostics_config": {
            "delta": th.surface.surface_delta, "gamma": th.surface.geom_gamma, "K": th.surface.topk_prompt_k,
            "tau": th.surface.topk_prompt_tau, "semantic_margin": {"delta_abs": th.semantic.margin_delta_abs},
            "semantic_gate": {"delta_top2_logit": th.semantic.top2_delta_logit}},
        "answer_margin_unit": "logit",
        "unembed_bias": SU.unembed_bias_audit(None if b is None else np.asarray(b)),
        **sec("head"),                                   # flags, prism_summary
        "copy_soft_config": {"threshold": th.copy.soft_threshold, "window_ks": list(th.copy.soft_window_ks),
                             "extra_thresholds": list(th.copy.soft_extra_thresholds)},
        **sec("calibration"),                            # tau_norm_per_layer (+ how it was fitted)
        "copy_mask": M.copy_ignore_mask(decode, spec.vocab_size),
    }
    if prism_block is not None and "prism_summary" in diag:
        diag["prism_summary"] = prism_block              # jaxlens.probe.prism (spec §4.3)
    diag.update(prim.summary)
    diag.update(sec("per_pass"))                         # gate stability ... lens consistency
    diag["gold_alignment"] = prim.inp.gold.alignment()
    diag.update(sec("run"))                              # forward-of-two, last-layer consistency, norm-temp KLs
    diag["gold_alignment_rate"] = gold_mod.gold_alignment_rate(gold_prompts)
    diag["gold_alignment_prompts"] = gold_prompts
    src = tuned_source or PT.TunedSource(mode="off", status="disabled")
    if dg is not None:
        diag["tuned_lens"] = dict(src.status_block(), **({"summaries": tuned.json_block["summaries"]} if tuned else {}))
        if tuned is not None:
            diag.update(tuned.diag_block)                # *_tuned mirrors, skip-layers sanity
        diag.update(sec("post"))                         # confirmed semantics, artefact-score config
        diag["micro_suite"] = micro
        diag.update(sec("tail"))                         # position window, norm trajectory
    summary = {"semantic_margin": prim.summary.get("semantic_margin"),
               "semantic_gate": prim.summary.get("semantic_gate"),
               "micro_suite": micro.get("aggregates")}
    if dg is not None:
        summary["position_window"] = sec("tail").get("position_window")
    doc = {
        "prompt": {"type": "prompt", "context_prompt": ps.text, "ground_truth": ps.answer,
                   "fact_key": ps.fact_key, "fact_index": ps.fact_index},
        "test_prompts": test_logits["test_prompts"],
        "temperature_exploration": test_logits["temperature_exploration"],
        "diagnostics": diag,
        "final_prediction": fin,
        "model_stats": {"type": "model_stats", "num_layers": n, "d_model": spec.d_model, "n_heads": spec.n_heads,
                        "d_vocab": spec.vocab_size, "n_ctx": spec.max_positions, "architecture": "pre_norm"},
        **({"raw_lens_check": dg.top_level["raw_lens_check"]} if dg is not None else {}),
        "prompts": {"facts_micro_suite": [f.key for f in suite.facts]},
        "provenance": {"env": _env(model), "tool": "jaxlens",
                       "reference": "logos-in-layers 001_layers_baseline @ 87ab64d (spec/probe.md)",
                       "fixed_reference_bugs": _fixed_bugs(quirks),
                       "suite": suite.name, "suite_source": str(suite.source)},
        "copy_flag_columns": M.copy_flag_columns(th.copy),
        "ablation_summary": ablation,
        "control_prompt": {"context_prompt": ctl.inp.spec.text, "gold_answer": ctl.inp.gold.gold_answer(),
                           "gold_alignment": ctl.inp.gold.alignment()},
        "control_summary": control_sum,
        "tuned_lens": tuned.json_block if tuned is not None else src.status_block(),
        "summary": summary,
        "micro_suite": {"facts": micro.get("facts"), "aggregates": micro.get("aggregates")},
        "gold_answer": prim.inp.gold.gold_answer(),
    }
    if dg is not None:
        names = output_names(model.name)
        t = tuned is not None
        files = {"pure_csv": names["pure"], "tuned_pure_csv": names["pure_tuned"] if t else None,
                 "rawlens_full_csv": names["rawlens"], "tuned_variants_csv": names["tuned_variants"] if t else None,
                 "positions_audit_csv": names["positions_audit"] if t else None}
        ga = doc.pop("gold_answer")
        doc["measurement_guidance"] = dg.top_level["measurement_guidance"]
        doc["evaluation_pack"] = dg.evaluation_pack(micro, files)
        doc["gold_answer"] = ga
    return doc, records, pure


def _fixed_bugs(quirks: M.ReferenceQuirks) -> dict:
    out = dict(FIXED_REFERENCE_BUGS)
    if quirks.q1_gap_not_in_summaries:
        out.pop("Q1")
    if quirks.copy_stability_key_bug:
        out.pop("N1")
    for flag, key in (("q3_position_window_last_only", "Q3"), ("q5_raw_sample_summary_once", "Q5"),
                      ("q13_forward_jaccard_top5", "Q13"), ("n2_jaccard_writeback_by_variant", "N2"),
                      ("q2_tuned_audit_last_fact", "Q2"), ("q9_skip_layer_index", "Q9"),
                      ("n3_prefer_tuned_gain_zero", "N3"), ("n4_calibration_only_without_gain", "N4"),
                      ("q6_prism_reference_fit", "Q6")):
        if getattr(quirks, flag, False):
            out.pop(key)
    return out


def final_head_probes(model, suite: Suite, decode) -> dict:
    """Test prompts (top-10) and the temperature exploration (top-15) from the model's real head."""
    fh = suite.final_head
    tok = model.tokenizer
    seqs = [gold_mod.model_input_ids(tok, p) for p in fh.test_prompts]
    te = fh.temperature_exploration
    te_pass = suite.temperature_exploration_pass
    seqs.append(gold_mod.model_input_ids(tok, te_pass.text))
    ids, mask = pad_batch(seqs)
    fw = model.forward(ids, mask)
    lengths = mask.sum(1)
    last = np.asarray(jnp.take_along_axis(fw.logits, jnp.asarray(lengths - 1)[:, None, None], axis=1)[:, 0])
    tests = [SU.final_head_probe(last[i], decode, top_k=fh.test_prompts_top_k, kind="test_prompt", prompt=p)
             for i, p in enumerate(fh.test_prompts)]
    temps = [SU.final_head_probe(last[-1], decode, top_k=te.top_k, kind="temperature_exploration", temperature=t)
             for t in te.temperatures]
    return {"test_prompts": tests, "temperature_exploration": temps}


# --------------------------------------------------------------------------------------------------
# 5. outputs


# diagnostics sidecar CSVs: output_names key -> CSV kind (= file suffix); written when they have rows (the
# raw full sweep always has; the milestones / artefact audit whenever the evaluation pack was built)
SIDECARS = {"rawlens": "pure-next-token-rawlens", "rawlens_window": "pure-next-token-rawlens-window",
            "milestones": "milestones", "artifact_audit": "artifact-audit",
            # tuned lens (written when a tuned lens was decoded)
            "records_tuned": "records-tuned", "pure_tuned": "pure-next-token-tuned",
            "tuned_variants": "pure-next-token-tuned-variants", "positions_audit": "positions-tuned-audit",
            # Prism (written when a Prism was decoded)
            "records_prism": "records-prism", "pure_prism": "pure-next-token-prism"}
_WITH_COPY_FLAGS = {"pure-next-token-tuned", "pure-next-token-prism"}


def output_names(name: str) -> dict:
    out = {"json": f"output-{name}.json", "records": f"output-{name}-records.csv",
           "pure": f"output-{name}-pure-next-token.csv"}
    out.update({k: f"output-{name}-{kind}.csv" for k, kind in SIDECARS.items()})
    return out


def write_outputs(result: ProbeResult, out_dir: str) -> list:
    from jaxlens.writers import OutputSet

    names = output_names(result.model_name)
    with OutputSet(out_dir) as out:
        out.csv(names["records"], "records", result.records)
        out.csv(names["pure"], "pure-next-token", result.pure_rows,
                copy_flag_columns=result.json.get("copy_flag_columns"))
        for key, kind in SIDECARS.items():
            rows = result.sidecars.get(kind)
            if rows:
                flags = result.json.get("copy_flag_columns") if kind in _WITH_COPY_FLAGS else None
                out.csv(names[key], kind, rows, copy_flag_columns=flags)
        out.json(names["json"], result.json)
    return list(out.paths)


def milestones_table(result: ProbeResult) -> str:
    cols = ["L_copy", "L_semantic", "first_rank_le_1", "first_rank_le_5", "first_rank_le_10",
            "first_kl_below_0.5", "first_kl_below_1.0"]
    head = ["pass"] + cols
    lines = []
    groups = [("", result.passes)] + ([(" (tuned)", result.tuned.passes)] if result.tuned is not None else []) \
        + ([(" (prism)", result.prism.passes)] if result.prism is not None and result.prism.passes else [])
    for tag, passes in groups:
        for res in passes:
            p = res.inp.spec
            label = f"{p.fact_key or p.answer + ' (control)'} / {p.variant}{tag}"
            lines.append([label] + ["-" if res.summary.get(c) is None else str(res.summary.get(c)) for c in cols])
    widths = [max(len(r[i]) for r in [head] + lines) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in lines])


def run_probe(model, *, suite: Suite | str = "reference", out_dir: str | None = "runs/latest",
              quirks: M.ReferenceQuirks | None = None, progress=None, raw_lens_mode: str | None = None,
              repeat_forward: str | None = None, tuned=None, prism=None) -> ProbeResult:
    """Run the probe on a loaded model (or a source string); write the outputs unless out_dir is None.

    ``raw_lens_mode`` ("sample" / "full" / "off", env LOGOS_RAW_LENS) and ``repeat_forward`` ("auto" /
    "always" / "off", env LOGOS_REPEAT_FORWARD) are the reference's diagnostics knobs. ``tuned``: None or
    "off" (no tuned lens), "auto" (a lens from :func:`jaxlens.probe.tuned.default_locations` if one exists),
    "require", a lens directory, or a loaded lens (:func:`jaxlens.load_lens`). ``prism``: None or "off",
    "auto" (a Prism from :func:`jaxlens.probe.prism.default_locations` if one exists), "on" (the same, but an
    error if there is none), a Prism directory, or a loaded Prism (:func:`jaxlens.lens.prism.load_prism`).
    """
    from jaxlens.models.loader import load_model

    say = progress or (lambda msg: None)
    t_start = time.perf_counter()
    if isinstance(model, str):
        say(f"loading {model}")
        model = load_model(model)
    if isinstance(suite, str):
        suite = load_suite(suite)
    quirks = quirks or M.ReferenceQuirks()
    np.random.seed(SEED)
    decode = gold_mod.token_decoder(model.tokenizer)
    say(f"{model!r}")
    tsrc = PT.resolve(model, tuned, say)              # before any model work: a bad --tuned fails fast
    psrc = PP.resolve(model, prism, say)              # ... and so does a bad --prism
    inputs = prepare(model, suite)
    bad = [p for p in inputs if not p.gold.ok]
    for p in bad:
        say(f"warning: gold answer {p.spec.answer!r} of {p.spec.prompt_id}/{p.spec.variant} could not be "
            f"aligned ({p.gold.status}); answer metrics are blank for that pass")
    say(f"{len(inputs)} lens passes in one batched forward ({max(len(p.input_ids) for p in inputs)} tokens max)")
    dec = run_passes(model, suite, inputs, decode)
    say(f"forward {dec['timings']['forward_s']:.2f} s, fused lens decode {dec['timings']['lens_s']:.2f} s")
    options = D.DiagnosticsOptions.from_env(raw_lens_mode, repeat_forward)
    t_dd = time.perf_counter()
    dd = D.decode_diagnostics(model, suite, inputs, dec, quirks)
    t_pm = time.perf_counter()
    say(f"diagnostics decode (raw-vs-norm, norm temperatures, re-decode) {t_pm - t_dd:.2f} s")
    results = pass_metrics(model, suite, inputs, dec, decode, quirks, diag_cols=dd.pure_columns)
    t_rd = time.perf_counter()
    tres = None
    if tsrc.status == "loaded":
        tres = PT.run_tuned(model, suite, inputs, dec, results, dd, decode, tsrc, quirks)
        say(f"tuned lens {tsrc.path}: decode {tres.timings['tuned_decode_s']:.2f} s, audit "
            f"{tres.timings['tuned_audit_s'] + tres.timings['tuned_skip_s']:.2f} s")
    elif tsrc.status == "missing":
        say(f"no tuned lens found for {model.name} (looked in {', '.join(PT.default_locations(model))}); "
            "tuned outputs skipped")
    t_tu = time.perf_counter()
    pres = PP.run_prism(model, suite, inputs, dec, results, decode, psrc, quirks) if psrc.usable else None
    if pres is not None:
        say(f"Prism {psrc.path}: decode {pres.timings['prism_decode_s']:.2f} s"
            + (f" ({pres.source.error})" if pres.source.error else ""))
    rf = PP.reference_fit(psrc)                       # Q6: the decoded Prism's recipe, from its provenance
    if rf is not None:
        quirks = dataclasses.replace(quirks, q6_prism_reference_fit=rf)
    t_pr = time.perf_counter()

    def rerun():  # the forward-of-two gate: the identical batched forward and decode again, primary pass
        dec2 = dict(dec, fw=model.forward(dec["ids"], dec["mask"]))
        dec2["last"], dec2["raw_last"] = LM.last_position_stats(model, dec2["fw"], **dec["last_kwargs"])
        return pass_metrics(model, suite, inputs[:1], dec2, decode, quirks)[0], dec2["last"]

    dg = D.run_diagnostics(model, suite, inputs, results, dec, dd, decode, quirks, options=options,
                           tuned=None if tres is None else tres.inputs, rerun=rerun)
    t_fh = time.perf_counter()
    heads = final_head_probes(model, suite, decode)
    doc, records, pure = assemble(model, suite, results, dec, decode, heads, quirks, dg, tsrc, tres,
                                  prism_block=pres.summary_block if pres is not None else psrc.summary_block())
    timings = dict(dec["timings"], metrics_s=t_rd - t_pm, tuned_s=t_tu - t_rd, prism_s=t_pr - t_tu,
                   diagnostics_s=(t_pm - t_dd) + (t_fh - t_pr), final_head_s=time.perf_counter() - t_fh,
                   total_s=time.perf_counter() - t_start)
    sidecars = dict(dg.sidecars)
    if tres is not None:
        sidecars["records-tuned"] = [r for res in tres.passes for r in res.records]
        sidecars["pure-next-token-tuned"] = [r for res in tres.passes
                                             for r in pure_rows(res, decode, suite.records.pure_top_k)]
        sidecars.update(tres.sidecars)
    if pres is not None:
        sidecars.update(pres.sidecars)
    result = ProbeResult(model_name=model.name, json=doc, records=records, pure_rows=pure, passes=results,
                         timings=timings, sidecars=sidecars, tuned=tres, prism=pres)
    if out_dir is not None:
        result.paths = write_outputs(result, out_dir)
        say(f"wrote {len(result.paths)} files to {out_dir}")
    return result


if __name__ == "__main__":  # pragma: no cover
    r = run_probe(sys.argv[1] if len(sys.argv) > 1 else "demo", progress=print)
    print(r.milestones_table())
    print(os.path.abspath("runs/latest"))
