"""The numbers behind each figure, read from the run's CSVs; shared by the PNG (:mod:`.figures`) and the
interactive SVG (:mod:`.html`) versions so that both show the same values.

Every series keeps the CSV file and line of each point (the HTML hover shows them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from jaxlens.report.load import Run, finite

__all__ = ["Heatmap", "Series", "artefact_panel", "fact_ranks", "heatmap", "markers", "token_label",
           "trajectories", "LENS_ORDER", "LENS_STYLE"]

LENS_ORDER = ("norm", "tuned", "raw", "prism")
#: colour (Okabe-Ito, colour-blind safe), line style and marker of each lens
LENS_STYLE = {"norm": ("#0072B2", "-", "o"), "tuned": ("#D55E00", "--", "s"), "raw": ("#009E73", ":", "^"),
              "prism": ("#CC79A7", "-.", "D")}
FACT_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#999999")


def token_label(s: Any, width: int = 0) -> str:
    """A token as a figure label: spaces at the ends as ``␣``, line breaks as ``↵``, tabs as ``→``;
    cut to ``width`` characters with ``…`` when ``width`` > 0."""
    if s is None:
        return ""
    t = str(s).replace("\r\n", "↵").replace("\n", "↵").replace("\r", "↵").replace("\t", "→")
    if t.strip() == "":
        t = "␣" * len(t) if t else "∅"
    else:
        lead = len(t) - len(t.lstrip(" "))
        trail = len(t) - len(t.rstrip(" "))
        t = "␣" * lead + t.strip(" ") + "␣" * trail
    if width and len(t) > width:
        t = t[: width - 1] + "…"
    return t


@dataclass
class Heatmap:
    lens: str
    file: str
    layers: list
    positions: list
    tokens: list                       # input token at each position
    top1: list                         # [layer][pos] top-1 token string
    prob: list                         # [layer][pos] its probability
    entropy: list                      # [layer][pos] entropy in bits
    lines: list                        # [layer][pos] CSV line
    is_answer: Optional[list] = None   # [layer][pos] top-1 == gold string (stripped)


def heatmap(run: Run, lens: str) -> Optional[Heatmap]:
    """Layer × position grid of the primary prompt from the records CSV of ``lens`` (None without one)."""
    if not run.lens_present(lens):
        return None
    rows = run.pass_rows(run.records(lens), run.primary_key())
    rows = [r for r in rows if isinstance(r["layer"], int) and isinstance(r["pos"], int)]
    if not rows:
        return None
    layers = sorted({r["layer"] for r in rows})
    positions = sorted({r["pos"] for r in rows})
    li = {l: i for i, l in enumerate(layers)}
    pi = {p: i for i, p in enumerate(positions)}
    shape = lambda fill: [[fill for _ in positions] for _ in layers]  # noqa: E731
    top1, prob, ent, lines = shape(""), shape(float("nan")), shape(float("nan")), shape(0)
    tokens = ["" for _ in positions]
    gold = str(run.json.value("/gold_answer/string") or "").strip()
    ans = shape(False)
    for r in rows:
        i, j = li[r["layer"]], pi[r["pos"]]
        top1[i][j] = r["top1"] if r["top1"] is not None else ""
        prob[i][j] = r["prob1"] if finite(r["prob1"]) else float("nan")
        ent[i][j] = r["entropy_bits"] if finite(r["entropy_bits"]) else float("nan")
        lines[i][j] = r.line
        tokens[j] = r["token"] if r["token"] is not None else ""
        ans[i][j] = bool(gold) and str(top1[i][j]).strip() == gold
    return Heatmap(lens, rows[0].file, layers, positions, tokens, top1, prob, ent, lines, ans)


@dataclass
class Series:
    label: str
    lens: str
    file: str
    layers: list
    values: list
    lines: list
    column: str
    extra: dict = field(default_factory=dict)


def _series(run: Run, table, key, column: str, lens: str, label: str) -> Optional[Series]:
    rows = run.pass_rows(table, key)
    pts = [(r["layer"], r[column], r.line) for r in rows if isinstance(r["layer"], int) and finite(r[column])]
    if not pts:
        return None
    return Series(label, lens, rows[0].file, [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], column)


#: trajectory panels: (metric id, axis label, {lens: column})
TRAJECTORY_PANELS = (
    ("answer_rank", "answer rank (log scale)", {"norm": "answer_rank", "tuned": "answer_rank",
                                                "raw": "answer_rank_raw", "prism": "answer_rank"}),
    ("kl_to_final_bits", "KL(layer ‖ final) [bits]", {"norm": "kl_to_final_bits", "tuned": "kl_to_final_bits",
                                                      "prism": "kl_to_final_bits"}),
    ("entropy_bits", "entropy [bits]", {"norm": "entropy_bits", "tuned": "entropy_bits", "raw": "entropy_bits_raw",
                                        "prism": "entropy_bits"}),
    ("cos_to_final", "cosine to final logits", {"norm": "cos_to_final", "tuned": "cos_to_final",
                                                "prism": "cos_to_final"}),
)


def _lens_table(run: Run, lens: str):
    if lens == "raw":
        return run.table("-pure-next-token-rawlens.csv")
    return run.pure(lens)


def trajectories(run: Run) -> list:
    """[(metric, axis label, [Series per lens present])] of the primary pass."""
    key = run.primary_key()
    out = []
    for metric, label, cols in TRAJECTORY_PANELS:
        series = []
        for lens in LENS_ORDER:
            if lens not in cols or not run.lens_present(lens):
                continue
            s = _series(run, _lens_table(run, lens), key, cols[lens], lens, f"{lens} lens")
            if s is not None:
                series.append(s)
        out.append((metric, label, series))
    return out


def markers(run: Run) -> list:
    """Milestone layers drawn on the trajectories: [(label, V)] for those that are not null."""
    out = []
    for label, ptr in (("L_copy", "/diagnostics/L_copy"), ("L_semantic", "/diagnostics/L_semantic"),
                       ("L_semantic_confirmed", "/diagnostics/confirmed_semantics/L_semantic_confirmed")):
        v = run.j(ptr)
        if v.ok and isinstance(v.value, int):
            out.append((label, v))
    return out


def fact_ranks(run: Run, lens: str) -> list:
    """Answer rank per layer of every fact's ``pos/orig`` pass and of the control (its own gold)."""
    table = run.pure(lens) if run.lens_present(lens) else None
    if table is None:
        return []
    out = []
    for key in table.passes():
        fk, fi, pid, var = key
        if var != "orig" or pid not in ("pos", "ctl"):
            continue
        label = f"{fk}" if pid == "pos" else "control (France→Paris)" if fk is None else f"control {fk}"
        if pid == "ctl":
            gold = run.json.value("/control_prompt/gold_answer/string")
            if gold:
                label = f"control → {gold}"
        s = _series(run, table, key, "answer_rank", lens, label)
        if s is not None:
            s.extra["control"] = pid == "ctl"
            out.append(s)
    return out


ARTEFACT_COLUMNS = (("kl_norm_vs_raw_bits", "KL(norm ‖ raw)"), ("kl_raw_to_norm_bits", "KL(raw ‖ norm)"),
                    ("js_divergence", "JS divergence"), ("l1_prob_diff", "L1 distance"),
                    ("topk_jaccard_raw_norm@50", "top-50 Jaccard"))


def artefact_panel(run: Run) -> Optional[dict]:
    """Raw-vs-norm series of the primary pass (full sweep CSV), the norm-only semantic layers and ranks."""
    table = run.table("-pure-next-token-rawlens.csv")
    if table is None:
        return None
    key = run.primary_key()
    series = {}
    for col, label in ARTEFACT_COLUMNS + (("answer_rank_norm", "norm lens"), ("answer_rank_raw", "raw lens")):
        s = _series(run, table, key, col, "raw", label)
        if s is not None:
            series[col] = s
    if not series:
        return None
    rows = run.pass_rows(table, key)
    norm_only = [r["layer"] for r in rows if r["norm_only_semantics"] is True]
    return {"series": series, "norm_only": norm_only, "file": table.file,
            "tier": run.j("/diagnostics/raw_lens_full/score/tier"),
            "score": run.j("/diagnostics/raw_lens_full/score/lens_artifact_score_v2")}
