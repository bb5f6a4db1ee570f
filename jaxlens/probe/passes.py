"""The probe's lens passes: tokenisation and gold alignment of every pass, the batched forward with its
fused norm-lens decodes, and one lens's pure next-token columns, summaries and records rows per pass.
The tuned part of the probe reuses :func:`lens_pass_metrics` for its own lens.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

from jaxlens.errors import JaxlensError
from jaxlens.lens import multi as LM
from jaxlens.lens.stats import lens_stats
from jaxlens.models.loader import pad_batch
from jaxlens.probe import gold as gold_mod
from jaxlens.probe import metrics as M
from jaxlens.probe.metrics import NEXT_TOKEN
from jaxlens.probe import summaries as SU
from jaxlens.probe.suite import Suite



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
    last, raw_last = LM.last_position_stats(model, fw, **last_kwargs)
    t2 = time.perf_counter()
    return dict(fw=fw, ids=ids, mask=mask, allpos=allpos, last=last, raw_last=raw_last, last_kwargs=last_kwargs,
                prompt_vocab=prompt_vocab, timings={"forward_s": t1 - t0, "lens_s": t2 - t1})


# --------------------------------------------------------------------------------------------------
# 3. metrics per pass


def pass_metrics(model, suite: Suite, inputs: list, dec: dict, decode,
                 quirks: M.ReferenceQuirks = M.ReferenceQuirks(), diag_cols: list | None = None) -> list:
    """``diag_cols``: per pass, the pure columns of the diagnostics decode stage
    (:attr:`jaxlens.probe.diagnostics.DecodeDiagnostics.pure_columns`: kl_to_final_bits_norm_temp, the raw /
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
        summary = SU.summarize_pass(cols, n_layers=n, lens=lens, p_uniform=1.0 / V, thresholds=th,
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
