"""report.html: the same document as report.md, one self-contained file that works offline.

Inline CSS, inline SVG figures (:mod:`.svg`) and a few lines of inline JavaScript (hover values,
probability / entropy colouring of the heatmaps). A Content-Security-Policy meta tag forbids every
network fetch (``default-src 'none'``), so the page cannot load anything even if a value in it looked
like a URL. No timestamps: the bytes depend only on the run.
"""
from __future__ import annotations

from html import escape
from typing import Mapping, Optional, Sequence

from jaxlens.report.document import (Bullets, Code, Doc, Figure, Heading, Mark, Para, Table, Text, Val,
                                     fmt_value, row_citations)

__all__ = ["render_html", "CSP"]

CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"

_CSS = """
body{font:15px/1.5 -apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#1b1b1b;margin:0;background:#fff}
main{max-width:1120px;margin:0 auto;padding:8px 28px 60px}
nav{position:sticky;top:0;background:#f6f8fa;border-bottom:1px solid #d0d7de;padding:6px 28px;font-size:13px;z-index:2}
nav a{margin-right:14px;color:#0550ae;text-decoration:none}
h1{font-size:26px;margin:18px 0 8px}h2{font-size:21px;border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:34px}
h3{font-size:17px;margin-top:24px}
code{font:13px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f3f4f6;padding:0 3px;border-radius:3px}
.cite{font:11px ui-monospace,Menlo,Consolas,monospace;color:#6e7781;white-space:nowrap}
.v{font-weight:600}
table{border-collapse:collapse;margin:10px 0 16px;font-size:13px}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa}tr.bold td{font-weight:700;background:#fff8c5}
td.src{max-width:460px}td .cite{white-space:normal;word-break:break-all}
.ok{color:#1a7f37;font-weight:700}.no{color:#cf222e;font-weight:700}.na{color:#6e7781}
figure{margin:18px 0 26px}figcaption{font-size:13px;color:#444;margin-top:4px}
.figwrap{overflow-x:auto;border:1px solid #eaeef2;padding:6px}
svg.chart{font-family:"DejaVu Sans",Verdana,sans-serif;display:block;max-width:100%;height:auto}
svg .pt{font-size:12px;text-anchor:middle;font-weight:600}svg .tk{font-size:10px;fill:#333}
svg .al{font-size:11px;fill:#111}svg .lg{font-size:10.5px;fill:#111}svg .ct{font-size:10px;text-anchor:middle}
svg .grid{stroke:#000;stroke-opacity:.1}svg .ax{stroke:#333;fill:none}
svg .hit{fill:transparent;cursor:crosshair}svg .hit:hover{fill:#0003}
svg .cell rect:hover{stroke:#000;stroke-width:2}
svg .m-copy{stroke:#555;stroke-dasharray:2 3;stroke-width:1.4}svg .m-sem{stroke:#000;stroke-dasharray:7 3;stroke-width:1.2}
svg .m-conf{stroke:#C00000;stroke-opacity:.22;stroke-width:8}svg .thr{stroke:#777;stroke-dasharray:3 3}
.btns{margin:4px 0}.btns button{font-size:12px;margin-right:6px;padding:2px 8px;border:1px solid #8c959f;
background:#f6f8fa;border-radius:4px;cursor:pointer}.btns button.on{background:#0969da;color:#fff;border-color:#0969da}
#tip{position:absolute;display:none;pointer-events:none;background:#24292f;color:#fff;font:12px ui-monospace,Menlo,monospace;
padding:5px 8px;border-radius:4px;max-width:560px;white-space:pre-wrap;z-index:10}
"""

_JS = """
(function(){
  var tip=document.getElementById('tip');
  function show(e){var t=e.target.closest?e.target.closest('[data-tip]'):null;
    if(!t){tip.style.display='none';return;}
    tip.textContent=t.getAttribute('data-tip');tip.style.display='block';move(e);}
  function move(e){tip.style.left=(e.pageX+14)+'px';tip.style.top=(e.pageY+14)+'px';}
  document.addEventListener('mouseover',show);document.addEventListener('mousemove',function(e){
    if(tip.style.display==='block')move(e);});
  function mode(fig,m){
    fig.querySelectorAll('rect[data-fp]').forEach(function(r){r.setAttribute('fill',r.getAttribute(m==='h'?'data-fh':'data-fp'));});
    fig.querySelectorAll('text[data-tp]').forEach(function(t){t.setAttribute('fill',t.getAttribute(m==='h'?'data-th':'data-tp'));});
    fig.querySelectorAll('.cbar-p').forEach(function(g){g.style.display=m==='h'?'none':'';});
    fig.querySelectorAll('.cbar-h').forEach(function(g){g.style.display=m==='h'?'':'none';});
    fig.querySelectorAll('button[data-mode]').forEach(function(b){b.className=b.getAttribute('data-mode')===m?'on':'';});
  }
  document.querySelectorAll('figure[data-heatmap]').forEach(function(fig){
    fig.querySelectorAll('button[data-mode]').forEach(function(b){
      b.addEventListener('click',function(){mode(fig,b.getAttribute('data-mode'));});});});
  document.body.setAttribute('data-ready',String(document.querySelectorAll('[data-tip]').length));
})();
"""


def _e(s: str) -> str:
    return escape(str(s), quote=True)


def _cite_html(c) -> str:
    return f'<span class="cite">{_e(c.text())}</span>'


def _inline(parts: Sequence, *, in_table: bool = False) -> str:
    out = []
    for p in parts if isinstance(parts, (list, tuple)) else [parts]:
        if isinstance(p, str):
            p = Text(p)
        if isinstance(p, Text):
            out.append(_e(p.text))
        elif isinstance(p, Code):
            out.append(f"<code>{_e(p.text)}</code>")
        elif isinstance(p, Mark):
            out.append({True: '<span class="ok">✓</span>', False: '<span class="no">✗</span>'}.get(
                p.ok, '<span class="na">–</span>'))
        elif isinstance(p, Val):
            val = fmt_value(p.v, p.quote)
            shown = f"<code>{_e(val)}</code>" if isinstance(p.v.value, str) and p.quote else f'<span class="v">{_e(val)}</span>'
            if p.name:
                shown = f"<code>{_e(p.name)}</code> = {shown}"
            if not in_table and p.v.cite is not None:
                shown += " " + _cite_html(p.v.cite)
            out.append(shown)
        else:  # pragma: no cover
            raise TypeError(f"not an inline element: {p!r}")
    return "".join(out)


def _table(t: Table) -> str:
    out = []
    if t.caption:
        out.append(f"<p>{_inline(t.caption)}</p>")
    out.append("<table><thead><tr>")
    for h in t.header:
        out.append(f"<th><code>{_e(h)}</code></th>" if t.mode == "row" else f"<th>{_e(h)}</th>")
    if t.mode != "plain":
        out.append("<th>source</th>")
    out.append("</tr></thead><tbody>")
    for r in t.rows:
        out.append('<tr class="bold">' if r.bold else "<tr>")
        for c in r.cells:
            out.append(f"<td>{_inline(c, in_table=True)}</td>")
        if t.mode == "row":
            out.append(f'<td class="src"><span class="cite">{_e(r.cite.text(with_key=False)) if r.cite else ""}</span></td>')
        elif t.mode == "cells":
            out.append('<td class="src">' + " ".join(_cite_html(c) for c in row_citations(r)) + "</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _figure(f: Figure, svgs: Mapping[str, str], png: bool) -> str:
    svg = svgs.get(f.svg_key)
    heat = f.svg_key.startswith("heatmap-")
    attrs = ' data-heatmap="1"' if heat else ""
    btns = ('<div class="btns">colour: <button data-mode="p" class="on">probability</button>'
            '<button data-mode="h">entropy</button></div>') if heat and svg else ""
    body = f'<div class="figwrap">{svg}</div>' if svg else "<p>(no interactive version)</p>"
    png_note = f" PNG: <code>{_e(f.name)}</code>." if png and f.png else ""
    return (f"<figure{attrs}>{btns}{body}<figcaption>{_e(f.caption)} Hover a point or cell for its value and CSV "
            f"line.{png_note}</figcaption></figure>")


def render_html(doc: Doc, svgs: Mapping[str, str], *, png: bool = True, nav: Optional[Sequence] = None) -> str:
    """The whole page. ``svgs``: {svg key: markup} for the document's :class:`Figure` blocks."""
    body = []
    toc = []
    for b in doc.blocks:
        if isinstance(b, Heading):
            tag = "h2" if b.level == 1 else "h3"
            anchor = f' id="{_e(b.anchor)}"' if b.anchor else ""
            body.append(f"<{tag}{anchor}>{_e(b.text)}</{tag}>")
            if b.level == 1 and b.anchor:
                toc.append((b.anchor, b.text))
        elif isinstance(b, Para):
            body.append(f"<p>{_inline(b.parts)}</p>")
        elif isinstance(b, Bullets):
            body.append("<ul>" + "".join(f"<li>{_inline(it)}</li>" for it in b.items) + "</ul>")
        elif isinstance(b, Table):
            body.append(_table(b))
        elif isinstance(b, Figure):
            body.append(_figure(b, svgs, png))
    links = "".join(f'<a href="#{_e(a)}">{_e(t)}</a>' for a, t in (nav if nav is not None else toc))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_e(doc.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<nav>{links}</nav>\n<main>\n<h1>{_e(doc.title)}</h1>\n" + "\n".join(body)
            + "\n</main>\n<div id=\"tip\"></div>\n<script>" + _JS + "</script>\n</body>\n</html>\n")
