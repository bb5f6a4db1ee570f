"""The probe: the reference pipeline (spec/probe.md, logos-in-layers experiment 001) in one batched run.

All lens passes of a suite (5 facts x 2 variants + the control for the reference suite) go through ONE
jitted forward (right-padded), the final-head probes through a second, and each lens decode is a fused
``lens_stats`` call over every (layer, pass, position) row. There are no per-layer or per-position loops
over model or vocabulary work: the Python loops below only format rows.

Stages (each a function, so the diagnostics of spec §2.12-2.28 can slot in after :func:`run_passes`):

1. :func:`prepare`       tokenise every pass (BOS policy of the tokenizer) and align its gold answer
2. :func:`run_passes`    forward + norm-lens stats (all positions, top-20) + pure next-token stats
                         (last position, top-50, gathered answer / control / prompt-token logits)
3. :func:`pass_metrics`  spec §2 metrics and per-pass summaries (jaxlens.metrics)
   diagnostics           spec §2.12-2.20, 2.23, 2.26, 2.28 (jaxlens.diagnostics): a fused decode stage before
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

from . import diagnostics as D
from . import gold as gold_mod
from . import metrics as M
from . import probe_tuned as PT
from .errors import JaxlensError
from .lens import lens_stats
from .loader import pad_batch
from .suite import Suite, load_suite

NEXT_TOKEN = "⟨NEXT⟩"
SEED = 316

# Reference bugs this pipeline fixes (spec Appendix A); recorded in the JSON provenance and the README.
FIXED_REFERENCE_BUGS = {
    "Q1": "answer_logit_gap reaches the semantic-gate summaries (reference: always null); "
          "--reference-quirks restores the reference",
    "N1": "copy_thresholds.stability looks up the 0.7 threshold under the key it was stored with "
          "(reference: '0.70' lookup, so the result could only be 'none' or 'mixed')",
    "Q4": "Gemma-2's final logit softcap is applied in every lens, so the last-layer KL is 0 "
          "(reference: ~1 bit on Gemma-2)",
    # diagnostics (jaxlens.diagnostics); see docs/reference_bugs.md
    "Q3": "the position window scores the gold answer at every grid position (reference: only at the last, "
          "so rank1_frac < 0.5 always); --reference-quirks restores the reference",
    "Q5": "the raw-lens sample summary uses the samples of every sampled pass and sets the window radius of "
          "every pass, the primary's included (reference: primary samples only, primary radius always 4); "
          "--reference-quirks restores the reference",
    "Q13": "the forward-of-two gate compares top-10 token strings as requested (reference: top-5); "
           "--reference-quirks restores the reference",
    "N2": "each pure row carries its own pass's raw/consecutive top-50 Jaccards (reference: every pos row of a "
          "variant shows the last fact's values); --reference-quirks restores the reference",
    # tuned lens (jaxlens.probe_tuned)
    "Q2": "the tuned audit (variants, positions, head mismatch, audit summary) describes the primary fact "
          "(reference: the last pos/orig pass, Canada); --reference-quirks restores the reference",
    "Q9": "skip-layers sanity at m decodes layer n-m, i.e. really skips m blocks (reference: layer n-m+1); "
          "--reference-quirks restores the reference",
    "N3": "prefer_tuned's rank rule needs the tuned lens to reach rank <= 5 at least one layer earlier "
          "(reference: a gain of 0 passes on models with < 10 layers); --reference-quirks restores the reference",
}


@dataclasses.dataclass
class PassInput:
    """One lens pass (a prompt) after tokenisation and gold alignment."""

    spec: Any                      # suite.PromptPass
    input_ids: list
    ctx_ids: list
    gold: gold_mod.GoldAlignment
    token_strs: list
    verbose: list                  # positions given top-20 in the records CSV


@dataclasses.dataclass
class PassResult:
    inp: PassInput
    pure: dict                     # pure next-token columns (metrics.pure_next_token_metrics)
    summary: dict                  # metrics.summarize_pass
    records: list                  # records CSV rows (dicts)


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

    def milestones_table(self) -> str:
        return milestones_table(self)


# --------------------------------------------------------------------------------------------------
# 1. tokenisation and gold alignment


def prepare(model, suite: Suite) -> list:
    tok = model.tokenizer
    important = suite.records.important_words
    out = []
    for p in suite.passes():
        ids = gold_mod.model_input_ids(tok, p.text)
        if not ids:
            raise JaxlensError(f"prompt {p.text!r} tokenises to nothing")
        strs = gold_mod.position_strings(tok, ids)
        out.append(PassInput(spec=p, input_ids=list(ids), ctx_ids=gold_mod.ctx_ids(tok, p.text),
                             gold=gold_mod.align_gold(tok, p.text, p.answer, pieces_k=suite.thresholds.gold.pieces_k),
                             token_strs=strs, verbose=M.verbose_positions(strs, important)))
    return out


def _ragged(rows: list, fill=-1) -> np.ndarray:
    S = max(1, max(len(r) for r in rows))
    out = np.full((len(rows), S), fill, np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


# --------------------------------------------------------------------------------------------------
# 2. the batched forward and the fused lens decodes


def run_passes(model, suite: Suite, inputs: list, decode) -> dict:
    """One forward of every pass; norm-lens stats at all positions and at the last position."""
    ids, mask = pad_batch([p.input_ids for p in inputs])
    t0 = time.perf_counter()
    fw = model.forward(ids, mask)
    jax.block_until_ready(fw.logits)
    t1 = time.perf_counter()
    golds = np.array([p.gold.first_id if p.gold.first_id is not None else -1 for p in inputs], np.int32)
    k_all = max(suite.records.top_k_verbose, suite.records.top_k_default)
    allpos = lens_stats(model, fw, "norm", gold_ids=golds, top_k=k_all, positions="all", cosine=False).numpy()
    # pure next-token rows: answer, the control's two answers, and the prompt vocabulary, gathered
    primary_gold = inputs[0].gold.first_id
    prompt_vocab = [M.prompt_vocab(p.ctx_ids, decode) for p in inputs]
    gather = []
    for p, pv in zip(inputs, prompt_vocab):
        ctl = [p.gold.first_id if p.gold.first_id is not None else -1,
               primary_gold if primary_gold is not None else -1]
        gather.append(ctl + list(pv))
    K = max(suite.thresholds.surface.topk_prompt_k, suite.records.pure_top_k, suite.thresholds.raw_lens.topk_jaccard_k)
    # the norm and the raw lens together, in one streaming pass (the raw one feeds the diagnostics)
    last_kwargs = dict(gold_ids=golds, top_k=min(64, K), gather_ids=_ragged(gather), return_rows=True)
    last, raw_last = D.last_position_stats(model, fw, **last_kwargs)
    t2 = time.perf_counter()
    return dict(fw=fw, ids=ids, mask=mask, allpos=allpos, last=last, raw_last=raw_last, last_kwargs=last_kwargs,
                prompt_vocab=prompt_vocab, timings={"forward_s": t1 - t0, "lens_s": t2 - t1})


# --------------------------------------------------------------------------------------------------
# 3. metrics per pass


def pass_metrics(model, suite: Suite, inputs: list, dec: dict, decode,
                 quirks: M.ReferenceQuirks = M.ReferenceQuirks(), diag_cols: list | None = None) -> list:
    """``diag_cols``: per pass, the pure columns of the diagnostics decode stage
    (:attr:`jaxlens.diagnostics.DecodeDiagnostics.pure_columns`: kl_to_final_bits_norm_temp, the raw /
    consecutive top-50 Jaccards, resid_norm_ratio, delta_resid_cos); blank without it."""
    return lens_pass_metrics(model, suite, inputs, dec, dec["last"], dec["allpos"], decode, lens="norm",
                             quirks=quirks, diag_cols=diag_cols)


def lens_pass_metrics(model, suite: Suite, inputs: list, dec: dict, last, allpos, decode, *, lens: str,
                      quirks: M.ReferenceQuirks = M.ReferenceQuirks(), diag_cols: list | None = None) -> list:
    """Pure next-token columns, the per-pass summary and the records rows of every pass for one lens.

    ``last``: the lens's last-position :class:`~jaxlens.lens.LensStats` (numpy; gathered logits at
    ``dec["last_kwargs"]["gather_ids"]``, rows returned); ``allpos``: its all-positions stats. Both carry
    the same layers (0..n for the norm lens, 1..n for the tuned lens); ``lens`` tags the summary keys.
    """
    spec = model.spec
    n = spec.n_layers
    V = spec.vocab_size
    th = suite.thresholds
    W = np.asarray(model.unembedding()[0], np.float32)
    layers = [int(x) for x in last.layers]
    logits = np.asarray(dec["fw"].logits)
    results = []
    for b, p in enumerate(inputs):
        T = len(p.input_ids)
        t = T - 1
        g = p.gold
        gid = g.first_id
        gl = last.gathered_logits[:, b, 0]                         # [R, S]: answer, primary answer, prompt vocab
        lse = last.lse[:, b, 0]
        top_ids = last.top_ids[:, b, 0]
        top_probs = last.top_probs[:, b, 0]
        with np.errstate(divide="ignore"):
            top_scores = np.log(top_probs.astype(np.float64)) + lse[:, None]
        pv = dec["prompt_vocab"][b]
        prompt_probs = np.exp(gl[:, 2:2 + len(pv)].astype(np.float64) - lse[:, None])
        rows = last.rows[:, b, 0].astype(np.float32)                 # h_geom [R, d] (before any temperature)
        cos_answer, cos_prompt = M.geom_cosines(rows, W, gid, pv)
        control = None
        if p.spec.is_control:
            control = (np.exp(gl[:, 0] - lse), np.exp(gl[:, 1] - lse))
        teacher_H = M.teacher_entropy_bits(logits[b, t])
        extra = dict(diag_cols[b]) if diag_cols is not None else {}
        cols = M.pure_next_token_metrics(
            entropy_bits=last.entropy_bits[:, b, 0], kl_to_final_bits=last.kl_to_final_bits[:, b, 0],
            top_ids=top_ids, top_probs=top_probs, teacher_entropy_bits=teacher_H, vocab_size=V,
            ctx_ids=p.ctx_ids, decode=decode, gold_id=gid, gold_string=g.string if g.ok else None,
            gold_rank=last.gold_rank[:, b, 0] if gid is not None else None,
            gold_prob=last.gold_prob[:, b, 0] if gid is not None else None,
            answer_score=gl[:, 0] if gid is not None else None, top_scores=top_scores,
            cos_to_final=last.cos_to_final[:, b, 0], cos_to_answer=cos_answer, cos_to_prompt=cos_prompt,
            prompt_probs=prompt_probs, prompt_vocab_ids=pv, control_probs=control,
            kl_to_final_bits_norm_temp=extra.pop("kl_to_final_bits_norm_temp", None),
            layers=layers, lens=lens, thresholds=th, pure_top_k=suite.records.pure_top_k, pos=t)
        cols.update(extra)
        summary = M.summarize_pass(cols, n_layers=n, lens=lens, p_uniform=1.0 / V, thresholds=th,
                                   quirks=quirks)
        records = _records_rows(p, allpos, b, decode, suite)
        results.append(PassResult(inp=p, pure=cols, summary=summary, records=records))
    return results


def _records_rows(p: PassInput, allpos, b: int, decode, suite: Suite) -> list:
    T = len(p.input_ids)
    kv, kd = suite.records.top_k_verbose, suite.records.top_k_default
    ent = allpos.entropy_bits[:, b, :T]
    tid = allpos.top_ids[:, b, :T]
    tpr = allpos.top_probs[:, b, :T]
    base = _pass_keys(p.spec)
    rows = []
    for i, layer in enumerate(int(x) for x in allpos.layers):
        for t in range(T):
            k = kv if p.verbose[t] else kd
            row = dict(base, layer=layer, pos=t, token=p.token_strs[t], entropy=float(ent[i, t]),
                       entropy_bits=float(ent[i, t]))
            for j in range(k):
                row[f"top{j + 1}"] = decode(int(tid[i, t, j]))
                row[f"prob{j + 1}"] = float(tpr[i, t, j])
            row["rest_mass"] = float(M.rest_mass(tpr[i, t, :k]))
            rows.append(row)
    return rows


def _pass_keys(ps) -> dict:
    return {"fact_key": ps.fact_key, "fact_index": ps.fact_index, "prompt_id": ps.prompt_id,
            "prompt_variant": ps.variant}


# --------------------------------------------------------------------------------------------------
# 4. rows and the JSON document


_PURE_SKIP = {"layer", "top1_id", "top1", "top_ids", "top_probs", "entropy", "entropy_bits", "rest_mass",
              "control_top2_logit_gap"}


def pure_rows(res: PassResult, decode, k: int) -> list:
    cols = res.pure
    n_rows = len(cols["layer"])
    T = len(res.inp.input_ids)
    out = []
    for i in range(n_rows):
        row = dict(_pass_keys(res.inp.spec), layer=cols["layer"][i], pos=T - 1, token=NEXT_TOKEN,
                   entropy=cols["entropy"][i], entropy_bits=cols["entropy_bits"][i])
        for j in range(k):
            row[f"top{j + 1}"] = decode(int(cols["top_ids"][i][j]))
            row[f"prob{j + 1}"] = float(cols["top_probs"][i][j])
        row["rest_mass"] = cols["rest_mass"][i]
        for name, vals in cols.items():
            if name not in _PURE_SKIP:
                row[name] = vals[i]
        out.append(row)
    return out


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
    from . import __version__

    return __version__


def _jaxlib_version():
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:  # noqa: BLE001
        return None


def assemble(model, suite: Suite, results: list, dec: dict, decode, test_logits: dict,
             quirks: M.ReferenceQuirks = M.ReferenceQuirks(), dg: "D.DiagnosticsResult | None" = None,
             tuned_source: "PT.TunedSource | None" = None, tuned: "PT.TunedResult | None" = None) -> tuple:
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
    fin = M.final_head_probe(logits[0, T0 - 1], decode, top_k=suite.final_head.final_prediction_top_k)
    facts = []
    for f in suite.facts:
        r = by_key[("pos", orig_v, f.index)]
        facts.append({"fact_key": f.key, "fact_index": f.index, "summary": r.summary,
                      "row_offset": offsets[("pos", orig_v, f.index)],
                      # confirmed semantics exist for the primary fact only (reference, Q11)
                      "L_semantic_confirmed": dg.L_semantic_confirmed if (dg is not None and f.index == 0) else None})
    micro = M.micro_suite(facts, n_layers=n, notes=suite.micro_suite_notes)
    ctl = next(r for r in results if r.inp.spec.is_control)
    control_sum = M.control_summary(ctl.pure, control_answer_id=ctl.inp.gold.first_id,
                                    delta_top2_logit=th.control.delta_top2_logit)
    ablation = None
    if abl_v is not None:
        ablation = M.ablation_summary(prim.summary, by_key[("pos", abl_v, 0)].summary)
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
        "unembed_bias": M.unembed_bias_audit(None if b is None else np.asarray(b)),
        **sec("head"),                                   # flags, prism_summary
        "copy_soft_config": {"threshold": th.copy.soft_threshold, "window_ks": list(th.copy.soft_window_ks),
                             "extra_thresholds": list(th.copy.soft_extra_thresholds)},
        **sec("calibration"),                            # tau_norm_per_layer (+ how it was fitted)
        "copy_mask": M.copy_ignore_mask(decode, spec.vocab_size),
    }
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
                      ("n3_prefer_tuned_gain_zero", "N3")):
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
    tests = [M.final_head_probe(last[i], decode, top_k=fh.test_prompts_top_k, kind="test_prompt", prompt=p)
             for i, p in enumerate(fh.test_prompts)]
    temps = [M.final_head_probe(last[-1], decode, top_k=te.top_k, kind="temperature_exploration", temperature=t)
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
            "tuned_variants": "pure-next-token-tuned-variants", "positions_audit": "positions-tuned-audit"}
_WITH_COPY_FLAGS = {"pure-next-token-tuned"}


def output_names(name: str) -> dict:
    out = {"json": f"output-{name}.json", "records": f"output-{name}-records.csv",
           "pure": f"output-{name}-pure-next-token.csv"}
    out.update({k: f"output-{name}-{kind}.csv" for k, kind in SIDECARS.items()})
    return out


def write_outputs(result: ProbeResult, out_dir: str) -> list:
    from .writers import OutputSet

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
    groups = [("", result.passes)] + ([(" (tuned)", result.tuned.passes)] if result.tuned is not None else [])
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
              repeat_forward: str | None = None, tuned=None) -> ProbeResult:
    """Run the probe on a loaded model (or a source string); write the outputs unless out_dir is None.

    ``raw_lens_mode`` ("sample" / "full" / "off", env LOGOS_RAW_LENS) and ``repeat_forward`` ("auto" /
    "always" / "off", env LOGOS_REPEAT_FORWARD) are the reference's diagnostics knobs. ``tuned``: None or
    "off" (no tuned lens), "auto" (a lens from :func:`jaxlens.probe_tuned.default_locations` if one exists),
    "require", a lens directory, or a loaded lens (:func:`jaxlens.load_lens`).
    """
    from .loader import load_model

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

    def rerun():  # the forward-of-two gate: the identical batched forward and decode again, primary pass
        dec2 = dict(dec, fw=model.forward(dec["ids"], dec["mask"]))
        dec2["last"], dec2["raw_last"] = D.last_position_stats(model, dec2["fw"], **dec["last_kwargs"])
        return pass_metrics(model, suite, inputs[:1], dec2, decode, quirks)[0], dec2["last"]

    dg = D.run_diagnostics(model, suite, inputs, results, dec, dd, decode, quirks, options=options,
                           tuned=None if tres is None else tres.inputs, rerun=rerun)
    t_fh = time.perf_counter()
    heads = final_head_probes(model, suite, decode)
    doc, records, pure = assemble(model, suite, results, dec, decode, heads, quirks, dg, tsrc, tres)
    timings = dict(dec["timings"], metrics_s=t_rd - t_pm, tuned_s=t_tu - t_rd,
                   diagnostics_s=(t_pm - t_dd) + (t_fh - t_tu), final_head_s=time.perf_counter() - t_fh,
                   total_s=time.perf_counter() - t_start)
    sidecars = dict(dg.sidecars)
    if tres is not None:
        sidecars["records-tuned"] = [r for res in tres.passes for r in res.records]
        sidecars["pure-next-token-tuned"] = [r for res in tres.passes
                                             for r in pure_rows(res, decode, suite.records.pure_top_k)]
        sidecars.update(tres.sidecars)
    result = ProbeResult(model_name=model.name, json=doc, records=records, pure_rows=pure, passes=results,
                         timings=timings, sidecars=sidecars, tuned=tres)
    if out_dir is not None:
        result.paths = write_outputs(result, out_dir)
        say(f"wrote {len(result.paths)} files to {out_dir}")
    return result


if __name__ == "__main__":  # pragma: no cover
    r = run_probe(sys.argv[1] if len(sys.argv) > 1 else "demo", progress=print)
    print(r.milestones_table())
    print(os.path.abspath("runs/latest"))
