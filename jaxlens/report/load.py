"""Read a probe output directory (``jaxlens probe --out DIR``) for the report.

Everything the report states is read here, with the place it was read from: the JSON with the line
index of every key path (:mod:`.jsonloc`), every CSV with the file line of every row. Bad input raises
:class:`~jaxlens.errors.JaxlensError` with one sentence naming the file at fault.
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from jaxlens.errors import JaxlensError
from jaxlens.report.jsonloc import JsonSyntaxError, parse_with_lines, resolve
from jaxlens.writers import CSV_HEADERS, parse_cell

__all__ = ["Cite", "CsvRow", "CsvTable", "JsonDoc", "Run", "V", "find_runs", "load_run"]

#: CSV kinds the report reads (suffix after ``output-<name>``); the first one is required.
REQUIRED_CSV = "-pure-next-token.csv"
KNOWN_CSV = tuple(sorted(CSV_HEADERS))

#: the JSON blocks without which a file is not a probe output
REQUIRED_KEYS = ("diagnostics", "model_stats")


@dataclass(frozen=True)
class Cite:
    """Where a value was read: ``file`` (a name inside the run directory), 1-based ``line`` (and
    ``end`` for a block spanning lines), ``key`` = a JSON Pointer for JSON files, a column name for CSV
    files (empty: the whole row / block)."""
    file: str
    line: int
    key: str = ""
    end: Optional[int] = None

    def lines(self) -> str:
        return f"{self.line}" if not self.end or self.end == self.line else f"{self.line}-{self.end}"

    def text(self, with_key: bool = True) -> str:
        key = f" {self.key}" if (with_key and self.key) else ""
        return f"[{self.file}:{self.lines()}{key}]"


@dataclass(frozen=True)
class V:
    """A value read from the run and its citation (``cite`` None: the key or row is absent)."""
    value: Any
    cite: Optional[Cite]

    @property
    def absent(self) -> bool:
        return self.cite is None

    @property
    def ok(self) -> bool:
        """Present and not null."""
        return self.cite is not None and self.value is not None


ABSENT = V(None, None)


@dataclass
class JsonDoc:
    file: str
    data: Any
    index: dict

    def get(self, ptr: str) -> V:
        """The value at JSON Pointer ``ptr`` with its citation, or :data:`ABSENT`."""
        try:
            value = resolve(self.data, ptr)
        except KeyError:
            return ABSENT
        first, last = self.index[ptr]
        return V(value, Cite(self.file, first, ptr, last if last != first else None))

    def value(self, ptr: str, default: Any = None) -> Any:
        v = self.get(ptr)
        return default if v.absent else v.value


@dataclass
class CsvRow:
    file: str
    line: int
    cells: dict

    def get(self, column: str) -> V:
        if column not in self.cells:
            return ABSENT
        return V(self.cells[column], Cite(self.file, self.line, column))

    def __getitem__(self, column: str) -> Any:
        return self.cells.get(column)


@dataclass
class CsvTable:
    file: str
    kind: str
    header: list
    rows: list = field(default_factory=list)

    def where(self, **match: Any) -> list:
        """Rows whose cells equal every ``column=value`` given (``None`` matches a blank cell)."""
        return [r for r in self.rows if all(r.cells.get(k) == v for k, v in match.items())]

    def passes(self) -> list:
        """The distinct (fact_key, fact_index, prompt_id, prompt_variant) keys in file order."""
        seen: dict = {}
        for r in self.rows:
            k = tuple(r.cells.get(c) for c in ("fact_key", "fact_index", "prompt_id", "prompt_variant"))
            seen.setdefault(k, None)
        return list(seen)


@dataclass
class Run:
    """One probe output directory."""
    dir: Path
    name: str
    json: JsonDoc
    csv: dict                      # kind ("-pure-next-token.csv", ...) -> CsvTable
    files: list                    # (file name, sha256, n lines) of every file read, sorted by name

    # conveniences ---------------------------------------------------------------------------------
    def j(self, ptr: str) -> V:
        return self.json.get(ptr)

    def table(self, kind: str) -> Optional[CsvTable]:
        return self.csv.get(kind)

    @property
    def n_layers(self) -> int:
        n = self.json.value("/model_stats/num_layers")
        if not isinstance(n, int):
            raise JaxlensError(f"{self.json.file}: model_stats.num_layers is missing or not an integer")
        return n

    @property
    def model(self) -> str:
        return str(self.json.value("/diagnostics/model") or self.name)

    @property
    def tuned_loaded(self) -> bool:
        return self.json.value("/tuned_lens/status") == "loaded" and self.table("-pure-next-token-tuned.csv") is not None

    @property
    def prism_present(self) -> bool:
        return bool(self.json.value("/diagnostics/prism_summary/present")) and self.pure("prism") is not None

    def lens_present(self, lens: str) -> bool:
        return {"norm": True, "tuned": self.tuned_loaded, "prism": self.prism_present,
                "raw": self.table("-pure-next-token-rawlens.csv") is not None}.get(lens, False)

    def pure(self, lens: str = "norm") -> Optional[CsvTable]:
        """The pure next-token table of ``lens`` ("norm", "tuned", "prism"; None for another lens or without it)."""
        return self.table({"norm": "-pure-next-token.csv", "tuned": "-pure-next-token-tuned.csv",
                           "prism": "-pure-next-token-prism.csv"}.get(lens, ""))

    def records(self, lens: str = "norm") -> Optional[CsvTable]:
        """The per-position records of ``lens`` (the probe writes them for the norm, tuned and Prism lenses)."""
        return self.table({"norm": "-records.csv", "tuned": "-records-tuned.csv",
                           "prism": "-records-prism.csv"}.get(lens, ""))

    def primary_key(self) -> tuple:
        """The primary pass: fact 0, prompt ``pos``, variant ``orig`` (``prompt`` block)."""
        fk = self.json.value("/prompt/fact_key")
        fi = self.json.value("/prompt/fact_index", 0)
        return fk, fi, "pos", "orig"

    def pass_rows(self, table: Optional[CsvTable], key: tuple) -> list:
        if table is None:
            return []
        fk, fi, pid, var = key
        rows = table.where(fact_key=fk, fact_index=fi, prompt_id=pid, prompt_variant=var)
        return sorted(rows, key=lambda r: (r["layer"] if isinstance(r["layer"], int) else -1, r.line))


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------

def _read_text(path: Path) -> tuple[str, bytes]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise JaxlensError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8"), data
    except UnicodeDecodeError:
        raise JaxlensError(f"{path} is not UTF-8 text; is it a jaxlens probe output?") from None


def _n_lines(text: str) -> int:
    return text.count("\n") + (0 if text.endswith("\n") or not text else 1)


def _read_csv(path: Path, kind: str) -> tuple[CsvTable, str, bytes]:
    text, raw = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=",", quotechar='"', escapechar="\\",
                        doublequote=True, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise JaxlensError(f"{path.name} is empty; the probe output is incomplete") from None
    except csv.Error as e:
        raise JaxlensError(f"{path.name} is not a readable CSV file ({e})") from None
    expected = CSV_HEADERS[kind]
    if not header or header[:5] != expected[:5] or len(header) < len(expected) - 8:
        raise JaxlensError(f"{path.name} does not have the probe's {kind[1:]} header; is it a jaxlens probe output?")
    table = CsvTable(path.name, kind, header)
    line = reader.line_num + 1
    try:
        for cells in reader:
            if not cells:
                line = reader.line_num + 1
                continue
            if len(cells) != len(header):
                raise JaxlensError(f"{path.name} line {line} has {len(cells)} cells instead of {len(header)}; "
                                   f"the file is truncated or corrupt")
            table.rows.append(CsvRow(path.name, line, {h: _cell(h, c) for h, c in zip(header, cells)}))
            line = reader.line_num + 1
    except csv.Error as e:
        raise JaxlensError(f"{path.name} is not a readable CSV file near line {line} ({e})") from None
    if text and not text.endswith("\n"):
        raise JaxlensError(f"{path.name} does not end with a line break; the file is truncated")
    return table, text, raw


_JSON_RE = re.compile(r"^output-(.+)\.json$")

#: columns that hold text as written (a token " 1" or "True" stays a string)
_TEXT_COLUMNS = re.compile(r"^(top\d+|top1|token|top1_token_str.*|fact_key|prompt_id|prompt_variant|lens|risk_tier)$")


def _cell(column: str, text: str) -> Any:
    if _TEXT_COLUMNS.match(column):
        return None if text == "" and column in ("fact_key", "prompt_id", "prompt_variant") else text
    return parse_cell(text)


def _probe_json(d: Path) -> Optional[Path]:
    cands = sorted(p for p in d.iterdir() if p.is_file() and _JSON_RE.match(p.name))
    if len(cands) > 1:
        names = ", ".join(p.name for p in cands)
        raise JaxlensError(f"{d} holds several probe outputs ({names}); give each run its own directory")
    return cands[0] if cands else None


def is_run_dir(d: Path) -> bool:
    try:
        return d.is_dir() and _probe_json(d) is not None
    except JaxlensError:
        return True


def load_run(run_dir: str | Path) -> Run:
    """Read ``run_dir`` (one ``output-<name>.json`` and its CSVs)."""
    d = Path(run_dir)
    if not d.exists():
        raise JaxlensError(f"{d}: no such directory")
    if not d.is_dir():
        raise JaxlensError(f"{d} is not a directory; give a probe output directory (jaxlens probe --out DIR)")
    jpath = _probe_json(d)
    if jpath is None:
        raise JaxlensError(f"{d} holds no probe output (output-<name>.json) and no sweep (manifest.json)")
    name = _JSON_RE.match(jpath.name).group(1)
    text, raw = _read_text(jpath)
    try:
        data, index = parse_with_lines(text)
    except JsonSyntaxError as e:
        raise JaxlensError(f"{jpath.name} is not valid JSON (truncated or corrupt: {e}); re-run the probe") from None
    if not isinstance(data, dict) or any(k not in data for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(data, dict) or k not in data]
        raise JaxlensError(f"{jpath.name} has no {' or '.join(missing)} block; it is not a jaxlens probe output")
    files = [(jpath.name, hashlib.sha256(raw).hexdigest(), _n_lines(text))]
    tables: dict = {}
    for kind in KNOWN_CSV:
        p = d / f"output-{name}{kind}"
        if not p.is_file():
            continue
        table, ttext, traw = _read_csv(p, kind)
        tables[kind] = table
        files.append((p.name, hashlib.sha256(traw).hexdigest(), _n_lines(ttext)))
    if REQUIRED_CSV not in tables:
        raise JaxlensError(f"{d} lacks output-{name}{REQUIRED_CSV}, which the report needs; the probe output is incomplete")
    run = Run(d, name, JsonDoc(jpath.name, data, index), tables, sorted(files))
    run.n_layers  # noqa: B018 - validates model_stats.num_layers
    if not run.pass_rows(run.pure(), run.primary_key()):
        raise JaxlensError(f"output-{name}{REQUIRED_CSV} has no rows of the primary prompt "
                           f"({run.primary_key()[0]}, pos, orig); the probe output is incomplete")
    return run


def find_runs(paths: Iterable[str | Path]) -> list:
    """Expand the command's arguments: a probe directory stays; a directory without a probe output
    whose sub-directories are probe directories (``runs/``) gives those, sorted by name."""
    out: list = []
    for p in paths:
        d = Path(p)
        if d.is_dir() and not is_run_dir(d):
            subs = sorted(s for s in d.iterdir() if s.is_dir() and is_run_dir(s))
            if subs:
                out.extend(subs)
                continue
        out.append(d)
    return out


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def as_mapping(x: Any) -> Mapping:
    return x if isinstance(x, Mapping) else {}
