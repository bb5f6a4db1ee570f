"""Paper figures as PNG (matplotlib, the optional ``jaxlens[plot]`` extra).

No pyplot and no global state: each figure is a :class:`matplotlib.figure.Figure` drawn on an Agg
canvas under matplotlib's default rc settings (a user's matplotlibrc or style changes nothing), saved
at a fixed size and dpi without the ``Software`` tag, so the bytes depend only on the run (and on the
matplotlib / FreeType versions). Every text is at least 8 pt at the saved size.
"""
from __future__ import annotations

import io
import math
import warnings
from typing import Optional

from jaxlens.errors import JaxlensError
from jaxlens.report import figdata as F
from jaxlens.report.load import Run, finite

__all__ = ["DPI", "MIN_FONT_PT", "figure_specs", "require_matplotlib", "render_png"]

DPI = 200
MIN_FONT_PT = 8.0
BASE_PT = 9.0


def require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise JaxlensError("PNG figures need matplotlib: pip install 'jaxlens[plot]' "
                           "(or choose --format html,md, which do not)") from None
    return matplotlib


def _rc() -> dict:
    import matplotlib

    rc = dict(matplotlib.rcParamsDefault)
    rc.update({
        "font.family": "DejaVu Sans", "font.size": BASE_PT, "axes.titlesize": BASE_PT + 1,
        "axes.labelsize": BASE_PT, "xtick.labelsize": MIN_FONT_PT, "ytick.labelsize": MIN_FONT_PT,
        "legend.fontsize": MIN_FONT_PT, "figure.titlesize": BASE_PT + 2, "axes.spines.top": False,
        "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.25, "grid.linewidth": 0.6,
        "lines.linewidth": 1.6, "lines.markersize": 4, "savefig.dpi": DPI, "figure.dpi": DPI,
        "svg.hashsalt": "jaxlens", "path.simplify": False, "axes.formatter.use_mathtext": True,
        "figure.constrained_layout.use": True,
    })
    rc.pop("backend", None)
    return rc


def _new_figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def render_png(fig) -> bytes:
    """PNG bytes of ``fig`` at its own size and :data:`DPI`, without the Software / date tags."""
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context(_rc()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


_FONT_CHARS: dict = {}


def _renderable(s: str) -> str:
    """``s`` with the characters DejaVu Sans has no glyph for replaced by ``□`` (no missing-glyph
    warnings, the same picture on every machine)."""
    from matplotlib import font_manager, ft2font

    if "font" not in _FONT_CHARS:
        path = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"), fallback_to_default=True)
        _FONT_CHARS["font"] = ft2font.FT2Font(path)
    font = _FONT_CHARS["font"]
    out = []
    for ch in s:
        ok = _FONT_CHARS.get(ch)
        if ok is None:
            ok = _FONT_CHARS[ch] = ch.isspace() or font.get_char_index(ord(ch)) != 0
        out.append(ch if ok else "□")
    return "".join(out)


def _label(s, width: int = 0) -> str:
    return _renderable(F.token_label(s, width))


def _mark_layers(ax, marks, legend: bool):
    # the confirmed layer is a wide pale band under the data, so that an L_semantic line on the same
    # layer stays visible on top of it
    styles = {"L_copy": ("#555555", (0, (1, 1.5)), 1.3, 1.0, 3), "L_semantic": ("#000000", (0, (4, 2)), 1.1, 1.0, 3),
              "L_semantic_confirmed": ("#C00000", "-", 6.0, 0.22, 0)}
    for label, v in marks:
        c, ls, lw, alpha, z = styles[label]
        ax.axvline(v.value, color=c, ls=ls, lw=lw, alpha=alpha, zorder=z,
                   label=f"{label} = {v.value}" if legend else None)


# --------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------

def heatmap_figure(run: Run, hm: F.Heatmap, value: str = "prob"):
    """(a) layer × position grid of the top-1 token, coloured by its probability (or entropy)."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    n_l, n_p = len(hm.layers), len(hm.positions)
    cell_w, cell_h = 0.66, 0.27
    w = min(max(6.0, 1.9 + cell_w * n_p), 30.0)
    h = min(max(3.2, 1.75 + cell_h * n_l), 40.0)
    fig = _new_figure(w, h)
    ax = fig.add_subplot(1, 1, 1)
    if value == "entropy":
        data = np.array(hm.entropy, dtype=float)
        vmax = max(1.0, float(np.nanmax(data)) if np.isfinite(data).any() else 1.0)
        norm, cmap, clabel = Normalize(0.0, vmax), colormaps["magma_r"], "entropy of the layer's distribution [bits]"
    else:
        data = np.array(hm.prob, dtype=float)
        norm, cmap, clabel = Normalize(0.0, 1.0), colormaps["viridis"], "probability of the top-1 token"
    mesh = ax.pcolormesh(np.arange(n_p + 1) - 0.5, np.arange(n_l + 1) - 0.5, np.ma.masked_invalid(data),
                         cmap=cmap, norm=norm, edgecolors="white", linewidth=0.4)
    chars = max(4, int(cell_w * 72 / (MIN_FONT_PT * 0.62)))
    for i in range(n_l):
        for j in range(n_p):
            v = data[i, j]
            rgba = cmap(norm(v)) if math.isfinite(v) else (1, 1, 1, 1)
            lum = 0.2126 * rgba[0] + 0.7152 * rgba[1] + 0.0722 * rgba[2]
            ax.text(j, i, _label(hm.top1[i][j], chars), ha="center", va="center", fontsize=MIN_FONT_PT,
                    color="black" if lum > 0.5 else "white",
                    fontweight="bold" if hm.is_answer and hm.is_answer[i][j] else "normal")
    ax.set_xticks(range(n_p))
    ax.set_xticklabels([f"{_label(t, 12)}" for t in hm.tokens], rotation=55, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n_l))
    ax.set_yticklabels([str(l) for l in hm.layers])
    ax.set_xlim(-0.5, n_p - 0.5)
    ax.set_ylim(-0.5, n_l - 0.5)
    ax.grid(False)
    for s in ("top", "right", "left", "bottom"):
        ax.spines[s].set_visible(False)
    ax.set_xlabel("input token (position in the prompt)")
    ax.set_ylabel("layer (0 = embeddings)")
    gold = run.json.value("/gold_answer/string")
    ax.set_title(f"Top-1 token at every layer and position, {hm.lens} lens ({run.model}; bold = gold \"{gold}\")")
    cb = fig.colorbar(mesh, ax=ax, fraction=0.035, pad=0.015, aspect=30)
    cb.set_label(clabel)
    cb.ax.tick_params(labelsize=MIN_FONT_PT)
    return fig


def trajectories_figure(run: Run):
    """(b) answer rank, KL to final, entropy and cosine to final per layer, one line per lens."""
    panels = F.trajectories(run)
    marks = F.markers(run)
    fig = _new_figure(7.4, 5.6)
    axes = fig.subplots(2, 2, sharex=True)
    n = run.n_layers
    handles = {}
    for k, (ax, (metric, label, series)) in enumerate(zip(axes.flat, panels)):
        for s in series:
            c, ls, mk = F.LENS_STYLE[s.lens]
            (line,) = ax.plot(s.layers, s.values, color=c, ls=ls, marker=mk, markersize=3.2, label=s.label)
            handles.setdefault(s.label, line)
        _mark_layers(ax, marks, legend=True)
        if metric == "answer_rank":
            ax.set_yscale("log")
            ax.set_ylim(bottom=0.8)
        if metric == "cos_to_final":
            lo = min([0.0] + [v for s in series for v in s.values])
            ax.set_ylim(min(-0.05, lo - 0.05), 1.05)
        if not series:
            ax.text(0.5, 0.5, "no data in the run", transform=ax.transAxes, ha="center", va="center")
        ax.set_ylabel(label)
        ax.set_xlim(-0.3, n + 0.3)
        if k >= 2:
            ax.set_xlabel("layer")
    for ax_h in axes.flat[0].get_legend_handles_labels()[0]:
        lab = ax_h.get_label()
        if lab.startswith("L_"):
            handles.setdefault(lab, ax_h)
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center", ncol=min(3, len(handles)),
               frameon=False)
    fig.suptitle(f"Next-token trajectories of the primary prompt ({run.model}, {n} layers)")
    return fig


def fact_ranks_figure(run: Run):
    """(c) answer rank per layer of the five facts and the control, one panel per lens."""
    lenses = [l for l in ("norm", "tuned", "prism") if F.fact_ranks(run, l)]
    fig = _new_figure(7.4 if len(lenses) > 1 else 5.2, 3.4)
    axes = fig.subplots(1, len(lenses), sharey=True, squeeze=False)[0]
    handles: dict = {}
    for ax, lens in zip(axes, lenses):
        for i, s in enumerate(F.fact_ranks(run, lens)):
            if s.extra.get("control"):
                kw = dict(color="black", ls="--", marker="x", markersize=4)
            else:
                kw = dict(color=F.FACT_COLOURS[i % len(F.FACT_COLOURS)], ls="-", marker="o", markersize=3)
            (line,) = ax.plot(s.layers, s.values, label=_renderable(s.label), lw=1.4, **kw)
            handles.setdefault(line.get_label(), line)
        ax.set_yscale("log")
        ax.set_xlim(-0.3, run.n_layers + 0.3)
        ax.set_xlabel("layer")
        ax.set_title(f"{lens} lens")
    top = max([10.0] + [v for lens in lenses for s in F.fact_ranks(run, lens) for v in s.values])
    axes[0].set_ylim(0.8, top * 1.6)                  # shared y: one range over every panel
    axes[0].set_ylabel("rank of the gold answer (log scale)")
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside right center", frameon=False)
    fig.suptitle(f"Five facts and the control prompt ({run.model})")
    return fig


def artefact_figure(run: Run, panel: dict):
    """(d) raw-vs-norm: KL both ways, JS / total variation / top-50 Jaccard, answer ranks."""
    S = panel["series"]
    fig = _new_figure(9.0, 3.3)
    ax1, ax2, ax3 = fig.subplots(1, 3, sharex=True)
    for col, c, ls in (("kl_norm_vs_raw_bits", "#0072B2", "-"), ("kl_raw_to_norm_bits", "#009E73", "--")):
        if col in S:
            ax1.plot(S[col].layers, S[col].values, color=c, ls=ls, marker="o", markersize=3,
                     label=dict(F.ARTEFACT_COLUMNS)[col])
    for y, ls in ((0.5, ":"), (1.0, "-.")):
        ax1.axhline(y, color="#777777", ls=ls, lw=0.9, label=f"{y} bit")
    ax1.set_yscale("symlog", linthresh=0.1)
    ax1.set_ylim(bottom=0)
    ax1.set_ylabel("KL divergence [bits] (symlog)")
    ax1.legend(frameon=False, loc="best")
    if "js_divergence" in S:
        ax2.plot(S["js_divergence"].layers, S["js_divergence"].values, color="#CC79A7", marker="o", markersize=3,
                 label="JS divergence [bits]")
    if "l1_prob_diff" in S:
        ax2.plot(S["l1_prob_diff"].layers, [v / 2 for v in S["l1_prob_diff"].values], color="#E69F00", ls="--",
                 marker="s", markersize=3, label="total variation (L1 / 2)")
    if "topk_jaccard_raw_norm@50" in S:
        s = S["topk_jaccard_raw_norm@50"]
        ax2.plot(s.layers, s.values, color="#56B4E9", ls=":", marker="^", markersize=3, label="top-50 Jaccard")
    ax2.set_ylim(-0.03, 1.03)
    ax2.set_ylabel("distance / overlap")
    ax2.legend(frameon=False, loc="best")
    for col, c, ls, mk in (("answer_rank_norm", F.LENS_STYLE["norm"][0], "-", "o"),
                           ("answer_rank_raw", F.LENS_STYLE["raw"][0], ":", "^")):
        if col in S:
            ax3.plot(S[col].layers, S[col].values, color=c, ls=ls, marker=mk, markersize=3, label=S[col].label)
    for l in panel["norm_only"]:
        ax3.axvspan(l - 0.5, l + 0.5, color="#C00000", alpha=0.12, lw=0)
    ax3.set_yscale("log")
    ax3.set_ylim(bottom=0.8)
    ax3.set_ylabel("rank of the gold answer (log scale)")
    ax3.legend(frameon=False, loc="best", title="norm-only semantics shaded" if panel["norm_only"] else None,
               title_fontsize=MIN_FONT_PT)
    for ax, title in ((ax1, "KL between the two lenses"), (ax2, "distribution distance and top-50 overlap"),
                      (ax3, "gold-answer rank")):
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.set_xlim(-0.3, run.n_layers + 0.3)
    tier, score = panel["tier"], panel["score"]
    extra = ""
    if tier.ok:
        extra = f": artefact tier {tier.value}"
        if finite(score.value):
            extra += f", score v2 = {score.value:.3g}"
    fig.suptitle(f"Raw vs norm lens, primary prompt ({run.model}){extra}")
    return fig


def figure_specs(run: Run, heatmap_value: str = "prob") -> list:
    """[(file name, caption, builder)] of the run's figures, in report order; a builder returns a Figure.
    Figures whose data is absent are left out (the report says so)."""
    specs = []
    for lens in F.LENS_ORDER:
        hm = F.heatmap(run, lens)
        if hm is not None:
            what = "entropy" if heatmap_value == "entropy" else "probability"
            specs.append((f"fig-heatmap-{lens}.png",
                          f"Top-1 token per layer and position of the primary prompt, {lens} lens, coloured by {what}.",
                          (lambda hm=hm: heatmap_figure(run, hm, heatmap_value))))
    specs.append(("fig-trajectories.png", "Answer rank, KL to final, entropy and cosine to final per layer, one line "
                  "per lens, with L_copy / L_semantic / the confirmed layer marked.", lambda: trajectories_figure(run)))
    if F.fact_ranks(run, "norm"):
        specs.append(("fig-fact-ranks.png", "Rank of the gold answer per layer for the five facts and the control.",
                      lambda: fact_ranks_figure(run)))
    panel = F.artefact_panel(run)
    if panel is not None:
        specs.append(("fig-raw-vs-norm.png", "Raw-vs-norm artefact panel (full raw-lens sweep of the primary prompt).",
                      lambda: artefact_figure(run, panel)))
    return specs


def draw(builder):
    """Run a figure builder under the fixed rc settings."""
    import matplotlib

    with matplotlib.rc_context(_rc()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return builder()


def pngs(run: Run, heatmap_value: str = "prob") -> list:
    """[(file name, caption, PNG bytes)]."""
    require_matplotlib()
    out = []
    for name, caption, builder in figure_specs(run, heatmap_value):
        fig = draw(builder)
        out.append((name, caption, render_png(fig)))
    return out


def min_font_size(fig) -> Optional[float]:
    """The smallest font size (pt) of the visible, non-empty texts of ``fig``."""
    from matplotlib.text import Text

    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    return min(sizes) if sizes else None
