"""Per-layer probe metrics and per-pass summaries (spec/probe.md §2.1-2.11, 2.22, 2.24, 2.25, 2.27).

Model-independent and pure numpy: everything here takes the per-layer arrays the lens engine
(``jaxlens.lens_stats``) returns for ONE pass (one lens, one prompt) and plain Python data.

Inputs, for a pass with L lens layers (L = n + 1 for the norm lens, n for the tuned lens) at the pure
next-token position t* = T - 1. Arrays may be given either already sliced at t* ([L], [L, k]) or with
the position axis ([L, T], [L, T, k]); :func:`pure_next_token_metrics` then takes ``pos`` (-1).

* ``entropy_bits`` [L], ``kl_to_final_bits`` [L] (KL(P_layer || P_final), bits),
* ``top_ids`` / ``top_probs`` [L, k]: probabilities descending (ties by lower id), full-softmax probs;
  k >= 2 for the copy detectors, >= 5 for p_top5, >= 50 for ``topk_prompt_mass@50``,
* ``gold_rank`` / ``gold_prob`` [L] at the gold first id (rank = 1 + #strictly greater),
* ``answer_score`` [L] and ``top_scores`` [L, >=2]: the gold logit and the logits of ``top_ids``
  (the engine's gathered logits). Log-probabilities work equally well - every gap below is a
  difference of two scores of the same row, and ``log p_i = z_i - lse``; when neither is given the
  gaps are computed from ``log(gold_prob)`` and ``log(top_probs)``,
* ``cos_to_final`` [L]; ``cos_to_answer`` [L]; ``cos_to_prompt`` [L, P] (cosine of the decoded state
  with the decoder column of every prompt-vocabulary id, in :func:`prompt_vocab` order) or [L] (the max),
* ``prompt_probs`` [L, P]: probabilities at the prompt-vocabulary ids (``exp(z - lse)``),
* ``control_probs`` = (P(control answer) [L], P(primary answer) [L]) on the control pass,
* ``decode(id) -> str`` for token strings (``jaxlens.probe.gold.token_decoder``).

Outputs are plain Python (lists, floats, ints, bools, None): the per-layer "pure next-token" columns
keyed by their CSV names, and the summary dicts keyed (and ordered) like the reference JSON.

Reference bugs handled here (Appendix A): Q1 is FIXED by default (the answer-logit gap reaches the
summaries); ``ReferenceQuirks(q1_gap_not_in_summaries=True)`` reproduces the reference. N1 (not in
Appendix A, found in the reference source): the copy-threshold stability rule looks up the key
"0.70" while the map is keyed "0.7", so it can never say "stable"/"fragile"; fixed by default,
``ReferenceQuirks(copy_stability_key_bug=True)`` reproduces it. See docs/probe_metrics.md.
"""
from __future__ import annotations

import math
import string
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from jaxlens.probe.suite import CopyThresholds, Thresholds

__all__ = [
    "LN2",
    "NEXT_TOKEN",
    "ReferenceQuirks",
    # primitives
    "percentile",
    "first_layer",
    "depth_fraction",
    "entropy_bits_from_logits",
    "kl_bits",
    "teacher_entropy_bits",
    "cosine_to_final",
    "geom_cosines",
    "rest_mass",
    "answer_logit_gaps",
    # copy / surface
    "is_pure_ws_punct",
    "is_id_subseq",
    "format_threshold",
    "copy_strict_label",
    "copy_soft_label",
    "copy_flag_columns",
    "top1_windows",
    "strict_copy_flags",
    "soft_copy_flags",
    "copy_flags",
    "copy_ignore_mask",
    "prompt_vocab",
    "topk_prompt_mass",
    "is_verbose_position",
    "verbose_positions",
    # per pass
    "pure_next_token_metrics",
    "columns_to_rows",
]

LN2 = math.log(2.0)
#: The ``token`` cell of pure next-token rows.
NEXT_TOKEN = "\u27e8NEXT\u27e9"


@dataclass(frozen=True)
class ReferenceQuirks:
    """Which reference bugs to reproduce (all fixed by default; ``ReferenceQuirks.reference()`` = the
    published behaviour)."""

    #: Q1: the per-layer answer-logit gap never reaches the summaries, so ``answer_margin_thresholds``,
    #: ``L_semantic_top2_ok_norm(_frac)``, ``gap_at_L_semantic_norm``, ``L_semantic_strong(_run2)`` and
    #: their depth fractions are null.
    q1_gap_not_in_summaries: bool = False
    #: N1: ``copy_thresholds.stability`` is "none" when no strict layer exists, else always "mixed".
    copy_stability_key_bug: bool = False
    #: Q3: the position window scores the gold id only at the last position (jaxlens.probe.diagnostics).
    q3_position_window_last_only: bool = False
    #: Q5: the raw-lens sample summary (and the window radius it sets) comes from the primary pass's
    #: samples only, and the primary pass's window always uses the base radius (jaxlens.probe.diagnostics).
    q5_raw_sample_summary_once: bool = False
    #: Q13: the forward-of-two Jaccard compares top-5 token strings instead of the requested top-10.
    q13_forward_jaccard_top5: bool = False
    #: N2: the raw/consecutive top-50 Jaccards written into the pure rows of every pos pass are those of
    #: the last pos pass with the same variant (the control keeps its own).
    n2_jaccard_writeback_by_variant: bool = False
    #: Q2: the tuned audit (variants, positions, head mismatch, audit summary) describes the last pos pass of
    #: the primary variant (the reference overwrote it in every such pass), not the primary fact.
    q2_tuned_audit_last_fact: bool = False
    #: Q9: "skip the last m blocks" decodes lens layer n-m+1 (so only m-1 blocks are skipped).
    q9_skip_layer_index: bool = False
    #: N3: prefer_tuned's rank rule accepts a gain of 0 layers when round(0.05 n) == 0 (models under 10 layers).
    n3_prefer_tuned_gain_zero: bool = False
    #: N4: ``tuned_is_calibration_only`` (rot_p50 < 0.2 and temp_p50 >= 0.8 tuned_p50) also fires when the
    #: tuned lens gains nothing (tuned_p50 <= 0), where its verdict is decided by the sign of rounding noise.
    n4_calibration_only_without_gain: bool = False
    #: Q6: Prism's fit (``jaxlens fit-prism --reference-quirks``, train_tuned.prism): whitening statistics of
    #: raw residuals (the decoder whitens normalised ones), Q in the transposed orientation, 10 prompts cycled.
    #: In the probe it records the decoded Prism's recipe (set from the artifact's provenance when one is used).
    q6_prism_reference_fit: bool = False

    @classmethod
    def reference(cls) -> "ReferenceQuirks":
        return cls(q1_gap_not_in_summaries=True, copy_stability_key_bug=True, q3_position_window_last_only=True,
                   q5_raw_sample_summary_once=True, q13_forward_jaccard_top5=True,
                   n2_jaccard_writeback_by_variant=True, q2_tuned_audit_last_fact=True, q9_skip_layer_index=True,
                   n3_prefer_tuned_gain_zero=True, n4_calibration_only_without_gain=True,
                   q6_prism_reference_fit=True)


# ==============================================================================================
# Primitives
# ==============================================================================================

def percentile(values: Iterable, q: float) -> Optional[float]:
    """Spec §0 percentile: sort; rank = q (m - 1); linear interpolation between floor and ceil
    (numpy's "linear" method). None for no values, the value itself for one. ``None`` entries are
    ignored."""
    vals = sorted(float(v) for v in values if v is not None)
    if not vals:
        return None
    if len(vals) == 1:
        return vals[0]
    rank = (len(vals) - 1) * float(q)
    lo, hi = int(math.floor(rank)), int(math.ceil(rank))
    if lo == hi:
        return vals[lo]
    return vals[lo] + (vals[hi] - vals[lo]) * (rank - lo)


def first_layer(flags: Sequence, layers: Optional[Sequence[int]] = None) -> Optional[int]:
    """Smallest layer whose flag is truthy (``None`` counts as False); None if there is none.
    ``layers`` defaults to 0..len-1 and is taken in ascending order."""
    layers = list(range(len(flags))) if layers is None else [int(x) for x in layers]
    for layer, f in sorted(zip(layers, flags), key=lambda t: t[0]):
        if f is not None and bool(f):
            return layer
    return None


def depth_fraction(layer: Optional[int], n_layers: int, ndigits: int = 3) -> Optional[float]:
    """``round(L / n, ndigits)`` (Python round), None when L is None or n is not positive."""
    if layer is None or not n_layers or n_layers <= 0:
        return None
    return round(float(layer) / float(n_layers), ndigits)


def _log_softmax32(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float32)
    m = np.max(z, axis=-1, keepdims=True)
    s = np.sum(np.exp(z - m), axis=-1, keepdims=True, dtype=np.float32)
    return (z - m - np.log(s)).astype(np.float32)


def entropy_bits_from_logits(logits) -> float:
    """Entropy of softmax(logits) in bits, from log_softmax in fp32, terms with p = 0 set to 0 (§2.1)."""
    lp = _log_softmax32(logits)
    p = np.exp(lp)
    terms = np.where(p > 0, p * lp, np.float32(0.0))
    return float(-np.sum(terms, dtype=np.float32) / np.float32(LN2))


def kl_bits(p, q) -> float:
    """KL(p || q) in bits with the reference's 1e-30 guards: Σ p (log(p+1e-30) - log(q+1e-30)) / ln 2."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    return float(np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30))) / LN2)


def teacher_entropy_bits(final_logits) -> float:
    """``teacher_entropy_bits`` = -Σ q log(q + 1e-30) / ln 2 with q = softmax(final logits) in fp32 (§2.1)."""
    q = np.exp(_log_softmax32(final_logits))
    s = np.sum(q * np.log(q + np.float32(1e-30)), dtype=np.float32)
    return float(-s) / LN2


def cosine_to_final(vectors, final_logits, bias=None) -> np.ndarray:
    """§2.2 reference computation: ``final_dir = (f - b) / (‖f - b‖ + 1e-12)`` from the model's output
    logits f at t*, and for each bias-free layer vector v [L, V] (``h_geom @ W_U``),
    ``cos = <v / (‖v‖ + 1e-12), final_dir>``, in fp32. (The engine computes this without logits; this
    dense version defines the numbers and tests it.)"""
    f = np.asarray(final_logits, dtype=np.float32).reshape(-1)
    if bias is not None:
        f = f - np.asarray(bias, dtype=np.float32).reshape(-1)
    d = f / (np.linalg.norm(f) + np.float32(1e-12))
    v = np.asarray(vectors, dtype=np.float32)
    v = v / (np.linalg.norm(v, axis=-1, keepdims=True) + np.float32(1e-12))
    return (v @ d).astype(np.float32)


def geom_cosines(h_geom, W_U, answer_id: Optional[int], prompt_ids: Sequence[int]) -> tuple:
    """§2.7 reference computation for rows ``h_geom`` [L, d] and the unembedding ``W_U`` [d, V]:
    (``cos_to_answer`` [L] or None, ``cos_to_prompt`` [L, P]) with every vector normalised by
    ``‖·‖ + 1e-12``; ``cos_to_prompt_max`` is the row max (None for an empty prompt vocabulary)."""
    h = np.asarray(h_geom, dtype=np.float32)
    h = h / (np.linalg.norm(h, axis=-1, keepdims=True) + np.float32(1e-12))

    def cols(ids):
        c = np.asarray(W_U, dtype=np.float32)[:, list(ids)]
        return c / (np.linalg.norm(c, axis=0, keepdims=True) + np.float32(1e-12))
    ca = None if answer_id is None else (h @ cols([int(answer_id)]))[:, 0]
    cp = h @ cols(prompt_ids) if len(prompt_ids) else np.zeros((h.shape[0], 0), np.float32)
    return ca, cp


def rest_mass(top_probs) -> np.ndarray:
    """``rest_mass`` of records / pure rows: max(0, 1 - Σ written top-k probs) (sum in float64).
    ``top_probs`` [..., k] are the probabilities written in that row."""
    tp = np.asarray(top_probs, dtype=np.float64)
    return np.maximum(0.0, 1.0 - tp.sum(axis=-1))


def answer_logit_gaps(answer_rank, answer_id: Optional[int], top_ids, top_scores,
                      answer_score) -> tuple:
    """§2.9 margins in logit units, per layer.

    ``answer_logit_gap`` = z_a - (second-largest logit), only where rank == 1 and a is the arg-max
    (``top_ids[:, 0] == a``); ``answer_vs_top1_gap`` = z_a - (largest logit), only where rank > 1.
    ``top_scores`` [L, >=2] / ``answer_score`` [L] are logits or log-probabilities (same differences).
    Returns two lists with None where undefined.
    """
    L = len(top_ids)
    gap, vs = [None] * L, [None] * L
    if answer_id is None or answer_rank is None or answer_score is None:
        return gap, vs
    top_ids = np.asarray(top_ids)
    top_scores = np.asarray(top_scores, dtype=np.float64)
    answer_score = np.asarray(answer_score, dtype=np.float64)
    for i in range(L):
        r = answer_rank[i]
        if r is None:
            continue
        r = int(r)
        if r == 1 and int(top_ids[i, 0]) == int(answer_id) and top_scores.shape[1] > 1:
            gap[i] = float(answer_score[i] - top_scores[i, 1])
        elif r > 1:
            vs[i] = float(answer_score[i] - top_scores[i, 0])
    return gap, vs


# ==============================================================================================
# Copy detectors (§2.3), prompt vocabulary, verbose positions
# ==============================================================================================

_PUNCT = set(string.punctuation)


def is_pure_ws_punct(s: Optional[str]) -> bool:
    """Whitespace/punctuation guard: True if ``s.strip() == ""``, or if it strips to nothing once the
    tokenizer space markers ``▁`` (U+2581), ``Ġ`` (U+0120), ``Ċ`` (U+010A) become spaces, or if every
    character (markers replaced) is whitespace or ASCII punctuation. None -> False."""
    if s is None:
        return False
    if s.strip() == "":
        return True
    t = s.replace("\u2581", " ").replace("\u0120", " ").replace("\u010a", " ")
    if t.strip() == "":
        return True
    return all(ch.isspace() or ch in _PUNCT for ch in t)


def is_id_subseq(needle: Sequence[int], haystack: Sequence[int]) -> bool:
    """True iff ``needle`` (non-empty) equals some contiguous slice of ``haystack``."""
    k = len(needle)
    if k == 0 or k > len(haystack):
        return False
    needle = [int(x) for x in needle]
    hay = [int(x) for x in haystack]
    return any(hay[i:i + k] == needle for i in range(len(hay) - k + 1))


def format_threshold(x: float, decimals: int = 6) -> str:
    """Threshold label: ``decimals`` decimals, trailing zeros and dot stripped (0.95 -> "0.95", 0.5 -> "0.5")."""
    return f"{float(x):.{decimals}f}".rstrip("0").rstrip(".")


def copy_strict_label(tau: float, sweep: bool = False) -> str:
    """``copy_strict@{tau}``: 6 decimals for the primary label, 2 for sweep labels (both stripped)."""
    return f"copy_strict@{format_threshold(tau, 2 if sweep else 6)}"


def copy_soft_label(k: int, tau: float) -> str:
    return f"copy_soft_k{int(k)}@{format_threshold(tau, 6)}"


def _soft_extra_pairs(cfg: CopyThresholds) -> list:
    pairs = {(float(t), int(k)) for t in cfg.soft_extra_thresholds for k in cfg.soft_window_ks}
    pairs -= {(float(cfg.soft_threshold), int(k)) for k in cfg.soft_window_ks}
    return sorted(pairs)


def copy_flag_columns(cfg: Optional[CopyThresholds] = None) -> list:
    """``copy_flag_columns`` (JSON and CSV order): the primary strict label, the sweep labels
    (deduplicated, first occurrence kept), the soft labels by k, then extra soft labels sorted by (tau, k)."""
    cfg = cfg or CopyThresholds()
    out = [copy_strict_label(cfg.strict_threshold)]
    for t in sorted(set(float(x) for x in cfg.strict_sweep)):
        lab = copy_strict_label(t, sweep=True)
        if lab not in out:
            out.append(lab)
    for k in dict.fromkeys(int(k) for k in cfg.soft_window_ks):
        lab = copy_soft_label(k, cfg.soft_threshold)
        if lab not in out:
            out.append(lab)
    for t, k in _soft_extra_pairs(cfg):
        lab = copy_soft_label(k, t)
        if lab not in out:
            out.append(lab)
    return out


def top1_windows(top1_ids: Sequence[int], k: int) -> list:
    """The rolling top-1 window of each layer: the last ``k`` top-1 ids of this pass up to and
    including the layer (windows span consecutive layers of one pass and start empty)."""
    ids = [int(x) for x in top1_ids]
    return [ids[max(0, i - k + 1):i + 1] for i in range(len(ids))]


def strict_copy_flags(top1_ids, p1, p2, ctx_ids: Sequence[int], top1_strs: Sequence[str], *,
                      threshold: float, margin: float, window_k: int = 1) -> list:
    """Strict copy per layer: the last ``window_k`` top-1 ids are a contiguous slice of ``ctx_ids``,
    p1 > threshold and p1 - p2 > margin; forced False when the top-1 string passes
    :func:`is_pure_ws_punct`."""
    out = []
    for w, a, b, s in zip(top1_windows(top1_ids, window_k), p1, p2, top1_strs):
        hit = (len(w) >= window_k and is_id_subseq(w[-window_k:], ctx_ids)
               and float(a) > threshold and (float(a) - float(b)) > margin)
        out.append(bool(hit and not is_pure_ws_punct(s)))
    return out


def soft_copy_flags(top1_ids, p1, ctx_ids: Sequence[int], *, threshold: float, k: int) -> list:
    """Soft copy per layer: the window of the last k top-1 ids has length >= k, is a contiguous slice of
    ``ctx_ids`` and p_top1 > threshold. No margin, no whitespace guard (Q15, reproduced)."""
    return [bool(len(w) >= k and is_id_subseq(w, ctx_ids) and float(a) > threshold)
            for w, a in zip(top1_windows(top1_ids, k), p1)]


def copy_flags(top1_ids, p1, p2, ctx_ids: Sequence[int], top1_strs: Sequence[str],
               cfg: Optional[CopyThresholds] = None, *, sweep: bool = True) -> dict:
    """All copy columns of a pass: ``copy_collapse`` plus every label of :func:`copy_flag_columns`
    (the strict sweep only when ``sweep``; the Prism sidecar has none)."""
    cfg = cfg or CopyThresholds()
    strict = strict_copy_flags(top1_ids, p1, p2, ctx_ids, top1_strs, threshold=cfg.strict_threshold,
                               margin=cfg.strict_margin, window_k=cfg.strict_window_k)
    out = {"copy_collapse": strict, copy_strict_label(cfg.strict_threshold): strict}
    if sweep:
        for t in sorted(set(float(x) for x in cfg.strict_sweep)):
            lab = copy_strict_label(t, sweep=True)
            if lab not in out:
                out[lab] = strict_copy_flags(top1_ids, p1, p2, ctx_ids, top1_strs, threshold=t,
                                             margin=cfg.strict_margin, window_k=cfg.strict_window_k)
    for k in dict.fromkeys(int(k) for k in cfg.soft_window_ks):
        out.setdefault(copy_soft_label(k, cfg.soft_threshold),
                       soft_copy_flags(top1_ids, p1, ctx_ids, threshold=cfg.soft_threshold, k=k))
    for t, k in _soft_extra_pairs(cfg):
        out.setdefault(copy_soft_label(k, t), soft_copy_flags(top1_ids, p1, ctx_ids, threshold=t, k=k))
    return out


def copy_ignore_mask(decode: Callable[[int], str], vocab_size: int, sample: int = 16) -> dict:
    """``diagnostics.copy_mask`` (transparency only): ids 0..V-1 whose decoded string passes the guard,
    the first ``sample`` of their strings, and the count."""
    ids, strs = [], []
    for i in range(int(vocab_size)):
        s = decode(i)
        if is_pure_ws_punct(s):
            ids.append(i)
            if len(strs) < sample:
                strs.append(s)
    return {"ignored_token_ids": ids, "ignored_token_str_sample": strs, "size": len(ids)}


def prompt_vocab(ctx_ids: Sequence[int], decode: Callable[[int], str]) -> list:
    """Prompt vocabulary of the surface metrics: unique ``ctx_ids`` in first-occurrence order whose
    decoded string does not pass the whitespace/punctuation guard."""
    out, seen = [], set()
    for t in ctx_ids:
        t = int(t)
        if t in seen:
            continue
        seen.add(t)
        if not is_pure_ws_punct(decode(t)):
            out.append(t)
    return out


def topk_prompt_mass(top_ids, top_probs, vocab_ids: Iterable[int], k: int = 50) -> np.ndarray:
    """``topk_prompt_mass@50`` per row: Σ of p over the top-k ids that are in the prompt vocabulary."""
    ids = np.asarray(top_ids)[..., :k]
    probs = np.asarray(top_probs, dtype=np.float64)[..., :k]
    if ids.shape[-1] < k:
        raise ValueError(f"topk_prompt_mass needs the top {k} ids, got {ids.shape[-1]}")
    mask = np.isin(ids, np.asarray(list(vocab_ids), dtype=ids.dtype))
    return np.where(mask, probs, 0.0).sum(axis=-1)


def is_verbose_position(token_str: str, important_words: Iterable[str]) -> bool:
    """§1.10 / §2.27: the position string, lower-cased and with ``.,!?;:`` trimmed from both ends,
    contains one of the important words (case-insensitive substring)."""
    t = (token_str or "").lower().strip(".,!?;:")
    return any(w.lower() in t for w in important_words if w)


def verbose_positions(token_strs: Sequence[str], important_words: Iterable[str]) -> list:
    """Which positions of a prompt get top-20 in the records CSV: the last one, and every position
    whose token matches an important word (:func:`is_verbose_position`)."""
    words = list(important_words)
    n = len(token_strs)
    return [i == n - 1 or is_verbose_position(s, words) for i, s in enumerate(token_strs)]


# ==============================================================================================
# The pure next-token columns of one pass
# ==============================================================================================

def _at(x, pos: int, ndim: int):
    """Slice the position axis off an array given with it ([L, T] / [L, T, k])."""
    if x is None:
        return None
    a = np.asarray(x)
    if a.ndim == ndim + 1:
        a = a[:, pos]
    if a.ndim != ndim:
        raise ValueError(f"expected an array with {ndim} (or {ndim + 1}) dimensions, got shape {a.shape}")
    return a


def _tolist(a) -> list:
    return None if a is None else np.asarray(a).tolist()


def pure_next_token_metrics(
    *,
    entropy_bits,
    kl_to_final_bits,
    top_ids,
    top_probs,
    teacher_entropy_bits: float,
    vocab_size: int,
    ctx_ids: Sequence[int],
    decode: Callable[[int], str],
    gold_id: Optional[int] = None,
    gold_string: Optional[str] = None,
    gold_rank=None,
    gold_prob=None,
    answer_score=None,
    top_scores=None,
    kl_to_final_bits_norm_temp=None,
    cos_to_final=None,
    cos_to_answer=None,
    cos_to_prompt=None,
    prompt_probs=None,
    prompt_vocab_ids: Optional[Sequence[int]] = None,
    control_probs: Optional[tuple] = None,
    layers: Optional[Sequence[int]] = None,
    lens: str = "norm",
    margin_gate: Optional[bool] = None,
    strict_sweep: Optional[bool] = None,
    thresholds: Optional[Thresholds] = None,
    pure_top_k: int = 5,
    pos: int = -1,
) -> dict:
    """Every §2 metric of the pure next-token rows of one pass, as columns keyed by CSV name.

    Returns ``{name: list over layers}`` with ``layer``, ``top1_id``, ``top1``, ``entropy``,
    ``entropy_bits``, ``top_ids`` / ``top_probs`` (first ``pure_top_k``), ``rest_mass``, the copy
    columns (``copy_collapse`` and :func:`copy_flag_columns`), ``entropy_collapse``, ``is_answer``,
    ``p_top1``, ``p_top5``, ``p_answer``, ``answer_minus_uniform``, ``semantic_margin_ok`` (norm lens
    only, else None), ``teacher_entropy_bits``, ``kl_to_final_bits``, ``kl_to_final_bits_norm_temp``,
    ``answer_rank``, ``cos_to_final``, ``cos_to_answer``, ``cos_to_prompt_max``, ``geom_crossover``,
    ``echo_mass_prompt``, ``answer_mass``, ``answer_minus_echo_mass``, ``mass_ratio_ans_over_prompt``,
    ``topk_prompt_mass@50``, ``control_margin``, ``control_top2_logit_gap``, ``answer_logit_gap``,
    ``answer_vs_top1_gap``. Missing inputs give None cells. ``layers`` defaults to 0..L-1 (pass
    1..n for the tuned lens). ``margin_gate`` defaults to ``lens == "norm"``, ``strict_sweep`` to
    ``lens != "prism"``.
    """
    th = thresholds or Thresholds()
    ent = _at(entropy_bits, pos, 1)
    L = len(ent)
    layers = list(range(L)) if layers is None else [int(x) for x in layers]
    if len(layers) != L:
        raise ValueError("layers must have one entry per lens layer")
    tid = _at(top_ids, pos, 2)
    tpr = _at(top_probs, pos, 2)
    if tid.shape[1] < 2:
        raise ValueError("top_ids needs at least the top 2 ids per layer")
    kl = _at(kl_to_final_bits, pos, 1)
    margin_gate = (lens == "norm") if margin_gate is None else margin_gate
    strict_sweep = (lens != "prism") if strict_sweep is None else strict_sweep
    none = [None] * L

    top1 = [int(i) for i in tid[:, 0]]
    top1_str = [decode(i) for i in top1]
    p1 = tpr[:, 0]
    p2 = tpr[:, 1]
    cols: dict = {"layer": layers, "top1_id": top1, "top1": top1_str}
    cols["entropy"] = _tolist(ent)
    cols["entropy_bits"] = _tolist(ent)
    k_pure = min(int(pure_top_k), tid.shape[1])
    cols["top_ids"] = tid[:, :k_pure].tolist()
    cols["top_probs"] = tpr[:, :k_pure].tolist()
    cols["rest_mass"] = rest_mass(tpr[:, :k_pure]).tolist()
    cols.update(copy_flags(top1, p1, p2, ctx_ids, top1_str, th.copy, sweep=strict_sweep))
    cols["entropy_collapse"] = [bool(e <= th.semantic.entropy_collapse_bits) for e in ent.tolist()]

    rank = _at(gold_rank, pos, 1)
    prob = _at(gold_prob, pos, 1)
    if gold_id is not None and rank is not None:
        rank_l = [int(r) for r in rank.tolist()]
        cols["is_answer"] = [r == 1 for r in rank_l]
    else:
        rank_l = none
        cols["is_answer"] = [bool(gold_string is not None and s.strip() == gold_string) for s in top1_str]
    cols["p_top1"] = _tolist(p1)
    cols["p_top5"] = [float(x) for x in np.sum(tpr[:, :5], axis=1, dtype=np.float32)]
    p_uniform = 1.0 / float(vocab_size)
    prob_l = _tolist(prob) if (gold_id is not None and prob is not None) else none
    cols["p_answer"] = prob_l
    amu = [None if p is None else float(p) - p_uniform for p in prob_l]
    cols["answer_minus_uniform"] = amu
    if margin_gate:
        cols["semantic_margin_ok"] = [None if (r is None or a is None) else bool(r == 1 and a >= th.semantic.margin_delta_abs)
                                      for r, a in zip(rank_l, amu)]
    else:
        cols["semantic_margin_ok"] = none
    cols["teacher_entropy_bits"] = [None if teacher_entropy_bits is None else float(teacher_entropy_bits)] * L
    cols["kl_to_final_bits"] = _tolist(kl)
    cols["kl_to_final_bits_norm_temp"] = (_tolist(_at(kl_to_final_bits_norm_temp, pos, 1))
                                          if kl_to_final_bits_norm_temp is not None else none)
    cols["answer_rank"] = rank_l

    # cosines and geometric crossover (§2.2, §2.7)
    cols["cos_to_final"] = _tolist(_at(cos_to_final, pos, 1)) if cos_to_final is not None else none
    ca = _at(cos_to_answer, pos, 1) if cos_to_answer is not None else None
    cp = None
    if cos_to_prompt is not None:
        c = np.asarray(cos_to_prompt, dtype=np.float64)
        if c.ndim == 3:
            c = c[:, pos]
        if c.ndim == 2:
            cp = c.max(axis=1).tolist() if c.shape[1] else [None] * L
        else:
            cp = [float(v) for v in c]
    cols["cos_to_answer"] = _tolist(ca) if ca is not None else none
    cols["cos_to_prompt_max"] = cp if cp is not None else none
    gamma = th.surface.geom_gamma
    cols["geom_crossover"] = [None if (a is None or b is None) else bool(a >= b + gamma)
                              for a, b in zip(cols["cos_to_answer"], cols["cos_to_prompt_max"])]

    # surface masses (§2.6) and top-K prompt mass (§2.8)
    if prompt_vocab_ids is None:
        prompt_vocab_ids = prompt_vocab(ctx_ids, decode)
    if prompt_probs is not None:
        pp = _at(prompt_probs, pos, 2).astype(np.float64)
        echo = pp.sum(axis=1).tolist() if pp.shape[1] else [0.0] * L
        cols["echo_mass_prompt"] = echo
        cols["answer_mass"] = prob_l
        cols["answer_minus_echo_mass"] = [None if a is None else float(a) - e for a, e in zip(prob_l, echo)]
        cols["mass_ratio_ans_over_prompt"] = [None if a is None else float(a) / (e + 1e-9)
                                              for a, e in zip(prob_l, echo)]
    else:
        for name in ("echo_mass_prompt", "answer_mass", "answer_minus_echo_mass", "mass_ratio_ans_over_prompt"):
            cols[name] = none
    K = th.surface.topk_prompt_k
    if tid.shape[1] >= K and lens != "prism":
        cols["topk_prompt_mass@50"] = topk_prompt_mass(tid, tpr, prompt_vocab_ids, K).tolist()
    else:
        cols["topk_prompt_mass@50"] = none

    # margins (§2.9) and control (§2.10)
    if answer_score is None or top_scores is None:
        with np.errstate(divide="ignore"):
            a_sc = None if prob is None else np.log(np.asarray(prob, dtype=np.float64))
            t_sc = np.log(tpr.astype(np.float64))
    else:
        a_sc = _at(answer_score, pos, 1)
        t_sc = _at(top_scores, pos, 2)
    gap, vs = answer_logit_gaps(None if gold_id is None else rank_l, gold_id, tid, t_sc, a_sc)
    cols["answer_logit_gap"] = gap
    cols["answer_vs_top1_gap"] = vs
    if control_probs is not None:
        pc = _at(control_probs[0], pos, 1).astype(np.float64)
        pf = _at(control_probs[1], pos, 1).astype(np.float64)
        cols["control_margin"] = (pc - pf).tolist()
        cols["control_top2_logit_gap"] = gap
    else:
        cols["control_margin"] = none
        cols["control_top2_logit_gap"] = none
    return cols


def columns_to_rows(cols: Mapping[str, Sequence]) -> list:
    """Per-layer dicts from a column dict (one dict per layer)."""
    names = list(cols)
    n = len(cols[names[0]]) if names else 0
    return [{k: cols[k][i] for k in names} for i in range(n)]


