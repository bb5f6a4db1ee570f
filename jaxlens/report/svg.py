"""Interactive SVG versions of the figures for report.html: plain SVG elements written here (no
matplotlib, no JavaScript library), every data point or cell carrying a ``data-tip`` with its values
and its CSV line, shown by the page's few lines of inline JavaScript. Coordinates are rounded to
0.01 px so the bytes are stable.
"""
from __future__ import annotations

import math
from html import escape
from typing import Optional, Sequence

from jaxlens.report import figdata as F
from jaxlens.report.load import Run, finite

__all__ = ["figure_svgs", "VIRIDIS", "colour"]

# 17 evenly spaced stops (0, 1/16, ..., 1) of matplotlib's viridis and magma_r, linear in between, so the
# HTML colours match the PNGs' colormaps to within the interpolation
VIRIDIS = ("#440154", "#48186a", "#472d7b", "#424086", "#3b528b", "#33638d", "#2c728e", "#26828e", "#21918c",
           "#1fa088", "#28ae80", "#3fbc73", "#5ec962", "#84d44b", "#addc30", "#d8e219", "#fde725")
MAGMA_R = ("#fcfdbf", "#fde0a1", "#fec287", "#fea571", "#fb8761", "#f4695c", "#e55064", "#cf4070", "#b5367a",
           "#9b2e7f", "#812581", "#681c81", "#4f127b", "#341069", "#1c1044", "#090720", "#000004")


def _rgb(h: str) -> tuple:
    return int(h[1:3], 16), int(h[3:5], 16), int(h[5:7], 16)


def colour(x: float, stops: Sequence[str] = VIRIDIS) -> str:
    """``x`` in [0, 1] → hex colour interpolated between the stops (NaN → light grey)."""
    if not finite(x):
        return "#eeeeee"
    x = min(1.0, max(0.0, float(x)))
    pos = x * (len(stops) - 1)
    i = min(int(pos), len(stops) - 2)
    f = pos - i
    a, b = _rgb(stops[i]), _rgb(stops[i + 1])
    return "#%02x%02x%02x" % tuple(round(a[k] + (b[k] - a[k]) * f) for k in range(3))


def _lum(h: str) -> float:
    r, g, b = _rgb(h)
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


def _n(x: float) -> str:
    s = f"{x:.2f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def _num(x) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.4g}"
    return str(x)


def _a(s: str) -> str:
    return escape(str(s), quote=True)


# --------------------------------------------------------------------------------------------------
# scales and axes
# --------------------------------------------------------------------------------------------------

def _nice_ticks(lo: float, hi: float, n: int = 5) -> list:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    out, t = [], start
    while t <= hi + 1e-9 * step:
        out.append(round(t, 10))
        t += step
    return out


class Scale:
    def __init__(self, kind: str, lo: float, hi: float, a: float, b: float, linthresh: float = 0.1):
        self.kind, self.lt = kind, linthresh
        self.lo, self.hi = lo, hi
        self.t0, self.t1 = self._t(lo), self._t(hi)
        if self.t1 == self.t0:
            self.t1 = self.t0 + 1
        self.a, self.b = a, b

    def _t(self, v: float) -> float:
        if self.kind == "log":
            return math.log10(max(v, 1e-300))
        if self.kind == "symlog":
            s = 1 if v >= 0 else -1
            v = abs(v)
            return s * (v / self.lt if v <= self.lt else 1 + math.log10(v / self.lt))
        return v

    def __call__(self, v: float) -> float:
        return self.a + (self._t(v) - self.t0) / (self.t1 - self.t0) * (self.b - self.a)

    def ticks(self) -> list:
        if self.kind == "log":
            k0, k1 = math.floor(math.log10(max(self.lo, 1e-300))), math.ceil(math.log10(max(self.hi, 1e-300)))
            return [10.0 ** k for k in range(k0, k1 + 1) if self.lo * 0.999 <= 10.0 ** k <= self.hi * 1.001]
        if self.kind == "symlog":
            out, v = [0.0], self.lt
            while v <= self.hi * 1.001:
                out.append(v)
                v *= 10
            return [t for t in out if t >= self.lo - 1e-12]
        return _nice_ticks(self.lo, self.hi)


def _tick_label(v: float, kind: str) -> str:
    if kind in ("log", "symlog") and v > 0:
        k = math.log10(v)
        if abs(k - round(k)) < 1e-9:
            k = int(round(k))
            sup = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
            return {0: "1", 1: "10", 2: "100", 3: "1000", -1: "0.1", -2: "0.01", -3: "0.001"}.get(
                k, "10" + str(k).translate(sup))
    if float(v).is_integer():
        return str(int(v))
    return f"{v:g}"


class Panel:
    """One chart panel in a larger SVG: x = layer (linear), y linear / log / symlog."""

    W, H = 520, 300
    ML, MR, MT, MB = 56, 14, 26, 38

    def __init__(self, ox: float, oy: float, title: str, ylabel: str, xlabel: str, xlo: float, xhi: float,
                 ylo: float, yhi: float, ykind: str = "linear", w: float = 0, h: float = 0):
        self.W, self.H = w or Panel.W, h or Panel.H
        self.ox, self.oy, self.title, self.ylabel, self.xlabel = ox, oy, title, ylabel, xlabel
        self.x = Scale("linear", xlo, xhi, ox + self.ML, ox + self.W - self.MR)
        self.y = Scale(ykind, ylo, yhi, oy + self.H - self.MB, oy + self.MT)
        self.parts: list = []

    def frame(self) -> list:
        x0, x1 = self.x.a, self.x.b
        y0, y1 = self.y.a, self.y.b
        out = [f'<text class="pt" x="{_n((x0 + x1) / 2)}" y="{_n(self.oy + 14)}">{_a(self.title)}</text>']
        for t in self.y.ticks():
            yy = self.y(t)
            out.append(f'<line class="grid" x1="{_n(x0)}" x2="{_n(x1)}" y1="{_n(yy)}" y2="{_n(yy)}"/>')
            out.append(f'<text class="tk" x="{_n(x0 - 4)}" y="{_n(yy + 3)}" text-anchor="end">'
                       f'{_a(_tick_label(t, self.y.kind))}</text>')
        xt = _nice_ticks(self.x.lo, self.x.hi, 8)
        xt = [t for t in xt if float(t).is_integer()] or xt
        for t in xt:
            xx = self.x(t)
            out.append(f'<line class="grid" x1="{_n(xx)}" x2="{_n(xx)}" y1="{_n(y0)}" y2="{_n(y1)}"/>')
            out.append(f'<text class="tk" x="{_n(xx)}" y="{_n(y0 + 13)}" text-anchor="middle">{_a(_tick_label(t, "linear"))}</text>')
        out.append(f'<path class="ax" d="M{_n(x0)},{_n(y1)}V{_n(y0)}H{_n(x1)}"/>')
        out.append(f'<text class="al" x="{_n((x0 + x1) / 2)}" y="{_n(y0 + 28)}" text-anchor="middle">{_a(self.xlabel)}</text>')
        cy = (y0 + y1) / 2
        out.append(f'<text class="al" transform="translate({_n(self.ox + 12)},{_n(cy)}) rotate(-90)" '
                   f'text-anchor="middle">{_a(self.ylabel)}</text>')
        return out

    def vline(self, x: float, cls: str, tip: str) -> None:
        xx = self.x(x)
        self.parts.append(f'<line class="{cls}" x1="{_n(xx)}" x2="{_n(xx)}" y1="{_n(self.y.a)}" y2="{_n(self.y.b)}" '
                          f'data-tip="{_a(tip)}"/>')

    def hline(self, y: float, cls: str, tip: str) -> None:
        yy = self.y(y)
        self.parts.append(f'<line class="{cls}" x1="{_n(self.x.a)}" x2="{_n(self.x.b)}" y1="{_n(yy)}" y2="{_n(yy)}" '
                          f'data-tip="{_a(tip)}"/>')

    def line(self, xs: Sequence[float], ys: Sequence[float], tips: Sequence[str], colour_: str, dash: str,
             marker: str, group: str) -> None:
        pts = [(self.x(x), self.y(y)) for x, y in zip(xs, ys)]
        if not pts:
            return
        d = "M" + "L".join(f"{_n(a)},{_n(b)}" for a, b in pts)
        da = {"-": "", "--": ' stroke-dasharray="6 3"', ":": ' stroke-dasharray="2 2"',
              "-.": ' stroke-dasharray="6 2 2 2"'}.get(dash, "")
        g = [f'<g class="series" data-series="{_a(group)}">',
             f'<path d="{d}" fill="none" stroke="{colour_}" stroke-width="1.6"{da}/>']
        for (a, b), tip in zip(pts, tips):
            if marker == "s":
                g.append(f'<rect x="{_n(a - 2.6)}" y="{_n(b - 2.6)}" width="5.2" height="5.2" fill="{colour_}"/>')
            elif marker == "^":
                g.append(f'<path d="M{_n(a)},{_n(b - 3.2)}L{_n(a + 3)},{_n(b + 2.4)}L{_n(a - 3)},{_n(b + 2.4)}Z" '
                         f'fill="{colour_}"/>')
            elif marker == "x":
                g.append(f'<path d="M{_n(a - 3)},{_n(b - 3)}L{_n(a + 3)},{_n(b + 3)}M{_n(a - 3)},{_n(b + 3)}'
                         f'L{_n(a + 3)},{_n(b - 3)}" stroke="{colour_}" stroke-width="1.4"/>')
            else:
                g.append(f'<circle cx="{_n(a)}" cy="{_n(b)}" r="2.8" fill="{colour_}"/>')
            g.append(f'<circle class="hit" cx="{_n(a)}" cy="{_n(b)}" r="7" data-tip="{_a(tip)}"/>')
        g.append("</g>")
        self.parts.append("".join(g))

    def note(self, text: str) -> None:
        self.parts.append(f'<text class="tk" x="{_n((self.x.a + self.x.b) / 2)}" y="{_n((self.y.a + self.y.b) / 2)}" '
                          f'text-anchor="middle">{_a(text)}</text>')

    def render(self) -> list:
        return self.frame() + self.parts


def _legend(items: Sequence[tuple], x: float, y: float, width: float) -> tuple:
    """Legend entries (label, colour, dash, marker) in rows; returns (svg parts, height used)."""
    out, cx, cy = [], x, y
    for label, col, dash, marker in items:
        w = 34 + 6.2 * len(label)
        if cx + w > x + width and cx > x:
            cx, cy = x, cy + 16
        da = {"--": ' stroke-dasharray="6 3"', ":": ' stroke-dasharray="2 2"',
              "-.": ' stroke-dasharray="6 2 2 2"'}.get(dash, "")
        if marker in ("band", "box"):
            op = ' opacity="0.25"' if marker == "band" else ""
            out.append(f'<rect x="{_n(cx)}" y="{_n(cy - 5)}" width="22" height="8" fill="{col}"{op}/>')
        else:
            out.append(f'<line x1="{_n(cx)}" x2="{_n(cx + 22)}" y1="{_n(cy - 1)}" y2="{_n(cy - 1)}" stroke="{col}" '
                       f'stroke-width="1.8"{da}/>')
        out.append(f'<text class="lg" x="{_n(cx + 27)}" y="{_n(cy + 3)}">{_a(label)}</text>')
        cx += w
    return out, cy - y + 16


def _svg(w: float, h: float, parts: Sequence[str], label: str, key: str) -> str:
    return (f'<svg class="chart" id="svg-{_a(key)}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_n(w)} {_n(h)}" '
            f'width="{_n(w)}" height="{_n(h)}" role="img" aria-label="{_a(label)}">' + "".join(parts) + "</svg>")


def _range(values: Sequence[float], kind: str) -> tuple:
    vals = [v for v in values if finite(v)]
    if not vals:
        return (0.8, 10.0) if kind == "log" else (0.0, 1.0)
    lo, hi = min(vals), max(vals)
    if kind == "log":
        lo = max(min(lo, 1.0), 1e-12)
        return 10 ** math.floor(math.log10(lo) - 1e-9) if lo < 1 else 0.8, max(10.0, 10 ** math.ceil(math.log10(hi)))
    if kind == "symlog":
        return 0.0, max(1.0, hi) * 1.3
    if hi == lo:
        hi = lo + 1
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def _tip(s: F.Series, i: int, what: str) -> str:
    return f"{s.label}, layer {s.layers[i]}: {what} = {_num(s.values[i])}  [{s.file}:{s.lines[i]} {s.column}]"


# --------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------

def heatmap_svg(run: Run, hm: F.Heatmap, key: str) -> str:
    n_l, n_p = len(hm.layers), len(hm.positions)
    cw, ch = 64, 20
    left, top = 48, 30
    w = left + cw * n_p + 110
    h = top + ch * n_l + 78
    gold = run.json.value("/gold_answer/string")
    ent = [v for row in hm.entropy for v in row if finite(v)]
    hmax = max([1.0] + ent)
    parts = [f'<text class="pt" x="{_n(left + cw * n_p / 2)}" y="16">{_a(f"Top-1 token per layer and position, {hm.lens} lens (bold: gold {gold!r})")}</text>']
    for i, layer in enumerate(hm.layers):
        y = top + ch * (n_l - 1 - i)
        parts.append(f'<text class="tk" x="{_n(left - 6)}" y="{_n(y + ch / 2 + 3)}" text-anchor="end">{layer}</text>')
        for j, pos in enumerate(hm.positions):
            x = left + cw * j
            p, e = hm.prob[i][j], hm.entropy[i][j]
            fp, fh = colour(p, VIRIDIS), colour(e / hmax if finite(e) else float("nan"), MAGMA_R)
            tip = (f"{hm.lens} lens, layer {layer}, position {pos} (input {F.token_label(hm.tokens[j])}): "
                   f"top-1 {hm.top1[i][j]!r}, p = {_num(p)}, entropy = {_num(e)} bits  [{hm.file}:{hm.lines[i][j]}]")
            tc = "#000" if _lum(fp) > 0.5 else "#fff"
            tch = "#000" if _lum(fh) > 0.5 else "#fff"
            bold = ' font-weight="bold"' if hm.is_answer and hm.is_answer[i][j] else ""
            parts.append(f'<g class="cell" data-tip="{_a(tip)}"><rect x="{x}" y="{y}" width="{cw - 1}" height="{ch - 1}" '
                         f'fill="{fp}" data-fp="{fp}" data-fh="{fh}"/><text class="ct" x="{_n(x + cw / 2)}" '
                         f'y="{_n(y + ch / 2 + 3.5)}" fill="{tc}" data-tp="{tc}" data-th="{tch}"{bold}>'
                         f'{_a(F.token_label(hm.top1[i][j], 9))}</text></g>')
    yb = top + ch * n_l
    for j, pos in enumerate(hm.positions):
        x = left + cw * j + cw / 2
        parts.append(f'<text class="tk" transform="translate({_n(x)},{_n(yb + 8)}) rotate(-50)" text-anchor="end">'
                     f'{_a(F.token_label(hm.tokens[j], 12))}</text>')
    parts.append(f'<text class="al" x="{_n(left + cw * n_p / 2)}" y="{_n(h - 6)}" text-anchor="middle">input token '
                 f'(position in the prompt)</text>')
    parts.append(f'<text class="al" transform="translate(12,{_n(top + ch * n_l / 2)}) rotate(-90)" '
                 f'text-anchor="middle">layer (0 = embeddings)</text>')
    # colour bars (probability / entropy), switched with the page's buttons
    bx, by, bh = left + cw * n_p + 14, top, ch * n_l
    for mode, stops, lo, hi, label in (("p", VIRIDIS, 0.0, 1.0, "top-1 probability"),
                                       ("h", MAGMA_R, 0.0, hmax, "entropy [bits]")):
        vis = "" if mode == "p" else ' style="display:none"'
        g = [f'<g class="cbar cbar-{mode}"{vis}>']
        for k in range(40):
            f = k / 39
            g.append(f'<rect x="{_n(bx)}" y="{_n(by + bh * (1 - (k + 1) / 40))}" width="12" height="{_n(bh / 40 + 0.5)}" '
                     f'fill="{colour(f, stops)}"/>')
        for t in _nice_ticks(lo, hi, 4):
            yy = by + bh * (1 - (t - lo) / (hi - lo))
            g.append(f'<text class="tk" x="{_n(bx + 16)}" y="{_n(yy + 3)}">{_a(_tick_label(t, "linear"))}</text>')
        g.append(f'<text class="al" transform="translate({_n(bx + 52)},{_n(by + bh / 2)}) rotate(-90)" '
                 f'text-anchor="middle">{label}</text></g>')
        parts.append("".join(g))
    return _svg(w, h, parts, f"heatmap {hm.lens}", key)


def _marker_lines(panel: Panel, marks) -> None:
    for label, v in marks:
        cls = {"L_copy": "m-copy", "L_semantic": "m-sem", "L_semantic_confirmed": "m-conf"}[label]
        panel.vline(v.value, cls, f"{label} = {v.value}  [{v.cite.file}:{v.cite.line} {v.cite.key}]")


def trajectories_svg(run: Run, key: str) -> str:
    panels = F.trajectories(run)
    marks = F.markers(run)
    n = run.n_layers
    parts: list = []
    legend: dict = {}
    for k, (metric, label, series) in enumerate(panels):
        ox, oy = (k % 2) * Panel.W, 24 + (k // 2) * Panel.H
        kind = "log" if metric == "answer_rank" else "linear"
        vals = [v for s in series for v in s.values]
        lo, hi = _range(vals, kind)
        if metric == "cos_to_final":
            lo, hi = min(-0.05, lo), max(1.05, hi)
        if metric in ("kl_to_final_bits", "entropy_bits"):
            lo = min(0.0, lo)
        p = Panel(ox, oy, label, label.split(" [")[0].split(" (")[0], "layer", -0.3, n + 0.3, lo, hi, kind)
        _marker_lines(p, marks)
        for s in series:
            c, ls, mk = F.LENS_STYLE[s.lens]
            p.line(s.layers, s.values, [_tip(s, i, s.column) for i in range(len(s.values))], c, ls, mk, s.lens)
            legend.setdefault(s.label, (s.label, c, ls, mk))
        if not series:
            p.note("no data in the run")
        parts += p.render()
    items = list(legend.values())
    for label, v in marks:
        items.append({"L_copy": (f"L_copy = {v.value}", "#555555", ":", ""),
                      "L_semantic": (f"L_semantic = {v.value}", "#000000", "--", ""),
                      "L_semantic_confirmed": (f"L_semantic_confirmed = {v.value}", "#C00000", "", "band")}[label])
    leg, lh = _legend(items, 20, 24 + 2 * Panel.H + 10, 2 * Panel.W - 30)
    title = f'<text class="pt" x="{Panel.W}" y="14">{_a(f"Next-token trajectories of the primary prompt ({run.model}, {n} layers)")}</text>'
    return _svg(2 * Panel.W, 24 + 2 * Panel.H + lh + 14, [title] + parts + leg, "trajectories", key)


def fact_ranks_svg(run: Run, key: str) -> str:
    lenses = [l for l in ("norm", "tuned", "prism") if F.fact_ranks(run, l)]
    parts: list = []
    legend: dict = {}
    allv = [v for l in lenses for s in F.fact_ranks(run, l) for v in s.values]
    pw = Panel.W if len(lenses) <= 2 else 2 * Panel.W / len(lenses)
    lo, hi = _range(allv, "log")
    for k, lens in enumerate(lenses):
        p = Panel(k * pw, 24, f"{lens} lens", "gold-answer rank", "layer", -0.3, run.n_layers + 0.3, lo, hi, "log",
                  w=pw)
        for i, s in enumerate(F.fact_ranks(run, lens)):
            ctl = s.extra.get("control")
            c = "#000000" if ctl else F.FACT_COLOURS[i % len(F.FACT_COLOURS)]
            ls, mk = ("--", "x") if ctl else ("-", "o")
            p.line(s.layers, s.values, [_tip(s, j, "answer_rank") for j in range(len(s.values))], c, ls, mk, s.label)
            legend.setdefault(s.label, (s.label, c, ls, mk))
        parts += p.render()
    w = max(1, len(lenses)) * pw
    leg, lh = _legend(list(legend.values()), 20, 24 + Panel.H + 10, w - 30)
    title = f'<text class="pt" x="{_n(w / 2)}" y="14">{_a(f"Five facts and the control prompt ({run.model})")}</text>'
    return _svg(w, 24 + Panel.H + lh + 14, [title] + parts + leg, "fact ranks", key)


def artefact_svg(run: Run, panel: dict, key: str) -> str:
    S = panel["series"]
    n = run.n_layers
    parts: list = []
    legend: dict = {}
    kl = [v for c in ("kl_norm_vs_raw_bits", "kl_raw_to_norm_bits") if c in S for v in S[c].values]
    lo, hi = _range(kl, "symlog")
    W3 = 350
    p1 = Panel(0, 24, "KL between the two lenses", "KL [bits] (symlog)", "layer", -0.3, n + 0.3, lo, hi, "symlog",
               w=W3)
    for y in (0.5, 1.0):
        p1.hline(y, "thr", f"{y} bit threshold of the artefact score")
    for col, c, ls, mk in (("kl_norm_vs_raw_bits", "#0072B2", "-", "o"), ("kl_raw_to_norm_bits", "#009E73", "--", "o")):
        if col in S:
            s = S[col]
            lab = dict(F.ARTEFACT_COLUMNS)[col]
            p1.line(s.layers, s.values, [_tip(s, i, col) for i in range(len(s.values))], c, ls, mk, lab)
            legend.setdefault(lab, (lab, c, ls, mk))
    p2 = Panel(W3, 24, "distance and top-50 overlap", "distance / overlap", "layer", -0.3, n + 0.3, -0.03, 1.03, w=W3)
    for col, c, ls, mk, scale, lab in (("js_divergence", "#CC79A7", "-", "o", 1.0, "JS divergence [bits]"),
                                       ("l1_prob_diff", "#E69F00", "--", "s", 0.5, "total variation (L1 / 2)"),
                                       ("topk_jaccard_raw_norm@50", "#56B4E9", ":", "^", 1.0, "top-50 Jaccard")):
        if col in S:
            s = S[col]
            p2.line(s.layers, [v * scale for v in s.values], [_tip(s, i, col) for i in range(len(s.values))], c, ls, mk,
                    lab)
            legend.setdefault(lab, (lab, c, ls, mk))
    ranks = [v for c in ("answer_rank_norm", "answer_rank_raw") if c in S for v in S[c].values]
    rlo, rhi = _range(ranks, "log")
    p3 = Panel(2 * W3, 24, "gold-answer rank", "rank (log)", "layer", -0.3, n + 0.3, rlo, rhi, "log", w=W3)
    for l in panel["norm_only"]:
        p3.vline(l, "m-conf", f"layer {l}: semantic under the norm lens only")
    for col, lens in (("answer_rank_norm", "norm"), ("answer_rank_raw", "raw")):
        if col in S:
            s = S[col]
            c, ls, mk = F.LENS_STYLE[lens]
            p3.line(s.layers, s.values, [_tip(s, i, col) for i in range(len(s.values))], c, ls, mk, s.label)
            legend.setdefault(s.label, (s.label, c, ls, mk))
    for p in (p1, p2, p3):
        parts += p.render()
    leg, lh = _legend(list(legend.values()), 20, 24 + Panel.H + 10, 3 * W3 - 30)
    tier = panel["tier"]
    t = f"Raw vs norm lens, primary prompt ({run.model})" + (f": artefact tier {tier.value}" if tier.ok else "")
    title = f'<text class="pt" x="{_n(1.5 * W3)}" y="14">{_a(t)}</text>'
    return _svg(3 * W3, 24 + Panel.H + lh + 14, [title] + parts + leg, "raw vs norm", key)


def figure_svgs(run: Run) -> dict:
    """{svg key: SVG markup} of every figure the run has data for (keys as in the document's Figures)."""
    out = {}
    for lens in F.LENS_ORDER:
        hm = F.heatmap(run, lens)
        if hm is not None:
            out[f"heatmap-{lens}"] = heatmap_svg(run, hm, f"heatmap-{lens}")
    out["trajectories"] = trajectories_svg(run, "trajectories")
    if F.fact_ranks(run, "norm"):
        out["fact-ranks"] = fact_ranks_svg(run, "fact-ranks")
    panel = F.artefact_panel(run)
    if panel is not None:
        out["raw-vs-norm"] = artefact_svg(run, panel, "raw-vs-norm")
    return out


def bars_svg(title: str, groups: Sequence[str], series: Sequence[tuple], ylabel: str, key: str,
             ymax: Optional[float] = 1.0) -> str:
    """Grouped bars: ``series`` = [(label, colour, [(value, tip) per group])]."""
    ng, ns = len(groups), max(1, len(series))
    gw = max(70, 18 * ns + 30)
    ml, mt, mb = 56, 30, 70
    w = ml + gw * ng + 20
    h = mt + 200 + mb
    vals = [v for _, _, pts in series for v, _ in pts if finite(v)]
    hi = ymax if ymax is not None else (max(vals) * 1.1 if vals else 1.0)
    y = Scale("linear", 0.0, hi, mt + 200, mt)
    parts = [f'<text class="pt" x="{_n(w / 2)}" y="16">{_a(title)}</text>']
    for t in _nice_ticks(0.0, hi, 5):
        yy = y(t)
        parts.append(f'<line class="grid" x1="{ml}" x2="{_n(w - 20)}" y1="{_n(yy)}" y2="{_n(yy)}"/>'
                     f'<text class="tk" x="{ml - 4}" y="{_n(yy + 3)}" text-anchor="end">{_a(_tick_label(t, "linear"))}</text>')
    bw = (gw - 20) / ns
    for gi, g in enumerate(groups):
        gx = ml + gi * gw + 10
        for si, (label, col, pts) in enumerate(series):
            v, tip = pts[gi]
            if not finite(v):
                parts.append(f'<text class="tk" x="{_n(gx + si * bw + bw / 2)}" y="{_n(y(0) - 4)}" '
                             f'text-anchor="middle" data-tip="{_a(tip)}">–</text>')
                continue
            parts.append(f'<rect x="{_n(gx + si * bw)}" y="{_n(y(v))}" width="{_n(bw - 2)}" height="{_n(y(0) - y(v))}" '
                         f'fill="{col}" data-tip="{_a(tip)}"/>')
        parts.append(f'<text class="tk" transform="translate({_n(gx + (gw - 20) / 2)},{_n(mt + 212)}) rotate(-30)" '
                     f'text-anchor="end">{_a(g)}</text>')
    parts.append(f'<path class="ax" d="M{ml},{mt}V{mt + 200}H{_n(w - 20)}"/>')
    parts.append(f'<text class="al" transform="translate(14,{mt + 100}) rotate(-90)" text-anchor="middle">{_a(ylabel)}</text>')
    leg, lh = _legend([(label, col, "", "box") for label, col, _ in series], ml, h - 12, w - ml)
    return _svg(w, h + lh, parts + leg, title, key)
