"""Prompt sets as data: JSONL / CSV / Parquet files, ``hf:NAME[:CONFIG][@SPLIT]`` datasets and the probe's
TOML suites, read into one :class:`PromptSet` before any model work.

Columns: ``prompt`` (required), ``answer`` (optional gold string, aligned as the probe aligns it),
``id`` (optional, unique; default the row number), ``control_answer`` (optional: a contrast answer; the
per-layer ``control_margin`` = P(answer) - P(control_answer), as the probe's control pass). Every other
column is carried through to the per-prompt table (renamed ``input.<name>`` where it would clash with an
output column). ``fields={"prompt": "question"}`` maps other column names onto these.

A malformed source is ONE :class:`~jaxlens.errors.JaxlensError` (a sentence naming the file, line or
column) raised here; a problem with one row is a row status instead (``empty_prompt``,
``prompt_not_text``, ``bad_answer``; the model adds ``empty_tokens``, ``too_long``, ``answer_unaligned``)
and the row stays in the output.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Any, Optional

from jaxlens.errors import JaxlensError

RESERVED = ("prompt", "answer", "id", "control_answer")
FORMATS = ("jsonl", "csv", "parquet", "hf", "toml")


@dataclasses.dataclass
class PromptRow:
    index: int                      # 0-based position in the prompt set
    id: str
    prompt: Optional[str]
    answer: Optional[str]
    control_answer: Optional[str]
    extra: dict
    status: str = "ok"              # input status; the engine may set a model status later
    detail: Optional[str] = None


@dataclasses.dataclass
class PromptSet:
    rows: list
    source: str
    kind: str
    sha256: str                     # of the canonical row content (format- and path-independent)
    extra_columns: list
    thresholds: Any = None          # a TOML suite's thresholds (None: the reference suite's)

    def __len__(self):
        return len(self.rows)

    def describe(self) -> dict:
        st: dict = {}
        for r in self.rows:
            st[r.status] = st.get(r.status, 0) + 1
        return {"source": self.source, "kind": self.kind, "rows": len(self.rows), "sha256": self.sha256,
                "extra_columns": list(self.extra_columns), "input_statuses": st}


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise JaxlensError("jaxlens sweep needs pyarrow: pip install 'jaxlens[sweep]' (or pip install pyarrow)")
    import pyarrow

    return pyarrow


def detect_kind(source: str) -> str:
    s = str(source)
    if s.startswith("hf:"):
        return "hf"
    if s.startswith("suite:"):
        return "toml"
    low = s.lower()
    for ext, kind in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".jsonl.txt", "jsonl"), (".csv", "csv"),
                      (".tsv", "csv"), (".parquet", "parquet"), (".pq", "parquet"), (".toml", "toml")):
        if low.endswith(ext):
            return kind
    raise JaxlensError(f"--prompts {source}: unknown format (use a .jsonl, .csv, .parquet or .toml file, "
                       "or hf:NAME[:CONFIG][@SPLIT])")


def read_prompts(source: str, *, fields: Optional[dict] = None) -> PromptSet:
    """Read a prompt set (see the module docstring). Raises JaxlensError for a malformed source."""
    source = str(source)
    kind = detect_kind(source)
    fields = dict(fields or {})
    bad = [k for k in fields if k not in RESERVED]
    if bad:
        raise JaxlensError(f"--field {bad[0]}=...: only {', '.join(RESERVED)} can be mapped")
    if kind == "toml":
        return _read_suite(source)
    if kind != "hf":
        path = os.path.expanduser(source)
        if not os.path.exists(path):
            raise JaxlensError(f"prompt file {source} does not exist")
        if os.path.isdir(path):
            raise JaxlensError(f"prompt file {source} is a directory")
        if os.path.getsize(path) == 0:
            raise JaxlensError(f"prompt file {source} is empty")
    if kind == "jsonl":
        records, columns = _read_jsonl(source)
    elif kind == "csv":
        records, columns = _read_arrow(source, "csv", fields)
    elif kind == "parquet":
        records, columns = _read_arrow(source, "parquet", fields)
    else:
        records, columns = _read_hf(source)
    if not records:
        raise JaxlensError(f"prompt file {source} holds no prompts")
    return build_set(records, columns, source=source, kind=kind, fields=fields)


# --------------------------------------------------------------------------------------------------
# readers -> (list of dicts, column names in order)


def _read_jsonl(path: str) -> tuple:
    records, columns = [], {}
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise JaxlensError(f"{path} line {lineno} is not valid JSON ({e.msg}, column {e.colno})")
                if not isinstance(obj, dict):
                    raise JaxlensError(f"{path} line {lineno} is not a JSON object (got {type(obj).__name__})")
                records.append(obj)
                for k in obj:
                    columns.setdefault(k, None)
    except UnicodeDecodeError as e:
        raise JaxlensError(f"{path} is not UTF-8 text (byte {e.start})")
    return records, list(columns)


def _read_arrow(path: str, kind: str, fields: dict) -> tuple:
    pa = _pyarrow()
    p = os.path.expanduser(path)
    try:
        if kind == "csv":
            import pyarrow.csv as pcsv

            names = [fields.get(k, k) for k in RESERVED]
            delim = "\t" if p.lower().endswith(".tsv") else ","
            table = pcsv.read_csv(p, parse_options=pcsv.ParseOptions(delimiter=delim),
                                  convert_options=pcsv.ConvertOptions(
                                      column_types={n: pa.string() for n in names},
                                      strings_can_be_null=False))
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(p)
    except pa.ArrowInvalid as e:
        msg = str(e).splitlines()[0]
        raise JaxlensError(f"{path} is not a readable {kind.upper() if kind == 'csv' else 'Parquet'} file ({msg})")
    except OSError as e:
        raise JaxlensError(f"{path} could not be read ({str(e).splitlines()[0] if str(e) else e.__class__.__name__})")
    return table.to_pylist(), list(table.column_names)


def parse_hf(spec: str) -> tuple:
    """``hf:NAME[:CONFIG][@SPLIT]`` -> (name, config or None, split) (the training data source's syntax)."""
    body = spec[3:]
    split = "train"
    if "@" in body:
        body, split = body.rsplit("@", 1)
    name, _, config = body.partition(":")
    if not name:
        raise JaxlensError(f"--prompts {spec}: expected hf:NAME[:CONFIG][@SPLIT]")
    return name, config or None, split


def _read_hf(spec: str) -> tuple:
    try:
        import datasets
    except ImportError:
        raise JaxlensError(f"--prompts {spec} needs the Hugging Face datasets package: pip install datasets")
    name, config, split = parse_hf(spec)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - hub / cache errors come in many classes
        raise JaxlensError(f"dataset {spec} could not be loaded ({e.__class__.__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})")
    records = [dict(r) for r in ds]
    columns: dict = {}
    for c in getattr(ds, "column_names", None) or []:
        columns.setdefault(c, None)
    for r in records:
        for k in r:
            columns.setdefault(k, None)
    return records, list(columns)


def _read_suite(source: str) -> PromptSet:
    from jaxlens.probe.suite import load_suite

    name = source[len("suite:"):] if source.startswith("suite:") else source
    suite = load_suite(name)
    primary_answer = suite.primary.answer
    records = []
    for p in suite.passes():
        rec = {"id": f"{p.prompt_id}/{p.fact_key if p.fact_key is not None else 'control'}/{p.variant}",
               "prompt": p.text, "answer": p.answer,
               "probe_prompt_id": p.prompt_id, "prompt_variant": p.variant, "fact_key": p.fact_key,
               "fact_index": p.fact_index}
        if p.is_control:
            rec["control_answer"] = primary_answer
        records.append(rec)
    cols = ["id", "prompt", "answer", "control_answer", "probe_prompt_id", "prompt_variant", "fact_key", "fact_index"]
    ps = build_set(records, cols, source=source, kind="toml", fields={})
    ps.thresholds = suite.thresholds
    return ps


# --------------------------------------------------------------------------------------------------
# rows


def _is_blank(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _text(v):
    """An answer cell as an optional string: None for a missing / empty cell, the text itself otherwise (a
    whitespace-only answer is kept: it cannot be aligned, which the row's status then says), str for numbers,
    else a TypeError."""
    if v is None or (isinstance(v, float) and math.isnan(v)) or v == "":
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        raise TypeError
    if isinstance(v, (int, float)):
        return str(v)
    raise TypeError


def build_set(records: list, columns: list, *, source: str, kind: str, fields: dict) -> PromptSet:
    col = {k: fields.get(k, k) for k in RESERVED}
    if col["prompt"] not in columns:
        seen = ", ".join(columns[:12]) + (" ..." if len(columns) > 12 else "")
        raise JaxlensError(f"{source} has no {col['prompt']!r} column (columns: {seen or 'none'})")
    used = set(col.values())
    extra = [c for c in columns if c not in used]
    rows, ids = [], {}
    for i, rec in enumerate(records):
        status, detail = "ok", None
        raw = rec.get(col["prompt"])
        prompt = None
        if _is_blank(raw):
            status, detail = "empty_prompt", "the prompt is empty"
        elif not isinstance(raw, str):
            status, detail = "prompt_not_text", f"the prompt is a {type(raw).__name__}, not text"
        else:
            prompt = raw
        answers = []
        for key in ("answer", "control_answer"):
            try:
                answers.append(_text(rec.get(col[key])))
            except TypeError:
                answers.append(None)
                if status == "ok":
                    status, detail = "bad_answer", f"the {key} is a {type(rec.get(col[key])).__name__}, not text"
        rid = rec.get(col["id"]) if col["id"] in columns else None
        if col["id"] in columns:
            if _is_blank(rid):
                raise JaxlensError(f"{source}: row {i + 1} has an empty {col['id']!r}")
            rid = str(rid)
        else:
            rid = str(i)
        if rid in ids:
            raise JaxlensError(f"{source}: id {rid!r} appears twice (rows {ids[rid] + 1} and {i + 1}); "
                               "ids must be unique")
        ids[rid] = i
        rows.append(PromptRow(index=i, id=rid, prompt=prompt, answer=answers[0], control_answer=answers[1],
                              extra={c: rec.get(c) for c in extra}, status=status, detail=detail))
    return PromptSet(rows=rows, source=source, kind=kind, sha256=content_hash(rows, extra), extra_columns=extra)


def _canon(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _canon(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_canon(x) for x in v]
    return str(v)


def content_hash(rows: list, extra: list) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(list(extra)).encode())
    for r in rows:
        h.update(json.dumps([r.id, r.prompt, r.answer, r.control_answer, r.status,
                             [_canon(r.extra.get(c)) for c in extra]], ensure_ascii=False,
                            default=str).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()
