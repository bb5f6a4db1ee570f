"""The cross-model page of a sweep's output (``jaxlens sweep --out OUT``): ``OUT/<name>/manifest.json`` and
the committed Parquet shards it lists (``prompts/*.parquet``: one row per prompt × lens), plus
``OUT/summary.json`` when present.

Values from the JSON files are cited by line as everywhere in the report. A statistic over prompts is
cited by what it was computed from: ``[<name>/prompts median(L_semantic_frac) lens=norm status=ok n=11]``
— the table, the statistic and column, the row filter and the number of rows (NaN / null values left
out); percentiles interpolate linearly (numpy's default, the probe's ``percentile``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from jaxlens.errors import JaxlensError
from jaxlens.report.document import Code, Doc, Figure, Heading, Para, Row, Table, Text, Val, render_markdown
from jaxlens.report.jsonloc import JsonSyntaxError, parse_with_lines
from jaxlens.report.load import V, JsonDoc, finite

__all__ = ["AggCite", "Sweep", "build_sweep_files", "is_sweep_dir", "load_sweep", "STATS"]

MANIFEST = "manifest.json"
SUMMARY = "summary.json"

#: statistics of the distribution tables, in column order
STATS = ("min", "p25", "median", "p75", "max")
MILESTONES = ("L_copy", "L_semantic", "L_semantic_confirmed", "first_rank_le_10", "first_rank_le_5",
              "first_rank_le_1", "first_kl_below_1.0", "first_kl_below_0.5")


@dataclass(frozen=True)
class AggCite:
    """A statistic computed over a sweep table's rows (see the module docstring)."""
    file: str                        # "<model>/prompts"
    stat: str
    column: str
    filters: tuple                   # ((column, value), ...)
    n: int

    @property
    def line(self):  # the document's citation interface
        return 0

    def text(self, with_key: bool = True) -> str:
        f = " ".join(f"{k}={v}" for k, v in self.filters)
        return f"[{self.file} {self.stat}({self.column}) {f} n={self.n}]"


@dataclass
class SweepModel:
    label: str
    dir: Path
    manifest: JsonDoc
    rows: list                       # prompts table rows as dicts, in file order of the committed shards
    lenses: list


@dataclass
class Sweep:
    root: Path
    models: list
    summary: Optional[JsonDoc] = None
    files: list = field(default_factory=list)


def _is_model_dir(d: Path) -> bool:
    return (d / MANIFEST).is_file()


def is_sweep_dir(d: Path) -> bool:
    d = Path(d)
    if not d.is_dir():
        return False
    if _is_model_dir(d) or (d / SUMMARY).is_file():
        return True
    try:
        return any(_is_model_dir(s) for s in d.iterdir() if s.is_dir())
    except OSError:
        return False


def _json_doc(path: Path, label: str) -> JsonDoc:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise JaxlensError(f"{path}: cannot be read ({e.__class__.__name__})") from None
    try:
        data, index = parse_with_lines(text)
    except JsonSyntaxError as e:
        raise JaxlensError(f"{label} is not valid JSON (truncated or corrupt: {e})") from None
    return JsonDoc(label, data, index)


def _read_prompts(d: Path, label: str, manifest: dict) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise JaxlensError("reading a sweep's Parquet tables needs pyarrow: pip install pyarrow") from None
    shards = [s for s in manifest.get("shards", []) if isinstance(s, dict) and s.get("table") == "prompts"]
    rows: list = []
    for s in shards:
        p = d / str(s.get("file"))
        if not p.is_file():
            raise JaxlensError(f"{label}/{s.get('file')} is listed in {label}/{MANIFEST} but missing; the sweep "
                               f"directory is incomplete")
        try:
            t = pq.read_table(p)
        except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a bad file
            raise JaxlensError(f"{label}/{s.get('file')} is not a readable Parquet file ({e.__class__.__name__})") from None
        rows.extend(t.to_pylist())
    return rows


def load_sweep(d: str | Path) -> Sweep:
    root = Path(d)
    if _is_model_dir(root):
        model_dirs = [root]
        root_for_summary = None
    else:
        model_dirs = sorted(s for s in root.iterdir() if s.is_dir() and _is_model_dir(s))
        root_for_summary = root
    if not model_dirs:
        raise JaxlensError(f"{root} holds no sweep model directory (<name>/manifest.json)")
    models = []
    for md in model_dirs:
        label = md.name
        doc = _json_doc(md / MANIFEST, f"{label}/{MANIFEST}")
        m = doc.data
        if not isinstance(m, dict) or m.get("format") != "jaxlens-sweep":
            raise JaxlensError(f"{label}/{MANIFEST} is not a jaxlens sweep manifest")
        rows = _read_prompts(md, label, m)
        lenses = [x.get("name") for x in (m.get("identity", {}).get("lenses") or []) if isinstance(x, dict)]
        models.append(SweepModel(label, md, doc, rows, lenses))
    summary = None
    if root_for_summary is not None and (root_for_summary / SUMMARY).is_file():
        summary = _json_doc(root_for_summary / SUMMARY, SUMMARY)
    return Sweep(root, models, summary)


# --------------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------------

def _percentile(vals: Sequence[float], q: float) -> Optional[float]:
    s = sorted(vals)
    if not s:
        return None
    r = q * (len(s) - 1)
    lo, hi = math.floor(r), math.ceil(r)
    return float(s[lo] + (s[hi] - s[lo]) * (r - lo))


def _stat(vals: Sequence[float], stat: str) -> Optional[float]:
    if not vals:
        return None
    if stat == "min":
        return float(min(vals))
    if stat == "max":
        return float(max(vals))
    return _percentile(vals, {"p25": 0.25, "median": 0.5, "p75": 0.75}[stat])


def _rows(m: SweepModel, lens: str) -> list:
    return [r for r in m.rows if r.get("lens") == lens and r.get("status") == "ok"]


def _values(rows: Sequence[dict], column: str) -> list:
    return [float(r[column]) for r in rows if finite(r.get(column))]


def agg(m: SweepModel, lens: str, column: str, stat: str) -> V:
    rows = _rows(m, lens)
    vals = _values(rows, column)
    if stat == "count":
        value: Any = len(vals)
    elif stat == "share":
        value = round(len(vals) / len(rows), 6) if rows else None
    else:
        value = _stat(vals, stat)
    return V(value, AggCite(f"{m.label}/prompts", stat, column, (("lens", lens), ("status", "ok")), len(rows)))


# --------------------------------------------------------------------------------------------------
# the page
# --------------------------------------------------------------------------------------------------

def _mval(m: SweepModel, ptr: str) -> Val:
    return Val(m.manifest.get(ptr))          # cited as <model>/manifest.json:line /pointer


def build_sweep_document(sw: Sweep) -> Doc:
    doc = Doc("Sweep report: " + ", ".join(m.label for m in sw.models))
    doc.add(Para([Text("The sweep's models side by side, written by jaxlens report from each model's manifest.json, "
                       "its committed per-prompt Parquet shards and summary.json. JSON values are cited [file:line key]; "
                       "a statistic over prompts is cited [model/prompts stat(column) filter n=rows] (prompts with "
                       "status ok; null values left out; linear-interpolation percentiles).")]))
    doc.add(Heading(1, "Models", "models"))
    rows = []
    for m in sw.models:
        rows.append(Row([Code(m.label), _mval(m, "/identity/model/name"), _mval(m, "/identity/model/arch"),
                         _mval(m, "/identity/model/n_layers"), _mval(m, "/identity/model/d_model"),
                         _mval(m, "/identity/dtype"), _mval(m, "/identity/prompts/rows"), _mval(m, "/status")]))
    doc.add(Table(["model dir", "name", "arch", "layers", "d_model", "dtype", "prompts", "status"], rows))
    if sw.summary is not None and isinstance(sw.summary.data, dict) and isinstance(sw.summary.data.get("summary"), list):
        keys = ("prompts", "computed", "with_answer", "L_semantic_frac_p25", "L_semantic_frac_median",
                "L_semantic_frac_p75", "share_rank1", "first_kl_below_1.0_median")
        rows = []
        for i, e in enumerate(sw.summary.data["summary"]):
            if not isinstance(e, dict):
                continue
            rows.append(Row([Text(f"{e.get('model')} / {e.get('lens')}")]
                            + [Val(sw.summary.get(f"/summary/{i}/{k}")) for k in keys]))
        doc.add(Heading(1, "Sweep summary", "summary"))
        doc.add(Table(["model / lens"] + list(keys), rows, caption=[Text("As written by the sweep (summary.json).")]))
    doc.add(Heading(1, "Milestones side by side (median over prompts)", "milestones"))
    pairs = [(m, lens) for m in sw.models for lens in m.lenses]
    rows = []
    for col in MILESTONES:
        rows.append(Row([Text(col)] + [Val(agg(m, lens, col, "median")) for m, lens in pairs]))
    rows.append(Row([Text("prompts reaching rank 1 (share)")] + [Val(agg(m, lens, "L_semantic", "share"))
                                                               for m, lens in pairs]))
    doc.add(Table(["milestone (layer)"] + [f"{m.label} / {lens}" for m, lens in pairs], rows))
    doc.add(Heading(1, "L_semantic / n_layers over prompts", "distribution"))
    rows = []
    for m, lens in pairs:
        rows.append(Row([Text(f"{m.label} / {lens}"), Val(agg(m, lens, "L_semantic_frac", "count"))]
                        + [Val(agg(m, lens, "L_semantic_frac", s)) for s in STATS]))
    doc.add(Table(["model / lens", "prompts with L_semantic"] + [f"{s}" for s in STATS], rows,
                  caption=[Text("Collapse depth as a fraction of depth (the sweep's L_semantic_frac per prompt); "
                                "prompts that never reach rank 1 are left out and counted in the share above.")]))
    doc.add(Figure("sweep-depth.png", "Distribution of L_semantic / n_layers over prompts, per model and lens "
                   "(box: quartiles, line: median, points: prompts).", svg_key="sweep-depth"))
    return doc


def _series(sw: Sweep) -> list:
    out = []
    for m in sw.models:
        for lens in m.lenses:
            vals = _values(_rows(m, lens), "L_semantic_frac")
            out.append((f"{m.label} / {lens}", vals))
    return out


def _png(sw: Sweep) -> bytes:
    from jaxlens.report import figures as G

    def build():
        data = _series(sw)
        fig = G._new_figure(max(5.0, 1.5 + 1.0 * len(data)), 3.6)
        ax = fig.add_subplot(1, 1, 1)
        pos = list(range(1, len(data) + 1))
        have = [(p, v) for p, (_, v) in zip(pos, data) if v]
        if have:
            ax.boxplot([v for _, v in have], positions=[p for p, _ in have], widths=0.5, showfliers=False,
                       medianprops={"color": "#D55E00", "linewidth": 1.6})
        for p, (_, vals) in zip(pos, data):
            if vals:
                # deterministic horizontal spread by rank (no random jitter)
                k = len(vals)
                xs = [p - 0.18 + 0.36 * (i / max(1, k - 1)) for i in range(k)]
                ax.scatter(xs, sorted(vals), s=9, color="#0072B2", alpha=0.6, zorder=3, linewidths=0)
            else:
                ax.text(p, 0.5, "no prompt\nreaches rank 1", ha="center", va="center", fontsize=G.MIN_FONT_PT)
        ax.set_xticks(pos)
        ax.set_xticklabels([G._renderable(f"{lab} (n = {len(v)})") for lab, v in data], rotation=20, ha="right")
        ax.set_xlabel("model / lens (n = prompts that reach rank 1)")
        ax.set_xlim(0.4, len(data) + 0.6)
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("L_semantic / number of layers")
        ax.set_title("Collapse depth over prompts")
        return fig

    return G.render_png(G.draw(build))


def _svg(sw: Sweep) -> str:
    from jaxlens.report.svg import bars_svg

    data = _series(sw)
    series = []
    for stat, colour in (("p25", "#56B4E9"), ("median", "#0072B2"), ("p75", "#D55E00")):
        pts = []
        for (label, vals) in data:
            v = _stat(vals, stat)
            pts.append((v if v is not None else float("nan"), f"{label}: {stat} of L_semantic_frac = {v} "
                                                                f"over {len(vals)} prompts"))
        series.append((f"{stat} of L_semantic / n", colour, pts))
    return bars_svg("Collapse depth over prompts", [lab for lab, _ in data], series, "L_semantic / number of layers",
                    "sweep-depth", ymax=1.0)


def build_sweep_files(sw: Sweep, formats: Sequence[str]) -> dict:
    doc = build_sweep_document(sw)
    png = "png" in formats
    files: dict = {}
    if png:
        files["sweep-depth.png"] = _png(sw)
    if "md" in formats:
        files["index.md"] = render_markdown(doc, png=png).encode("utf-8")
    if "html" in formats:
        from jaxlens.report.html import render_html

        files["index.html"] = render_html(doc, {"sweep-depth": _svg(sw)}, png=png).encode("utf-8")
    return files
