"""The cross-model page of several probe runs: milestones side by side, collapse depth as a fraction of
depth per model and lens, the micro-suite medians.

Citations name the file inside each run's directory prefixed with the run's label
(``<label>/output-<name>.json``); the page's "Runs" table maps labels to directories.
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Sequence

from jaxlens.report.document import Code, Doc, Figure, Heading, Para, Row, Table, Text, Val, render_markdown
from jaxlens.report.load import Run, V, finite

__all__ = ["build_cross_document", "build_cross_files", "run_labels"]

CROSS_MILESTONES = (
    ("L_copy (strict)", "/diagnostics/L_copy"), ("L_semantic (norm)", "/diagnostics/L_semantic"),
    ("L_semantic_confirmed", "/diagnostics/confirmed_semantics/L_semantic_confirmed"),
    ("confirmed by", "/diagnostics/confirmed_semantics/confirmed_source"),
    ("first rank ≤ 10", "/diagnostics/first_rank_le_10"), ("first rank ≤ 5", "/diagnostics/first_rank_le_5"),
    ("first rank ≤ 1", "/diagnostics/first_rank_le_1"), ("first KL ≤ 1.0 bit", "/diagnostics/first_kl_below_1.0"),
    ("first KL ≤ 0.5 bit", "/diagnostics/first_kl_below_0.5"), ("cos to final ≥ 0.2", "/diagnostics/cos_milestones/norm/ge_0.2"),
    ("L_semantic (tuned)", "/tuned_lens/summaries/0/L_semantic"),
    ("first KL ≤ 1.0 bit (tuned)", "/tuned_lens/summaries/0/first_kl_below_1.0"),
    ("last-layer KL [bits]", "/diagnostics/last_layer_consistency/kl_to_final_bits"),
    ("raw-vs-norm tier", "/diagnostics/raw_lens_full/score/tier"),
    ("preferred lens", "/measurement_guidance/preferred_lens_for_reporting"),
    ("micro-suite median L_semantic", "/micro_suite/aggregates/L_semantic_norm_median"),
    ("micro-suite median delta_hat", "/micro_suite/aggregates/delta_hat_median"),
)


def run_labels(runs: Sequence[Run]) -> list:
    """A directory-safe, unique label per run: its directory name (``-2``, ``-3`` … on clashes)."""
    out: list = []
    for r in runs:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", r.dir.resolve().name or r.name) or "run"
        label, k = base, 2
        while label in out:
            label, k = f"{base}-{k}", k + 1
        out.append(label)
    return out


def _pref(v: V, label: str) -> V:
    if v.cite is None:
        return v
    return V(v.value, replace(v.cite, file=f"{label}/{v.cite.file}"))


def _val(run: Run, label: str, ptr: str) -> Val:
    return Val(_pref(run.j(ptr), label))


def depth_fractions(run: Run, label: str) -> list:
    """[(series label, fraction or None, tip)] for the depth bar chart: the JSON's norm fractions, and
    the tuned L_semantic / n (computed from the two cited values)."""
    n = run.n_layers
    out = []
    for name, ptr in (("L_semantic / n (norm)", "/diagnostics/depth_fractions/L_semantic_frac"),
                      ("first rank ≤ 5 / n (norm)", "/diagnostics/depth_fractions/first_rank_le_5_frac")):
        v = _pref(run.j(ptr), label)
        out.append((name, v.value if finite(v.value) else None,
                    f"{label}: {name} = {v.value}  {v.cite.text() if v.cite else '(absent)'}"))
    t = _pref(run.j("/tuned_lens/summaries/0/L_semantic"), label)
    frac = t.value / n if (run.tuned_loaded and finite(t.value) and n) else None
    out.append(("L_semantic / n (tuned)", frac,
                f"{label}: tuned L_semantic = {t.value} of {n} layers  {t.cite.text() if t.cite else '(absent)'}"))
    return out


def build_cross_document(runs: Sequence[Run], labels: Sequence[str]) -> Doc:
    doc = Doc("Cross-model report: " + ", ".join(r.model for r in runs))
    doc.add(Para([Text("Several probe runs side by side, written by jaxlens report from their files. Each run's own "
                       "report is in the sub-directory named by its label; citations are [label/file:line key].")]))
    doc.add(Heading(1, "Runs", "runs"))
    rows = []
    for r, lab in zip(runs, labels):
        rows.append(Row([Code(lab), _val(r, lab, "/diagnostics/model"), _val(r, lab, "/model_stats/num_layers"),
                         _val(r, lab, "/model_stats/d_model"), _val(r, lab, "/provenance/env/dtype_compute"),
                         _val(r, lab, "/diagnostics/tuned_lens/status")]))
    doc.add(Table(["run", "model", "layers", "d_model", "dtype", "tuned lens"], rows))
    doc.add(Heading(1, "Milestones side by side", "milestones"))
    rows = []
    for label, ptr in CROSS_MILESTONES:
        rows.append(Row([Text(label)] + [_val(r, lab, ptr) for r, lab in zip(runs, labels)]))
    doc.add(Table(["milestone (primary prompt)"] + list(labels), rows,
                  caption=[Text("Columns are runs; absent = the run has no such value (e.g. no tuned lens).")]))
    doc.add(Heading(1, "Collapse depth as a fraction of depth", "depth"))
    rows = []
    for r, lab in zip(runs, labels):
        t = _pref(r.j("/tuned_lens/summaries/0/L_semantic"), lab)
        rows.append(Row([Code(lab), _val(r, lab, "/diagnostics/depth_fractions/L_semantic_frac"),
                         _val(r, lab, "/diagnostics/depth_fractions/first_rank_le_5_frac"),
                         Val(t) if r.tuned_loaded else Val(V(None, None)),
                         _val(r, lab, "/model_stats/num_layers")]))
    doc.add(Table(["run", "L_semantic_frac (norm)", "first_rank_le_5_frac (norm)", "L_semantic (tuned)", "layers n"],
                  rows, caption=[Text("The norm fractions are the runs' own depth_fractions; the figure divides the "
                                      "tuned L_semantic by n.")]))
    doc.add(Figure("cross-depth.png", "Collapse depth as a fraction of the model's depth, per run and lens.",
                   svg_key="cross-depth"))
    doc.add(Heading(1, "Sweeps", "sweeps"))
    doc.add(Para([Text("The distribution of L_semantic / n over prompts needs a sweep's per-prompt tables; these "
                       "inputs are probe runs (one primary prompt and five facts each), so the micro-suite medians "
                       "above stand in for it.")]))
    return doc


def _depth_png(runs: Sequence[Run], labels: Sequence[str]) -> bytes:
    from jaxlens.report import figures as G

    def build():
        fig = G._new_figure(max(5.0, 1.6 + 1.1 * len(runs)), 3.4)
        ax = fig.add_subplot(1, 1, 1)
        data = [depth_fractions(r, lab) for r, lab in zip(runs, labels)]
        names = [d[0] for d in data[0]]
        colours = ("#0072B2", "#56B4E9", "#D55E00")
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(runs))]
            ys = [d[k][1] if d[k][1] is not None else 0.0 for d in data]
            ax.bar(xs, ys, width=width * 0.92, color=colours[k % 3], label=name)
            for x, d in zip(xs, data):
                if d[k][1] is None:
                    ax.text(x, 0.02, "n/a", ha="center", va="bottom", fontsize=G.MIN_FONT_PT, rotation=90)
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels([f"{r.model}\n({lab})" for r, lab in zip(runs, labels)])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("layer / number of layers")
        ax.legend(frameon=False, loc="upper left", ncol=3)
        ax.set_title("Collapse depth as a fraction of depth")
        return fig

    return G.render_png(G.draw(build))


def _depth_svg(runs: Sequence[Run], labels: Sequence[str]) -> str:
    from jaxlens.report.svg import bars_svg

    data = [depth_fractions(r, lab) for r, lab in zip(runs, labels)]
    names = [d[0] for d in data[0]]
    colours = ("#0072B2", "#56B4E9", "#D55E00")
    series = [(name, colours[k % 3], [(d[k][1] if d[k][1] is not None else float("nan"), d[k][2]) for d in data])
              for k, name in enumerate(names)]
    return bars_svg("Collapse depth as a fraction of depth", [f"{r.model} ({lab})" for r, lab in zip(runs, labels)],
                    series, "layer / number of layers", "cross-depth", ymax=1.0)


def build_cross_files(runs: Sequence[Run], labels: Sequence[str], formats: Sequence[str]) -> dict:
    doc = build_cross_document(runs, labels)
    png = "png" in formats
    files: dict = {}
    if png:
        files["cross-depth.png"] = _depth_png(runs, labels)
    if "md" in formats:
        files["index.md"] = render_markdown(doc, png=png).encode("utf-8")
    if "html" in formats:
        from jaxlens.report.html import render_html

        files["index.html"] = render_html(doc, {"cross-depth": _depth_svg(runs, labels)}, png=png).encode("utf-8")
    return files
