"""``jaxlens report RUN_DIR [RUN_DIR ...] [--out DIR] [--format html,md,png]`` and ``jaxlens probe --report``."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["add_parser", "preflight", "report_after_probe", "report_after_sweep"]


def _cmd_report(args) -> int:
    from jaxlens.report import make_report

    paths = make_report(args.run_dirs, out=args.out, formats=args.format, heatmap=args.heatmap)
    for p in paths:
        print(p)
    return 0


def add_parser(subparsers) -> None:
    """Register the ``report`` sub-command on the ``jaxlens`` parser's subparsers."""
    r = subparsers.add_parser(
        "report", help="figures and the evaluation report of probe runs (report.md, report.html, PNGs)",
        description="Write the evaluation report of a probe output directory: report.md and report.html (every "
                    "number cited by file, line and key) and the figures (PNG needs matplotlib: "
                    "pip install 'jaxlens[plot]'). Several directories give a cross-model page.")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="probe output directories (jaxlens probe --out DIR), a directory holding several, or one "
                        "sweep output directory (jaxlens sweep --out DIR)")
    r.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default RUN_DIR/report for one run; required for several)")
    r.add_argument("--format", default="html,md,png", metavar="LIST",
                   help="comma-separated formats among html, md, png (default all three)")
    r.add_argument("--heatmap", default="prob", choices=["prob", "entropy"],
                   help="colour of the PNG heatmaps: top-1 probability (default) or entropy; report.html has both")
    r.set_defaults(func=_cmd_report)


def preflight() -> None:
    """Fail before a long probe when ``--report`` could not draw its PNGs (matplotlib missing)."""
    from jaxlens.report.figures import require_matplotlib

    require_matplotlib()


def report_after_probe(out_dir: str | os.PathLike) -> list:
    """``jaxlens probe --report``: the report of the run just written, in ``OUT/report``."""
    from jaxlens.report import make_report

    return make_report([out_dir], out=Path(out_dir) / "report")


def report_after_sweep(out_dir: str | os.PathLike) -> list:
    """For ``jaxlens sweep --report``: the sweep's cross-model page in ``OUT/report``."""
    from jaxlens.report import make_report

    return make_report([out_dir], out=Path(out_dir) / "report")
