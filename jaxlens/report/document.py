"""The report as a small document model, rendered to Markdown here and to HTML by :mod:`.html`.

Every number comes in as a :class:`~jaxlens.report.load.V` (value + citation). The rendering rules
(the tests parse them back):

* prose: ``name = value [file:line key]``; a JSON citation's key is a JSON Pointer (``/a/b/0``), a CSV
  citation's key a column name; a block spanning lines is cited ``file:first-last``;
* value tables (:class:`Table` ``mode="cells"``): the first column is a label, and the k-th value cell
  of a row (a cell holding a :class:`Val`) is cited by the k-th citation of the row's last column
  ``source`` (an absent value is written ``absent`` and has no citation);
* CSV-row tables (``mode="row"``): every column header is a CSV column name, and the ``source`` column
  cites the row's file and line once (``[file:line]``); a **bold** row is the layer named in the caption;
* values are written as in the file they come from: JSON ``true`` / ``false`` / ``null``, CSV ``True`` /
  ``False`` / ``blank``; strings as JSON string literals (``" Berlin"``); floats with 4 significant digits.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from jaxlens.report.load import ABSENT, Cite, V

__all__ = ["Block", "Bullets", "Code", "Doc", "Figure", "Heading", "Para", "Row", "Table", "Text", "Val",
           "fmt_value", "render_markdown"]


# --------------------------------------------------------------------------------------------------
# inline elements
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Code:
    text: str


@dataclass(frozen=True)
class Val:
    """A cited value. ``name``: shown as ``name = value`` in prose; ``quote``: strings as JSON literals."""
    v: V
    name: str = ""
    quote: bool = True


@dataclass(frozen=True)
class Mark:
    """✓ / ✗ / – of a checklist item."""
    ok: Optional[bool]


Inline = Union[Text, Code, Val, Mark, str]


def fmt_float(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    if x == 0:
        return "0"
    return f"{x:.4g}"


def fmt_value(v: V, quote: bool = True) -> str:
    """The value as written in the report (see the module docstring)."""
    if v.absent:
        return "absent"
    x = v.value
    csv_file = v.cite.file.endswith(".csv")
    if x is None:
        return "blank" if csv_file else "null"
    if isinstance(x, bool):
        return ("True" if x else "False") if csv_file else ("true" if x else "false")
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return fmt_float(x)
    if isinstance(x, str):
        return json.dumps(x, ensure_ascii=False) if quote else x
    if isinstance(x, (list, dict)):
        return json.dumps(x, ensure_ascii=False, separators=(", ", ": "))
    return str(x)


# --------------------------------------------------------------------------------------------------
# blocks
# --------------------------------------------------------------------------------------------------

@dataclass
class Heading:
    level: int
    text: str
    anchor: str = ""


@dataclass
class Para:
    parts: list


@dataclass
class Bullets:
    items: list                      # list of lists of inlines


@dataclass
class Row:
    cells: list                      # one inline or a list of inlines per column
    bold: bool = False
    cite: Optional[Cite] = None      # mode "row": the CSV row


@dataclass
class Table:
    header: list
    rows: list
    mode: str = "cells"              # "cells" | "row" | "plain" (no source column: nothing cited)
    caption: list = field(default_factory=list)


@dataclass
class Figure:
    name: str                        # PNG file name (fig-*.png)
    caption: str
    svg_key: str = ""                # which interactive SVG the HTML draws ("" = none)
    png: bool = True                 # a PNG of it is written


Block = Union[Heading, Para, Bullets, Table, Figure]


@dataclass
class Doc:
    title: str
    blocks: list = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------

# CommonMark: "_" inside a word and "[...]" without a link target stay literal, so key names and
# citations are written as they are
_MD_SPECIAL = str.maketrans({"\\": "\\\\", "*": "\\*", "`": "\\`"})
_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")


def md_text(s: str) -> str:
    return _TAG_START.sub("&lt;", s.translate(_MD_SPECIAL))


def md_code(s: str) -> str:
    tick = "``" if "`" in s else "`"
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{tick}{pad}{s}{pad}{tick}"


def _cells(c) -> list:
    return list(c) if isinstance(c, (list, tuple)) else [c]


def md_inline(parts: Sequence[Inline], *, in_table: bool = False, cite: bool = True) -> str:
    out = []
    for p in parts:
        if isinstance(p, str):
            p = Text(p)
        if isinstance(p, Text):
            out.append(md_text(p.text))
        elif isinstance(p, Code):
            out.append(md_code(p.text))
        elif isinstance(p, Mark):
            out.append("✓" if p.ok else ("✗" if p.ok is False else "–"))
        elif isinstance(p, Val):
            val = fmt_value(p.v, p.quote)
            shown = md_code(val) if isinstance(p.v.value, str) and p.quote else md_text(val)
            if p.name:
                shown = f"{md_code(p.name)} = {shown}"
            if cite and not in_table and p.v.cite is not None:
                shown += " " + p.v.cite.text()
            out.append(shown)
        else:  # pragma: no cover - builder error
            raise TypeError(f"not an inline element: {p!r}")
    s = "".join(out)
    if in_table:
        s = s.replace("|", "\\|").replace("\n", " ")
    return s


def row_citations(row: Row) -> list:
    cites = []
    for c in row.cells:
        for p in _cells(c):
            if isinstance(p, Val) and p.v.cite is not None:
                cites.append(p.v.cite)
    return cites


def _md_table(t: Table) -> list:
    lines = []
    if t.caption:
        lines += [md_inline(t.caption), ""]
    header = [md_code(h) if t.mode == "row" else md_text(h) for h in t.header] + (["source"] if t.mode != "plain" else [])
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for r in t.rows:
        cells = []
        for c in r.cells:
            s = md_inline(_cells(c), in_table=True)
            if r.bold and s:
                s = f"**{s}**"
            cells.append(s)
        if t.mode == "row":
            cells.append(r.cite.text(with_key=False) if r.cite else "")
        elif t.mode == "cells":
            cells.append(" ".join(c.text() for c in row_citations(r)).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(doc: Doc, *, png: bool = True) -> str:
    lines = [f"# {md_text(doc.title)}", ""]
    for b in doc.blocks:
        if isinstance(b, Heading):
            lines += ["#" * (b.level + 1) + " " + md_text(b.text), ""]
        elif isinstance(b, Para):
            lines += [md_inline(b.parts), ""]
        elif isinstance(b, Bullets):
            lines += ["- " + md_inline(item) for item in b.items] + [""]
        elif isinstance(b, Table):
            lines += _md_table(b) + [""]
        elif isinstance(b, Figure):
            if png and b.png:
                lines += [f"![{md_text(b.caption)}]({b.name})", "", f"*{md_text(b.caption)}* ({md_code(b.name)})", ""]
            else:
                lines += [f"*{md_text(b.caption)}* (figure not written: PNG output was not requested)", ""]
        else:  # pragma: no cover
            raise TypeError(f"not a block: {b!r}")
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def absent(reason: str = "") -> Val:
    return Val(ABSENT)
