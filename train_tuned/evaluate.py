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
                  lenses: tuple | None = None) -> dict:
    """Evaluate ``lens`` (and the logit lens; the norm lens too for a lens on the norm lens's rows) on
    ``data_path``; returns the JSON-able result dict."""
    if lenses is None:
        lenses = ("logit", "tuned") + (("norm",) if getattr(lens, "base", None) == "norm" else ())
    tok = model.tokenizer
    card = getattr(lens, "card", {}) or {}
    plan = (card.get("recipe") or {}).get("plan") or {}
    if seq_len is None:
        seq_len = int(plan.get("seq_len") or min(2048, model.spec.max_positions))
    seq_len = min(int(seq_len), int(model.spec.max_positions))
    src = FileData(data_path, tok, seq_len, join_eos=join_eos, shuffle=False, text_field=text_field,
                   vocab_size=model.spec.vocab_size)
    n_seq = src.n_sequences
    if max_tokens:
        n_seq = min(n_seq, max(1, int(max_tokens) // seq_len))
    n = model.spec.n_layers
    which = {"logit": "logit", "tuned": lens, "norm": "norm"}
    sums = {name: {k: np.zeros(n + 1) for k in ("ce", "entropy", "kl")} for name in lenses}
    cnt_ce = cnt_all = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_seq * seq_len, unit="tok", unit_scale=True, file=sys.stderr, dynamic_ncols=True,
                   desc="eval-lens")
    t0 = time.perf_counter()
    try:
        for s in range(0, n_seq, batch_seqs):
            ids = src.batch(s, min(batch_seqs, n_seq - s))
            gold = np.full_like(ids, -1)
            gold[:, :-1] = ids[:, 1:]
            fw = model.forward(ids)
            for name in lenses:
                st = lens_stats(model, fw, lens=which[name], gold_ids=gold, top_k=0, cosine=False)
                lse = np.asarray(st.lse, np.float64)[:, :, :-1]
                g = np.asarray(st.gold_logit, np.float64)[:, :, :-1]
                sums[name]["ce"] += (lse - g).sum(axis=(1, 2))
                sums[name]["entropy"] += np.asarray(st.entropy_bits, np.float64).sum(axis=(1, 2)) * LN2
                sums[name]["kl"] += np.asarray(st.kl_final_to_layer_bits, np.float64).sum(axis=(1, 2)) * LN2
            cnt_ce += ids.shape[0] * (ids.shape[1] - 1)
            cnt_all += ids.size
            if bar is not None:
                bar.update(ids.size)
    finally:
        if bar is not None:
            bar.close()
    if cnt_all == 0:
        raise JaxlensError(f"{data_path} gave no sequences to evaluate")
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
        "seconds": time.perf_counter() - t0,
    }
    for name in lenses:
        ce = sums[name]["ce"] / cnt_ce
        ent = sums[name]["entropy"] / cnt_all
        kl = sums[name]["kl"] / cnt_all
        out[name] = {"ce_nats": ce.tolist(), "entropy_nats": ent.tolist(), "kl_nats": kl.tolist(),
                     "ce_bpb": (ce * bpb).tolist(), "entropy_bpb": (ent * bpb).tolist(), "kl_bpb": (kl * bpb).tolist()}
    ref = lenses[0]
    base_ce = out[ref]["ce_nats"][n]
    base_h = out[ref]["entropy_nats"][n]
    out["baseline"] = {"ce_nats": base_ce, "entropy_nats": base_h, "ce_bpb": base_ce * bpb, "entropy_bpb": base_h * bpb}
    return out


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
