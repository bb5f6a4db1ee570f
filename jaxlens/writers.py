"""Output writers for the reference probe's file set (spec/probe.md §5).

CSV cells are formatted exactly as the reference's ``csv.writer`` wrote them (comma separator,
minimal quoting with ``"``, escape character ``\\``, ``\\n`` line ends, UTF-8):

* ``None`` → empty cell; booleans (Python or numpy) → ``True`` / ``False``;
* integers (Python or numpy) → decimal digits;
* floats → ``repr`` of the value widened to float64 (a float32 ``0.1`` is ``0.10000000149011612``,
  NaN/inf are ``nan`` / ``inf`` / ``-inf``);
* strings as they are; a cell is quoted when it holds ``,``, ``"``, ``\\n`` or ``\\r`` (quotes are
  doubled), and a backslash is written as ``\\\\`` without quoting.

The quoting rules are implemented here rather than delegated to :mod:`csv` so that the bytes do not
depend on the Python version (CPython before 3.12-ish writes a bare ``\\r`` unquoted, which cannot be
read back); for every cell without ``\\r`` they are the ones of ``csv.writer`` with this dialect.

JSON is written like the reference's ``json.dump(obj, f, indent=2, ensure_ascii=False)`` (insertion
order, NaN as ``NaN``, no trailing newline) after numpy / JAX values are converted to Python ones.

Every file is written atomically: :class:`OutputSet` writes a whole file set to hidden temporary
files in the target directory and renames them into place only when the ``with`` block succeeds.
"""
from __future__ import annotations

import importlib.resources
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

__all__ = [
    "CSV_HEADERS", "OutputSet", "copy_flag_columns", "csv_filename", "csv_key", "dumps_json",
    "format_cell", "format_row", "header", "iter_csv_lines", "json_filename", "parse_cell", "render_csv",
    "to_jsonable", "write_csv", "write_json", "write_text",
]

# --------------------------------------------------------------------------------------------------
# Headers
# --------------------------------------------------------------------------------------------------


def _load_headers() -> dict[str, list[str]]:
    text = (importlib.resources.files("jaxlens") / "data" / "csv_headers.json").read_text(encoding="utf-8")
    raw = json.loads(text)
    return {str(k): [str(c) for c in v] for k, v in raw.items()}


#: file-name suffix (as in the reference's csv-headers.json, e.g. ``"-pure-next-token.csv"``) →
#: column names in order. Treat as read-only; :func:`header` hands out copies.
CSV_HEADERS: dict[str, list[str]] = _load_headers()

_COPY_BLOCK_START = "copy_collapse"      # the copy-flag block follows this column ...
_COPY_BLOCK_END = "entropy_collapse"     # ... and ends just before this one


def csv_key(name: str) -> str:
    """Canonical key of a CSV kind: accepts ``"-pure-next-token.csv"``, ``"pure-next-token.csv"`` or
    ``"pure-next-token"``; raises ``KeyError`` for an unknown kind."""
    if name in CSV_HEADERS:
        return name
    stem = name[:-4] if name.endswith(".csv") else name
    key = "-" + stem.lstrip("-") + ".csv"
    if key not in CSV_HEADERS:
        raise KeyError(f"unknown CSV kind {name!r}; known: {', '.join(CSV_HEADERS)}")
    return key


def _copy_block(cols: list[str]) -> tuple[int, int] | None:
    if _COPY_BLOCK_START in cols and _COPY_BLOCK_END in cols:
        i, j = cols.index(_COPY_BLOCK_START) + 1, cols.index(_COPY_BLOCK_END)
        if i <= j:
            return i, j
    return None


def copy_flag_columns(name: str = "-pure-next-token.csv") -> list[str]:
    """The copy-flag block of a pure next-token header as stored in the header file (the columns
    between ``copy_collapse`` and ``entropy_collapse``; the reference's default thresholds:
    ``copy_strict@0.95, @0.7, @0.8, @0.9, copy_soft_k1@0.5, k2, k3``)."""
    key = csv_key(name)
    cols = CSV_HEADERS[key]
    span = _copy_block(cols)
    if span is None:
        raise ValueError(f"CSV kind {key!r} has no copy-flag block")
    return list(cols[span[0]:span[1]])


def header(name: str, copy_flag_columns: Sequence[str] | None = None) -> list[str]:
    """Column names of CSV kind ``name`` (see :func:`csv_key`), a fresh list.

    ``copy_flag_columns`` (the run's ``copy_flag_columns`` list, spec §2.3) replaces the copy-flag
    block of the pure next-token headers (norm / tuned / prism); it is needed only when the copy
    thresholds differ from the reference defaults. Passing it for a kind without the block raises
    ``ValueError``."""
    key = csv_key(name)
    cols = list(CSV_HEADERS[key])
    if copy_flag_columns is None:
        return cols
    span = _copy_block(cols)
    if span is None:
        raise ValueError(f"CSV kind {key!r} has no copy-flag block; copy_flag_columns does not apply")
    flags = [str(c) for c in copy_flag_columns]
    out = cols[:span[0]] + flags + cols[span[1]:]
    dup = sorted({c for c in out if out.count(c) > 1})
    if dup:
        raise ValueError(f"copy_flag_columns would duplicate column(s) {dup}")
    return out


def csv_filename(clean: str, name: str) -> str:
    """``output-<clean><suffix>``, e.g. ``csv_filename("Qwen3-14B", "milestones")`` →
    ``"output-Qwen3-14B-milestones.csv"``."""
    return f"output-{clean}{csv_key(name)}"


def json_filename(clean: str) -> str:
    return f"output-{clean}.json"


# --------------------------------------------------------------------------------------------------
# CSV cells
# --------------------------------------------------------------------------------------------------

_NEEDS_QUOTES = re.compile(r'[,"\n\r]')


def _scalar(value: Any) -> Any:
    """numpy / JAX scalar (or 0-d array) → the equivalent Python scalar; anything else unchanged."""
    if isinstance(value, np.generic):
        kind = value.dtype.kind
        if kind == "b":
            return bool(value)
        if kind in "iu":
            return int(value)
        if kind == "f":
            return float(value)          # float16/32/64 widened exactly to float64
        if kind in "US":
            return value.item()
        try:                             # ml_dtypes (bfloat16, float8 …) report kind 'V'
            return float(value)
        except (TypeError, ValueError):
            return value
    if not isinstance(value, (str, bytes, int, float)) and hasattr(value, "__array__") \
            and getattr(value, "shape", None) == ():
        return _scalar(np.asarray(value)[()])
    return value


def format_cell(value: Any) -> str:
    """Text of one CSV cell before quoting (what ``csv.writer`` would ``str()``)."""
    t = type(value)                      # fast paths for the plain Python cells that make up most rows
    if t is float:
        return repr(value)
    if t is str:
        return value
    if value is None:
        return ""
    value = _scalar(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return repr(float(value))
    raise TypeError(f"cannot write a {type(value).__name__} to a CSV cell: {value!r}")


def _quote(text: str) -> str:
    if "\\" in text:
        text = text.replace("\\", "\\\\")
    if _NEEDS_QUOTES.search(text):
        return '"' + text.replace('"', '""') + '"'
    return text


def format_row(cells: Sequence[Any]) -> str:
    """One CSV record, line terminator included."""
    parts = [_quote(format_cell(c)) if type(c) is not float else repr(c) for c in cells]   # a float repr needs no quoting
    if len(parts) == 1 and parts[0] == "":
        parts[0] = '""'                  # csv.writer: a lone empty field is quoted
    return ",".join(parts) + "\n"


_INT_RE = re.compile(r"-?(?:0|[1-9][0-9]*)")


def parse_cell(text: str) -> Any:
    """Inverse of :func:`format_cell` for cells read with ``csv.reader`` (same dialect): ``""`` →
    None, ``True``/``False`` → bool, canonical integers → int, canonical float reprs (incl.
    ``nan``/``inf``) → float, anything else → the string. Only canonical spellings are converted
    (``" 1"``, ``"007"`` or ``"1.50"`` stay strings), so ``format_cell(parse_cell(s)) == s``."""
    if text == "":
        return None
    if text == "True":
        return True
    if text == "False":
        return False
    if _INT_RE.fullmatch(text):
        return int(text)
    if text[:1] in "-0123456789.in":
        try:
            f = float(text)
        except ValueError:
            return text
        if repr(f) == text:
            return f
    return text


# --------------------------------------------------------------------------------------------------
# CSV files
# --------------------------------------------------------------------------------------------------

def _row_cells(row: Any, cols: list[str], colset: frozenset[str], key: str, index: int) -> Sequence[Any]:
    if isinstance(row, Mapping):
        unknown = [k for k in row if k not in colset]
        if unknown:
            raise ValueError(f"{key} row {index}: unknown column(s) {unknown!r}")
        return [row.get(c) for c in cols]
    if isinstance(row, (str, bytes)) or not isinstance(row, (Sequence, np.ndarray)):
        raise TypeError(f"{key} row {index}: expected a dict or a list of cells, got {type(row).__name__}")
    if len(row) != len(cols):
        raise ValueError(f"{key} row {index}: {len(row)} cells for {len(cols)} columns")
    return row


def iter_csv_lines(name: str, rows: Iterable[Any], *, copy_flag_columns: Sequence[str] | None = None,
                   columns: Sequence[str] | None = None) -> Iterable[str]:
    """Header line then one line per row. ``rows`` are dicts keyed by column (missing → blank,
    unknown → ``ValueError``) or sequences in header order (exact length). ``columns`` overrides the
    header entirely (for callers that need a non-standard file)."""
    cols = list(columns) if columns is not None else header(name, copy_flag_columns)
    key = name if columns is not None else csv_key(name)
    colset = frozenset(cols)
    yield format_row(cols)
    for i, row in enumerate(rows):
        yield format_row(_row_cells(row, cols, colset, key, i))


def render_csv(name: str, rows: Iterable[Any], *, copy_flag_columns: Sequence[str] | None = None,
               columns: Sequence[str] | None = None) -> str:
    """Whole CSV file text (see :func:`iter_csv_lines`)."""
    return "".join(iter_csv_lines(name, rows, copy_flag_columns=copy_flag_columns, columns=columns))


def _stream_csv(f: BinaryIO, lines: Iterable[str], chunk: int = 2048) -> None:
    buf: list[str] = []
    for line in lines:
        buf.append(line)
        if len(buf) >= chunk:
            f.write("".join(buf).encode("utf-8"))
            buf.clear()
    if buf:
        f.write("".join(buf).encode("utf-8"))


# --------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------

def _json_key(key: Any, where: str) -> Any:
    key = _scalar(key)
    if key is None or isinstance(key, (str, bool, int, float)):
        return key
    raise TypeError(f"JSON key at {where or '<root>'} has unsupported type {type(key).__name__}: {key!r}")


def to_jsonable(obj: Any, _where: str = "") -> Any:
    """Plain-Python copy of ``obj`` for :mod:`json`: numpy / JAX scalars and arrays → bool, int,
    float (float32 widened to float64) and nested lists; tuples → lists; sets → sorted lists;
    path-like → str; mappings keep their insertion order. Other types raise ``TypeError`` naming the
    location."""
    if obj is None:
        return None
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, np.generic):
        v = _scalar(obj)
        if isinstance(v, np.generic):
            raise TypeError(f"unsupported numpy value at {_where or '<root>'}: {obj!r}")
        return to_jsonable(v, _where)
    if isinstance(obj, Mapping):
        out: dict[Any, Any] = {}
        for k, v in obj.items():
            jk = _json_key(k, _where)
            out[jk] = to_jsonable(v, f"{_where}.{k}" if _where else str(k))
        return out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{_where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray) or (hasattr(obj, "__array__") and hasattr(obj, "shape")
                                       and hasattr(obj, "dtype")):
        arr = np.asarray(obj)
        if arr.shape == ():
            return to_jsonable(arr[()], _where)
        return [to_jsonable(v, f"{_where}[{i}]") for i, v in enumerate(list(arr))]
    if isinstance(obj, (set, frozenset)):
        items = [to_jsonable(v, f"{_where}{{}}") for v in obj]
        try:
            return sorted(items)
        except TypeError:
            return sorted(items, key=lambda v: (type(v).__name__, json.dumps(v, sort_keys=True)))
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot write a {type(obj).__name__} to JSON at {_where or '<root>'}: {obj!r}")


def dumps_json(obj: Any) -> str:
    """Text of a JSON output file: ``json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False)``
    (NaN / Infinity as Python's json writes them; no trailing newline, like ``json.dump``)."""
    return json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False)


# --------------------------------------------------------------------------------------------------
# Atomic file sets
# --------------------------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class OutputSet:
    """A set of output files that appear together or not at all.

    ::

        with OutputSet(out_dir) as out:
            out.json("output-M.json", obj)
            out.csv("output-M-pure-next-token.csv", "pure-next-token", rows)
            out.text("evaluation-M.md", "")
        out.paths   # final paths, sorted by file name

    Each file is written (and fsync'ed) to a hidden temporary ``.<name>.tmp-<pid>`` in ``out_dir``
    (created with its parents). When the block exits normally, the files are renamed into place with
    ``os.replace`` in sorted name order and the directory is fsync'ed; until then existing files of
    the same names are untouched. When the block raises, every temporary file is removed and nothing
    new appears. A write that fails inside the block (bad row, unserialisable JSON) removes its own
    temporary file before the exception propagates, so catching it leaves the rest of the set
    intact. A set cannot be reused after it exits.
    """

    def __init__(self, out_dir: str | os.PathLike[str]):
        self.out_dir = Path(out_dir)
        self.paths: list[Path] = []
        self._pending: dict[str, Path] = {}
        self._state = "new"

    # context manager ------------------------------------------------------------------------------
    def __enter__(self) -> "OutputSet":
        if self._state != "new":
            raise RuntimeError("an OutputSet can be entered only once")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._state = "open"
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self._discard()
            self._state = "failed"
            return False
        try:
            self._commit()
        except BaseException:
            self._discard()
            self._state = "failed"
            raise
        self._state = "done"
        return False

    # writers --------------------------------------------------------------------------------------
    def csv(self, filename: str, name: str, rows: Iterable[Any], *,
            copy_flag_columns: Sequence[str] | None = None, columns: Sequence[str] | None = None) -> Path:
        """CSV kind ``name`` (see :func:`header`) with ``rows`` (see :func:`iter_csv_lines`)."""
        lines = iter_csv_lines(name, rows, copy_flag_columns=copy_flag_columns, columns=columns)
        return self._write(filename, lambda f: _stream_csv(f, lines))

    def json(self, filename: str, obj: Any) -> Path:
        text = dumps_json(obj)            # serialise before touching the disk
        return self._write(filename, lambda f: f.write(text.encode("utf-8")))

    def text(self, filename: str, text: str) -> Path:
        data = str(text).encode("utf-8")
        return self._write(filename, lambda f: f.write(data))

    def binary(self, filename: str, data: bytes) -> Path:
        data = bytes(data)
        return self._write(filename, lambda f: f.write(data))

    # internals ------------------------------------------------------------------------------------
    def _write(self, filename: str, fill: Callable[[BinaryIO], Any]) -> Path:
        if self._state != "open":
            raise RuntimeError("OutputSet writers are usable only inside its `with` block")
        if not filename or filename in (".", "..") or "/" in filename or os.sep in filename \
                or (os.altsep and os.altsep in filename):
            raise ValueError(f"output file name must be a plain name, got {filename!r}")
        if filename in self._pending:
            raise ValueError(f"{filename!r} written twice in one OutputSet")
        tmp, fd = self._open_tmp(filename)
        self._pending[filename] = tmp
        try:
            with os.fdopen(fd, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            del self._pending[filename]
            _unlink(tmp)
            raise
        return self.out_dir / filename

    def _open_tmp(self, filename: str) -> tuple[Path, int]:
        base = f".{filename}.tmp-{os.getpid()}"
        for k in range(1000):
            tmp = self.out_dir / (base if k == 0 else f"{base}-{k}")
            try:
                return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                continue
        raise FileExistsError(f"cannot create a temporary file for {filename!r} in {self.out_dir}")

    def _commit(self) -> None:
        for filename in sorted(self._pending):
            final = self.out_dir / filename
            os.replace(self._pending.pop(filename), final)
            self.paths.append(final)
        _fsync_dir(self.out_dir)

    def _discard(self) -> None:
        for tmp in self._pending.values():
            _unlink(tmp)
        self._pending.clear()


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------------------------------
# Single-file helpers (each atomic on its own)
# --------------------------------------------------------------------------------------------------

def write_csv(path: str | os.PathLike[str], name: str, rows: Iterable[Any], *,
              copy_flag_columns: Sequence[str] | None = None) -> Path:
    """Write CSV kind ``name`` to ``path`` atomically. ``rows``: dicts keyed by column (missing keys
    → blank; unknown keys → ``ValueError`` naming them) or sequences in header order."""
    path = Path(path)
    with OutputSet(path.parent) as out:
        out.csv(path.name, name, rows, copy_flag_columns=copy_flag_columns)
    return path


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as JSON (see :func:`dumps_json`) to ``path`` atomically."""
    path = Path(path)
    with OutputSet(path.parent) as out:
        out.json(path.name, obj)
    return path


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    path = Path(path)
    with OutputSet(path.parent) as out:
        out.text(path.name, text)
    return path
