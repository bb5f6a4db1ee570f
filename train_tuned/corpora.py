"""Real English text that every jaxlens installation already has, for fitting and evaluating lenses offline.

* ``python-docs``: the docstrings of Python's standard library (module, class and function docstrings of at
  least 200 characters, read with :mod:`ast` from the library's source files, never imported), in sorted
  file order. Technical English prose written by many authors over decades; ~1.1 MB on CPython 3.11.
* ``licenses``: the license texts that the installed distributions ship in their ``*.dist-info``
  (``LICENSE*``, ``COPYING*``, ``NOTICE*``), each distinct text once, in sorted order. Legal English: another
  source and register than the docstrings, so a lens fitted on one and evaluated on the other is tested
  out of distribution.

Both are written as text files whose documents are separated by blank lines (the format ``jaxlens
train-lens --data FILE`` reads). ``python -m train_tuned.corpora --out DIR`` writes ``DIR/python-docs.txt``
and ``DIR/licenses.txt`` and prints their sizes and sha256 (recorded in a lens card by ``train-lens``).
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import os
import sysconfig

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__",
              "turtledemo", "tkinter", "ensurepip"}
MIN_DOC_CHARS = 200


def _clean(text: str) -> str:
    # one document per docstring: blank lines inside a docstring would split it into several
    lines = [ln.rstrip() for ln in text.strip().splitlines()]
    return "\n".join(ln for ln in lines if ln.strip())


def python_docs(stdlib: str | None = None) -> list:
    """Docstrings (>= 200 characters) of the standard library's source files, in sorted path order."""
    root = stdlib or sysconfig.get_paths()["stdlib"]
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= MIN_DOC_CHARS:
                        docs.append(_clean(doc))
    return docs


def licenses() -> list:
    """Distinct license texts of the installed distributions, sorted by (distribution, file name)."""
    found = []
    for dist in importlib.metadata.distributions():
        for f in dist.files or ():
            path = str(f)
            base = os.path.basename(path).upper()
            if ".dist-info" in path and base.startswith(("LICENSE", "COPYING", "NOTICE")):
                try:
                    with open(dist.locate_file(f), encoding="utf-8") as fh:
                        text = fh.read()
                except (OSError, UnicodeDecodeError):
                    continue
                found.append(((dist.metadata["Name"] or "").lower(), base, _clean(text)))
    seen, out = set(), []
    for _, _, text in sorted(found):
        h = hashlib.sha256(text.encode()).hexdigest()
        if text and h not in seen:
            seen.add(h)
            out.append(text)
    return out


CORPORA = {"python-docs": python_docs, "licenses": licenses}


def write(out_dir: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    info = {}
    for name, fn in CORPORA.items():
        text = "\n\n".join(fn()) + "\n"
        path = os.path.join(out_dir, f"{name}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        info[name] = {"path": path, "chars": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train_tuned.corpora", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for python-docs.txt and licenses.txt")
    args = ap.parse_args(argv)
    for name, i in write(args.out).items():
        print(f"{name}: {i['chars']:,} characters, sha256 {i['sha256']}  {i['path']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
