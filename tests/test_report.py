"""jaxlens report: every cited number resolves in the run's files, byte-stable output, bad input, figures
readable at paper size, report.html offline in a real browser.

The demo probe runs twice per module (``probe --report`` with the bundled tuned lens, and ``tuned=off``);
everything else reads those two directories. The citation checks below parse report.md on their own
(regexes, ``json``, ``csv``), without the report's reader.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"


# --------------------------------------------------------------------------------------------------
# fixtures: two demo runs
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from jaxlens.cli import main
    from jaxlens.models.loader import load_model
    from jaxlens.probe.pipeline import run_probe

    base = tmp_path_factory.mktemp("report")
    tuned = base / "demo"
    rc = main(["--no-compile-cache", "probe", "--out", str(tuned), "--report", "--quiet"])
    assert rc == 0
    plain = base / "demo-no-tuned"
    run_probe(load_model("demo"), out_dir=str(plain), tuned="off")
    return {"tuned": tuned, "plain": plain, "base": base}


# --------------------------------------------------------------------------------------------------
# an independent reader of the report's citations
# --------------------------------------------------------------------------------------------------

CITE = re.compile(r"\[(?P<file>[^\[\]:\s]+\.(?:json|csv)):(?P<a>\d+)(?:-(?P<b>\d+))?(?: (?P<key>[^\[\]]+))?\]")


def _resolve(obj, ptr):
    for tok in ptr[1:].split("/") if ptr else []:
        tok = tok.replace("~1", "/").replace("~0", "~")
        obj = obj[int(tok)] if isinstance(obj, list) else obj[tok]
    return obj


class Files:
    """The run's files read with json / csv only."""

    def __init__(self, root: Path, prefix_dirs: dict | None = None):
        self.root, self.prefix_dirs = root, prefix_dirs or {}
        self._json, self._lines = {}, {}

    def path(self, name):
        if "/" in name:
            label, rest = name.split("/", 1)
            return self.prefix_dirs[label] / rest
        return self.root / name

    def lines(self, name):
        if name not in self._lines:
            self._lines[name] = self.path(name).read_text(encoding="utf-8").split("\n")
        return self._lines[name]

    def json(self, name):
        if name not in self._json:
            self._json[name] = json.loads(self.path(name).read_text(encoding="utf-8"))
        return self._json[name]

    def csv_row(self, name, line):
        header = next(csv.reader([self.lines(name)[0]], escapechar="\\"))
        cells = next(csv.reader([self.lines(name)[line - 1]], escapechar="\\"))
        assert len(cells) == len(header), (name, line)
        return dict(zip(header, cells))

    def resolve(self, m):
        """(value, kind) at a citation match; asserts that its line holds that value."""
        name, a, b, key = m["file"], int(m["a"]), m["b"], m["key"]
        lines = self.lines(name)
        assert 1 <= a <= len(lines), m.group(0)
        if name.endswith(".json"):
            assert key and key.startswith("/"), m.group(0)
            value = _resolve(self.json(name), key)
            last = key.rsplit("/", 1)[-1].replace("~1", "/").replace("~0", "~")
            text = lines[a - 1]
            if b is None:
                assert not isinstance(value, (dict, list)) or value in ({}, []), m.group(0)
                lit = json.dumps(value, ensure_ascii=False)
                if isinstance(value, float) and math.isnan(value):
                    lit = "NaN"
                if last.isdigit() and text.strip().rstrip(",") == lit:
                    pass                                    # a list element on its own line
                else:
                    assert f"{json.dumps(last, ensure_ascii=False)}: {lit}" in text, (m.group(0), text)
            else:
                b = int(b)
                assert isinstance(value, (dict, list)) and a < b <= len(lines), m.group(0)
                assert text.rstrip().endswith("{" if isinstance(value, dict) else "["), (m.group(0), text)
                assert lines[b - 1].strip().rstrip(",") in ("}", "]"), (m.group(0), lines[b - 1])
                if not last.isdigit():
                    assert text.strip().startswith(json.dumps(last, ensure_ascii=False) + ":"), (m.group(0), text)
            return value, "json"
        # CSV
        if b is not None:
            assert a < int(b) <= len(lines) and key is None, m.group(0)
            return None, "rows"
        row = self.csv_row(name, a)
        if key is None:
            return row, "row"
        assert key in row, m.group(0)
        return row[key], "csv"


def _num_close(shown: str, value: float) -> bool:
    """``shown`` is ``value`` written with the digits it shows (4 significant digits at most)."""
    x = float(shown)
    if value == 0 or x == 0:
        return x == value
    mant = re.sub(r"e.*$", "", shown.lstrip("-")).replace(".", "").lstrip("0")
    sig = max(1, len(mant))
    tol = 0.5 * 10 ** (math.floor(math.log10(abs(value))) - sig + 1) * 1.0001
    return abs(x - value) <= tol


def _check_shown(shown: str, value, kind: str, where: str) -> None:
    """A table cell or prose value ``shown`` against the cited ``value`` (JSON value or CSV cell text)."""
    shown = shown.strip()
    if shown.startswith("`") and shown.endswith("`"):
        shown = shown.strip("`")
        if kind == "csv":
            assert json.loads(shown) == value, where
            return
        assert json.loads(shown) == value, where
        return
    if kind == "csv":
        if value == "":
            assert shown == "blank", where
        elif value in ("True", "False"):
            assert shown == value, where
        else:
            assert _num_close(shown, float(value)), (where, shown, value)
        return
    if value is None:
        assert shown == "null", where
    elif isinstance(value, bool):
        assert shown == ("true" if value else "false"), where
    elif isinstance(value, (int, float)):
        assert _num_close(shown, float(value)), (where, shown, value)
    elif isinstance(value, (list, dict)):
        assert json.loads(shown.replace("\\|", "|")) == value, where
    else:
        assert shown == value, (where, shown, value)


def _split_row(line: str) -> list:
    cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
    return [c.strip().replace("\\|", "|") for c in cells]


def check_markdown(md: str, files: Files) -> dict:
    """Every citation resolves; every table value equals its cited value; prose ``name = value [cite]`` too.
    Returns counts."""
    counts = {"citations": 0, "table_values": 0, "row_cells": 0, "prose_values": 0}
    for m in CITE.finditer(md):
        files.resolve(m)
        counts["citations"] += 1
    lines = md.split("\n")
    i = 0
    while i < len(lines):
        if lines[i].startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = _split_row(lines[i])
            i += 2
            while i < len(lines) and lines[i].startswith("| "):
                cells = _split_row(lines[i])
                assert len(cells) == len(header), lines[i]
                if header[-1] == "source":
                    cites = list(CITE.finditer(cells[-1]))
                    if all(h.startswith("`") for h in header[:-1]):          # CSV-row table
                        assert len(cites) == 1 and cites[0]["key"] is None, lines[i]
                        row, kind = files.resolve(cites[0])
                        assert kind == "row"
                        for h, c in zip(header[:-1], cells[:-1]):
                            _check_shown(c.replace("**", ""), row[h.strip("`")], "csv", lines[i])
                            counts["row_cells"] += 1
                    elif "/prompts " not in cells[-1]:       # value table (sweep statistics: test_sweep_page)
                        vals = [c.replace("**", "") for c in cells[1:-1] if c and c != "absent"]
                        assert len(vals) == len(cites), lines[i]
                        for c, m in zip(vals, cites):
                            value, kind = files.resolve(m)
                            _check_shown(c, value, kind, lines[i])
                            counts["table_values"] += 1
                i += 1
            continue
        # prose: `name` = VALUE [cite]
        for m in re.finditer(r"`[^`]+` = (`[^`]*`|\S+) (\[[^\[\]]+\])", lines[i]):
            cm = CITE.fullmatch(m.group(2))
            if cm is None or cm["key"] is None:
                continue
            value, kind = files.resolve(cm)
            _check_shown(m.group(1), value, kind, lines[i])
            counts["prose_values"] += 1
        i += 1
    return counts


# --------------------------------------------------------------------------------------------------
# the report's numbers
# --------------------------------------------------------------------------------------------------

def test_every_cited_number_resolves(runs):
    rep = runs["tuned"] / "report"
    md = (rep / "report.md").read_text(encoding="utf-8")
    counts = check_markdown(md, Files(runs["tuned"]))
    assert counts["citations"] > 300 and counts["table_values"] > 100 and counts["row_cells"] > 100
    assert counts["prose_values"] > 50
    # the per-layer table is the pure CSV: layer 0..n of the primary prompt, the confirmed layer in bold
    doc = json.loads((runs["tuned"] / "output-demo.json").read_text(encoding="utf-8"))
    conf = doc["diagnostics"]["confirmed_semantics"]["L_semantic_confirmed"]
    assert f"| **{conf}** | **`\" Berlin\"`** |" in md
    n = doc["model_stats"]["num_layers"]
    assert md.count("[output-demo-pure-next-token.csv:") >= n + 1
    # the HTML carries the same citations as the Markdown
    html = (rep / "report.html").read_text(encoding="utf-8")
    md_cites = sorted(m.group(0) for m in CITE.finditer(md))
    html_cites = sorted(m.group(0) for m in CITE.finditer(html))
    assert set(md_cites) <= set(html_cites)


def test_checklist_follows_the_diagnostics(runs):
    md = (runs["tuned"] / "report" / "report.md").read_text(encoding="utf-8")
    doc = json.loads((runs["tuned"] / "output-demo.json").read_text(encoding="utf-8"))
    flags = doc["diagnostics"]["flags"]
    line = next(l for l in md.split("\n") if "Lenses agree at the semantic layer?" in l)
    assert line.startswith("- ✗" if flags.get("low_lens_consistency_at_semantic") else "- ✓")
    line = next(l for l in md.split("\n") if "numeric_health clean?" in l)
    nh = doc["diagnostics"]["numeric_health"]
    assert line.startswith("- ✓" if not (nh["any_nan"] or nh["any_inf"] or nh["layers_flagged"]) else "- ✗")
    for r in doc["measurement_guidance"]["reasons"]:
        assert f"`\"{r}\"`" in md                     # every guidance reason is a limitation
    assert "## 7. Model Fingerprint" in md


def test_report_is_byte_stable(runs, tmp_path):
    from jaxlens.report import make_report

    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(runs["tuned"], moved, ignore=shutil.ignore_patterns("report"))
    make_report([moved], out=tmp_path / "again")
    first = runs["tuned"] / "report"
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir())
    assert {"report.md", "report.html", "fig-heatmap-norm.png", "fig-heatmap-tuned.png", "fig-trajectories.png",
            "fig-fact-ranks.png", "fig-raw-vs-norm.png"} <= set(names)
    for n in names:
        assert (first / n).read_bytes() == (tmp_path / "again" / n).read_bytes(), n
    html = (first / "report.html").read_text(encoding="utf-8")
    assert str(runs["base"]) not in html and str(moved) not in html


def test_run_without_tuned_lens(runs, tmp_path):
    from jaxlens.report import make_report

    out = tmp_path / "rep"
    paths = make_report([runs["plain"]], out=out)
    names = sorted(p.name for p in paths)
    assert "fig-heatmap-tuned.png" not in names and "fig-heatmap-norm.png" in names
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "Tuned lens: absent" in md and '`tuned_lens.status` = `"disabled"`' in md
    assert "Per-layer next-token prediction, tuned lens" not in md
    check_markdown(md, Files(runs["plain"]))


# --------------------------------------------------------------------------------------------------
# bad input: one sentence, no traceback, no files
# --------------------------------------------------------------------------------------------------

def _run_cli(argv, capsys):
    from jaxlens.cli import main

    rc = main(["--no-compile-cache"] + argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_sentence(err: str) -> str:
    lines = [l for l in err.split("\n") if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("jaxlens: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_bad_inputs(runs, tmp_path, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = _run_cli(["report", str(empty), "--out", str(out)], capsys)
    assert rc == 2 and "holds no probe output" in _one_sentence(err)
    rc, _, err = _run_cli(["report", str(tmp_path / "missing"), "--out", str(out)], capsys)
    assert rc == 2 and "no such directory" in _one_sentence(err)
    # truncated JSON
    bad = tmp_path / "truncated"
    shutil.copytree(runs["plain"], bad)
    j = bad / "output-demo.json"
    j.write_bytes(j.read_bytes()[: len(j.read_bytes()) // 2])
    rc, _, err = _run_cli(["report", str(bad), "--out", str(out)], capsys)
    assert rc == 2 and "output-demo.json is not valid JSON" in _one_sentence(err)
    # truncated CSV
    bad2 = tmp_path / "truncated-csv"
    shutil.copytree(runs["plain"], bad2)
    c = bad2 / "output-demo-pure-next-token.csv"
    c.write_bytes(c.read_bytes()[:-40])
    rc, _, err = _run_cli(["report", str(bad2), "--out", str(out)], capsys)
    assert rc == 2 and "output-demo-pure-next-token.csv" in _one_sentence(err)
    # a missing required CSV
    bad3 = tmp_path / "no-pure"
    shutil.copytree(runs["plain"], bad3)
    (bad3 / "output-demo-pure-next-token.csv").unlink()
    rc, _, err = _run_cli(["report", str(bad3), "--out", str(out)], capsys)
    assert rc == 2 and "lacks output-demo-pure-next-token.csv" in _one_sentence(err)
    # not a probe JSON
    bad4 = tmp_path / "other-json"
    bad4.mkdir()
    (bad4 / "output-x.json").write_text('{"a": 1}', encoding="utf-8")
    rc, _, err = _run_cli(["report", str(bad4), "--out", str(out)], capsys)
    assert rc == 2 and "not a jaxlens probe output" in _one_sentence(err)
    rc, _, err = _run_cli(["report", str(runs["plain"]), "--out", str(out), "--format", "pdf"], capsys)
    assert rc == 2 and "unknown format" in _one_sentence(err)
    rc, _, err = _run_cli(["report", str(runs["plain"]), str(runs["tuned"])], capsys)
    assert rc == 2 and "--out" in _one_sentence(err)
    assert not out.exists()                            # no partial files anywhere


def test_failure_leaves_no_partial_files(runs, tmp_path, monkeypatch):
    import jaxlens.report.html as H
    from jaxlens.report import make_report

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(H, "render_html", boom)
    with pytest.raises(RuntimeError):
        make_report([runs["plain"]], out=tmp_path / "out", formats="md,html")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_without_matplotlib(runs, tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib -> ImportError
    rc, _, err = _run_cli(["report", str(runs["plain"]), "--out", str(tmp_path / "a")], capsys)
    assert rc == 2 and "pip install 'jaxlens[plot]'" in _one_sentence(err)
    assert not (tmp_path / "a").exists()
    rc, out, _ = _run_cli(["report", str(runs["plain"]), "--out", str(tmp_path / "b"), "--format", "html,md"], capsys)
    assert rc == 0 and sorted(p.name for p in (tmp_path / "b").iterdir()) == ["report.html", "report.md"]


def test_probe_does_not_import_matplotlib():
    code = ("import sys, jaxlens.cli, jaxlens.probe.pipeline, jaxlens.report.cli; "
            "jaxlens.cli.build_parser(); assert 'matplotlib' not in sys.modules, 'matplotlib imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------

def _png_info(data: bytes) -> dict:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    i, info, text = 8, {}, []
    while i < len(data):
        n, kind = struct.unpack(">I4s", data[i:i + 8])
        body = data[i + 8:i + 8 + n]
        if kind == b"IHDR":
            info["w"], info["h"] = struct.unpack(">II", body[:8])
        elif kind == b"pHYs":
            info["ppm"] = struct.unpack(">IIB", body)[:2]
        elif kind in (b"tEXt", b"iTXt", b"zTXt"):
            text.append(body.split(b"\0")[0].decode())
        i += 12 + n
    info["text"] = text
    return info


def test_pngs_nonblank_and_readable(runs):
    import numpy as np
    from matplotlib.image import imread

    from jaxlens.report import figures as G
    from jaxlens.report.load import load_run

    run = load_run(runs["tuned"])
    specs = G.figure_specs(run)
    assert [s[0] for s in specs] == ["fig-heatmap-norm.png", "fig-heatmap-tuned.png", "fig-trajectories.png",
                                     "fig-fact-ranks.png", "fig-raw-vs-norm.png"]
    for name, _caption, builder in specs:
        fig = G.draw(builder)
        assert G.min_font_size(fig) >= 8.0, name                 # every text ≥ 8 pt ...
        w_in, h_in = fig.get_size_inches()
        data = (runs["tuned"] / "report" / name).read_bytes()
        info = _png_info(data)
        # ... at the saved size: the PNG is the figure's size at its dpi (no cropping or scaling), and says so
        assert (info["w"], info["h"]) == (round(w_in * G.DPI), round(h_in * G.DPI)), name
        assert info["ppm"][0] == round(G.DPI / 0.0254), name
        assert not any(t in ("Software", "Creation Time", "CreationDate") for t in info["text"]), info["text"]
        px = imread(io.BytesIO(data))[..., :3]
        assert px.std() > 0.08, name                              # not blank
        assert (px.reshape(-1, 3).std(axis=0) > 0.05).any(), name
        assert len(np.unique((px[::7, ::7] * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 20, name


# --------------------------------------------------------------------------------------------------
# several runs
# --------------------------------------------------------------------------------------------------

def test_cross_model_page(runs, tmp_path):
    from jaxlens.report import make_report

    out = tmp_path / "cross"
    paths = make_report([runs["tuned"], runs["plain"]], out=out, formats="md,html")
    names = sorted(str(p.relative_to(out)) for p in paths)
    assert names == ["demo-no-tuned/report.html", "demo-no-tuned/report.md", "demo/report.html", "demo/report.md",
                     "index.html", "index.md"]
    md = (out / "index.md").read_text(encoding="utf-8")
    counts = check_markdown(md, Files(out, {"demo": runs["tuned"], "demo-no-tuned": runs["plain"]}))
    assert counts["table_values"] >= 40
    assert "Collapse depth as a fraction of depth" in md
    # a directory of runs expands to its run sub-directories, sorted
    assert make_report([runs["base"]], out=tmp_path / "cross2", formats="md") == sorted(
        [tmp_path / "cross2" / "demo" / "report.md", tmp_path / "cross2" / "demo-no-tuned" / "report.md",
         tmp_path / "cross2" / "index.md"])


# --------------------------------------------------------------------------------------------------
# a sweep's output directory
# --------------------------------------------------------------------------------------------------

AGG = re.compile(r"\[(?P<model>[^\[\]/\s]+)/prompts (?P<stat>\w+)\((?P<col>[^()\s]+)\) lens=(?P<lens>\S+) "
                 r"status=(?P<status>\S+) n=(?P<n>\d+)\]")


def _fake_sweep(root: Path) -> None:
    """Two models' sweep directories in the sweep's layout (manifest.json + committed prompts shards)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, n, sems in (("alpha", 8, [1, 2, 2, 5, None, 3]), ("beta", 30, [20, 24, 24, 29, 30, None])):
        d = root / name
        (d / "prompts").mkdir(parents=True)
        rows = []
        for i, L in enumerate(sems):
            for lens, shift in (("norm", 0), ("tuned", -1)):
                Ls = None if L is None else max(1, L + shift)
                rows.append({"prompt_index": i, "lens": lens, "status": "ok" if i != 2 or lens == "norm" else "error",
                             "n_layers": n, "L_semantic": Ls, "L_copy": None if i % 2 else 0,
                             "L_semantic_frac": None if Ls is None else round(Ls / n, 3),
                             "first_rank_le_5": None if Ls is None else max(0, Ls - 1), "first_rank_le_1": Ls,
                             "first_rank_le_10": None if Ls is None else max(0, Ls - 2),
                             "first_kl_below_1.0": n, "first_kl_below_0.5": n, "L_semantic_confirmed": Ls})
        pq.write_table(pa.Table.from_pylist(rows), d / "prompts" / "w00000-p0.parquet")
        manifest = {"format": "jaxlens-sweep", "version": 1, "status": "complete",
                    "identity": {"model": {"name": name, "arch": "llama", "n_layers": n, "d_model": 64},
                                 "dtype": "float32", "lenses": [{"name": "norm"}, {"name": "tuned"}],
                                 "prompts": {"rows": len(sems)}},
                    "shards": [{"window": 0, "process": 0, "table": "prompts", "file": "prompts/w00000-p0.parquet"}]}
        (d / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def test_sweep_page(tmp_path):
    import numpy as np

    pq = pytest.importorskip("pyarrow.parquet", reason="a sweep's tables are Parquet (pip install pyarrow)")

    from jaxlens.report import make_report

    root = tmp_path / "sweep"
    _fake_sweep(root)
    paths = make_report([root], formats="md,html,png")
    assert sorted(p.name for p in paths) == ["index.html", "index.md", "sweep-depth.png"]
    md = (root / "report" / "index.md").read_text(encoding="utf-8")
    counts = check_markdown(md, Files(root, {"alpha": root / "alpha", "beta": root / "beta"}))
    assert counts["table_values"] >= 10
    # every statistic over prompts, recomputed from the Parquet shards with numpy
    n_agg = 0
    for line in md.split("\n"):
        if not line.startswith("| ") or "/prompts " not in line:
            continue
        cells = _split_row(line)
        vals = [c for c in cells[1:-1] if c and c != "absent"]
        aggs = list(AGG.finditer(cells[-1]))
        assert len(vals) == len(aggs), line
        for shown, m in zip(vals, aggs):
            t = pq.read_table(root / m["model"] / "prompts").to_pylist()
            rows = [r for r in t if r["lens"] == m["lens"] and r["status"] == m["status"]]
            assert len(rows) == int(m["n"])
            x = [float(r[m["col"]]) for r in rows if r[m["col"]] is not None]
            if not x and m["stat"] not in ("count", "share"):
                assert shown == "null"
                n_agg += 1
                continue
            want = {"count": len(x), "share": len(x) / len(rows), "min": min(x or [0]), "max": max(x or [0]),
                    "median": float(np.median(x)) if x else 0.0, "p25": float(np.percentile(x, 25)) if x else 0.0,
                    "p75": float(np.percentile(x, 75)) if x else 0.0}[m["stat"]]
            assert _num_close(shown, float(want)), (line, shown)
            n_agg += 1
    assert n_agg >= 30
    png = (root / "report" / "sweep-depth.png").read_bytes()
    assert _png_info(png)["w"] > 500
    # a broken manifest: one sentence
    (root / "beta" / "manifest.json").write_text('{"format": "jaxlens-sweep", "shards": [', encoding="utf-8")
    from jaxlens.errors import JaxlensError

    with pytest.raises(JaxlensError, match="beta/manifest.json is not valid JSON"):
        make_report([root], out=tmp_path / "x", formats="md")
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------------
# headless Chromium: offline, hover, screenshot
# --------------------------------------------------------------------------------------------------

class Chromium:
    """Headless Chromium over the DevTools protocol on --remote-debugging-pipe (fd 3 in, fd 4 out)."""

    def __init__(self, profile: str, timeout: float = 60.0):
        r_cmd, w_cmd = os.pipe()
        r_out, w_out = os.pipe()

        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
                f"--user-data-dir={profile}", "--window-size=1280,900", "--hide-scrollbars",
                "--remote-debugging-pipe", "about:blank"]
        # a small exec wrapper puts the pipes on fds 3 / 4 (no preexec_fn: the test process runs JAX threads)
        wrap = ("import fcntl, os, sys; r, w = (fcntl.fcntl(int(f), fcntl.F_DUPFD, 10) for f in sys.argv[1:3]); "
                "os.dup2(r, 3); os.dup2(w, 4); os.execv(sys.argv[3], sys.argv[3:])")
        self.p = subprocess.Popen([sys.executable, "-c", wrap, str(r_cmd), str(w_out)] + args, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(r_cmd, w_out))
        os.close(r_cmd)
        os.close(w_out)
        self.w, self.r, self.buf, self.id, self.events, self.timeout = w_cmd, r_out, b"", 0, [], timeout

    def _msg(self, deadline):
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.r], [], [], max(0.0, left))
            if not ready:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self.r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method, params=None, session=None):
        self.id += 1
        m = {"id": self.id, "method": method, "params": params or {}}
        if session:
            m["sessionId"] = session
        os.write(self.w, json.dumps(m).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            msg = self._msg(deadline)
            if msg.get("id") == self.id:
                assert "error" not in msg, (method, msg["error"])
                return msg.get("result", {})
            self.events.append(msg)

    def wait(self, method, session):
        deadline = time.monotonic() + self.timeout
        for k, e in enumerate(self.events):
            if e.get("method") == method and e.get("sessionId") == session:
                return self.events.pop(k)
        while True:
            msg = self._msg(deadline)
            if msg.get("method") == method and msg.get("sessionId") == session:
                return msg
            self.events.append(msg)

    def js(self, expr, session):
        return self.send("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session)["result"].get("value")

    def open(self, url):
        """A new tab with network events on, navigated to ``url``; returns its session id."""
        t = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = self.send("Target.attachToTarget", {"targetId": t, "flatten": True})["sessionId"]
        for dom in ("Network.enable", "Page.enable", "Runtime.enable"):
            self.send(dom, session=s)
        self.send("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 900, "deviceScaleFactor": 1,
                                                          "mobile": False}, s)
        self.send("Page.navigate", {"url": url}, s)
        self.wait("Page.loadEventFired", s)
        return s

    def requests(self, session):
        return [e["params"]["request"]["url"] for e in self.events
                if e.get("method") == "Network.requestWillBeSent" and e.get("sessionId") == session]

    def close(self):
        try:
            self.send("Browser.close")
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        try:
            self.p.wait(15)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        os.close(self.w)
        os.close(self.r)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not installed (apt-get install -y chromium)")
def test_html_offline_in_chromium(runs, tmp_path):
    page = runs["tuned"] / "report" / "report.html"
    html = page.read_text(encoding="utf-8")
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    # a control page that does fetch something, to show the check sees requests
    control = tmp_path / "control.html"
    control.write_text('<!DOCTYPE html><html><body><img src="http://127.0.0.1:9/x.png"></body></html>',
                       encoding="utf-8")
    b = Chromium(str(tmp_path / "profile"))
    try:
        s = b.open(page.as_uri())
        assert b.requests(s) == [page.as_uri()]                        # the page itself, nothing else
        n_tips = int(b.js("document.body.getAttribute('data-ready')", s))
        assert n_tips > 300                                            # the inline script ran
        x, y = b.js("(function(){var r=document.querySelector('#svg-heatmap-norm .cell rect');"
                    "r.scrollIntoView({block:'center'});var q=r.getBoundingClientRect();"
                    "return [q.x+q.width/2,q.y+q.height/2];})()", s)
        b.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": 1, "y": 1}, s)
        b.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y}, s)
        display, text = b.js("[getComputedStyle(document.getElementById('tip')).display,"
                             "document.getElementById('tip').textContent]", s)
        assert display == "block" and "layer 0, position 0" in text and "[output-demo-records.csv:" in text
        shot = base64.b64decode(b.send("Page.captureScreenshot", {"format": "png"}, s)["data"])
        (tmp_path / "report.png").write_bytes(shot)
        assert _png_info(shot)["w"] == 1280 and len(shot) > 20_000
        assert b.requests(s) == [page.as_uri()]
        c = b.open(control.as_uri())
        assert "http://127.0.0.1:9/x.png" in b.requests(c)
    finally:
        b.close()
