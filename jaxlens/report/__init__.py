"""``jaxlens report``: paper figures and the analyst's evaluation report, written from a probe run's files.

* :mod:`.jsonloc`  JSON with the line of every key path (the report cites lines)
* :mod:`.load`     a run directory → :class:`~.load.Run` (JSON + CSVs, every value with its citation);
                   bad input → one-sentence :class:`~jaxlens.errors.JaxlensError`
* :mod:`.figdata`  the series behind each figure (shared by PNG and SVG)
* :mod:`.figures`  PNGs with matplotlib (the optional ``jaxlens[plot]`` extra)
* :mod:`.svg`      the interactive SVG figures of report.html (no matplotlib)
* :mod:`.document` the document model and its Markdown rendering; :mod:`.html` its HTML rendering
* :mod:`.content`  the report's sections; :mod:`.cross` the cross-model page of several runs
* :mod:`.cli`      the ``jaxlens report`` command and ``jaxlens probe --report``

Everything is computed in memory first and written with :class:`jaxlens.writers.OutputSet`, so a
failure leaves no partial file; the same run gives byte-identical files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

from jaxlens.errors import JaxlensError

__all__ = ["FORMATS", "build_run_files", "make_report", "parse_formats"]

FORMATS = ("html", "md", "png")


def parse_formats(spec: str | Sequence[str] | None) -> tuple:
    if spec is None:
        return FORMATS
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for it in items:
        it = it.strip().lower()
        if not it:
            continue
        if it == "markdown":
            it = "md"
        if it not in FORMATS:
            raise JaxlensError(f"--format {it}: unknown format (choose from {', '.join(FORMATS)}, comma-separated)")
        if it not in out:
            out.append(it)
    if not out:
        raise JaxlensError("--format: give at least one of html, md, png")
    return tuple(f for f in FORMATS if f in out)


def build_run_files(run, formats: Sequence[str], heatmap: str = "prob") -> dict:
    """{file name: bytes} of one run's report (nothing written)."""
    from jaxlens.report.content import build_document
    from jaxlens.report.document import render_markdown

    files: dict = {}
    doc = build_document(run)
    png = "png" in formats
    if png:
        from jaxlens.report.figures import pngs

        for name, _caption, data in pngs(run, heatmap):
            files[name] = data
    if "md" in formats:
        files["report.md"] = render_markdown(doc, png=png).encode("utf-8")
    if "html" in formats:
        from jaxlens.report.html import render_html
        from jaxlens.report.svg import figure_svgs

        files["report.html"] = render_html(doc, figure_svgs(run), png=png).encode("utf-8")
    return files


def _write(out_dir: Path, files: dict) -> list:
    from jaxlens.writers import OutputSet

    with OutputSet(out_dir) as out:
        for name in sorted(files):
            out.binary(name, files[name])
    return list(out.paths)


def make_report(run_dirs: Iterable[str | Path], out: Optional[str | Path] = None,
                formats: str | Sequence[str] | None = None, heatmap: str = "prob") -> list:
    """Write the report of one run (``out`` defaults to ``RUN_DIR/report``); for several runs (or a
    directory of runs), the cross-model page in ``out`` plus each run's report in ``out/<run name>/``; for a
    sweep's output directory (``jaxlens sweep --out``), its cross-model page (default ``SWEEP_DIR/report``).
    Returns the paths written, sorted."""
    from jaxlens.report.load import find_runs, load_run

    fmts = parse_formats(formats)
    if heatmap not in ("prob", "entropy"):
        raise JaxlensError(f"--heatmap {heatmap}: choose prob or entropy")
    if "png" in fmts:
        from jaxlens.report.figures import require_matplotlib

        require_matplotlib()
    from jaxlens.report.sweep import build_sweep_files, is_sweep_dir, load_sweep

    given = [Path(d) for d in run_dirs]
    sweeps = [d for d in given if is_sweep_dir(d)]
    if sweeps:
        if len(given) > 1:
            raise JaxlensError(f"{sweeps[0]} is a sweep; give it alone (one sweep directory), not with other runs")
        target = Path(out) if out is not None else sweeps[0] / "report"
        return sorted(_write(target, build_sweep_files(load_sweep(sweeps[0]), fmts)))
    dirs = find_runs(given)
    if not dirs:
        raise JaxlensError("give at least one probe output directory")
    runs = [load_run(d) for d in dirs]
    if len(runs) == 1:
        target = Path(out) if out is not None else Path(dirs[0]) / "report"
        files = build_run_files(runs[0], fmts, heatmap)
        return sorted(_write(target, files))
    if out is None:
        raise JaxlensError("several runs give a cross-model page: name its directory with --out DIR")
    from jaxlens.report.cross import build_cross_files, run_labels

    labels = run_labels(runs)
    target = Path(out)
    per_run = {label: build_run_files(run, fmts, heatmap) for label, run in zip(labels, runs)}
    cross = build_cross_files(runs, labels, fmts)
    paths = []
    for label in labels:
        paths += _write(target / label, per_run[label])
    paths += _write(target, cross)
    return sorted(paths)
