"""A JSON reader that remembers where every value sits: key path (RFC 6901 JSON Pointer) → lines.

The probe writes its JSON like ``json.dump(obj, f, indent=2, ensure_ascii=False)`` (NaN as ``NaN``), so
a scalar sits on the line of its key and a container spans the lines from its key to its closing
bracket. :func:`parse_with_lines` returns the same Python object as :func:`json.loads` and an index
``{pointer: (first_line, last_line)}`` (1-based), where ``first_line`` is the line of the member's key
(or of the element for list items). The report cites these lines; the tests read them back.
"""
from __future__ import annotations

import bisect
import json
import re
from typing import Any

__all__ = ["JsonSyntaxError", "parse_with_lines", "pointer", "resolve", "split_pointer"]

_WS = re.compile(r"[ \t\n\r]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_CONSTANTS = (("true", True), ("false", False), ("null", None), ("NaN", float("nan")),
              ("Infinity", float("inf")), ("-Infinity", float("-inf")))
_scanstring = json.decoder.scanstring  # type: ignore[attr-defined]


class JsonSyntaxError(ValueError):
    """Not valid JSON; ``line`` / ``column`` (1-based) say where the reader gave up."""

    def __init__(self, msg: str, line: int, column: int):
        super().__init__(f"{msg} at line {line}, column {column}")
        self.line, self.column = line, column


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def pointer(*parts: Any) -> str:
    """JSON Pointer of ``parts`` (strings are keys, ints are list indices): ``pointer("a", 0, "b/c")``
    is ``"/a/0/b~1c"``."""
    return "".join("/" + _escape(str(p)) for p in parts)


def split_pointer(ptr: str) -> list[str]:
    if ptr == "":
        return []
    if not ptr.startswith("/"):
        raise ValueError(f"not a JSON pointer: {ptr!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in ptr[1:].split("/")]


def resolve(obj: Any, ptr: str) -> Any:
    """The value at ``ptr`` in ``obj``; ``KeyError`` when a step does not exist."""
    cur = obj
    for tok in split_pointer(ptr):
        if isinstance(cur, dict):
            if tok not in cur:
                raise KeyError(ptr)
            cur = cur[tok]
        elif isinstance(cur, list):
            if not tok.isdigit() or int(tok) >= len(cur):
                raise KeyError(ptr)
            cur = cur[int(tok)]
        else:
            raise KeyError(ptr)
    return cur


class _Parser:
    def __init__(self, text: str):
        self.s = text
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.index: dict[str, tuple[int, int]] = {}

    def line(self, pos: int) -> int:
        return bisect.bisect_right(self.starts, pos)

    def fail(self, msg: str, pos: int):
        ln = self.line(pos)
        raise JsonSyntaxError(msg, ln, pos - self.starts[ln - 1] + 1)

    def ws(self, i: int) -> int:
        return _WS.match(self.s, i).end()

    def value(self, i: int, ptr: str, first_line: int) -> tuple[Any, int]:
        s = self.s
        if i >= len(s):
            self.fail("unexpected end of data", i)
        c = s[i]
        if c == "{":
            out: dict[str, Any] = {}
            j = self.ws(i + 1)
            if j < len(s) and s[j] == "}":
                self.index[ptr] = (first_line, self.line(j))
                return out, j + 1
            while True:
                if j >= len(s) or s[j] != '"':
                    self.fail("expected a string key", j)
                key_line = self.line(j)
                try:
                    key, j = _scanstring(s, j + 1, True)
                except json.JSONDecodeError:
                    self.fail("unterminated string", j)
                j = self.ws(j)
                if j >= len(s) or s[j] != ":":
                    self.fail("expected ':'", j)
                j = self.ws(j + 1)
                out[key], j = self.value(j, ptr + "/" + _escape(key), key_line)
                j = self.ws(j)
                if j < len(s) and s[j] == ",":
                    j = self.ws(j + 1)
                    continue
                if j < len(s) and s[j] == "}":
                    self.index[ptr] = (first_line, self.line(j))
                    return out, j + 1
                self.fail("expected ',' or '}'", j)
        if c == "[":
            arr: list[Any] = []
            j = self.ws(i + 1)
            if j < len(s) and s[j] == "]":
                self.index[ptr] = (first_line, self.line(j))
                return arr, j + 1
            while True:
                v, j = self.value(j, ptr + "/" + str(len(arr)), self.line(j))
                arr.append(v)
                j = self.ws(j)
                if j < len(s) and s[j] == ",":
                    j = self.ws(j + 1)
                    continue
                if j < len(s) and s[j] == "]":
                    self.index[ptr] = (first_line, self.line(j))
                    return arr, j + 1
                self.fail("expected ',' or ']'", j)
        if c == '"':
            try:
                v, j = _scanstring(s, i + 1, True)
            except json.JSONDecodeError:
                self.fail("unterminated string", i)
            self.index[ptr] = (first_line, self.line(j - 1))
            return v, j
        m = _NUMBER.match(s, i)
        if m and m.end() > i:
            txt = m.group(0)
            v = float(txt) if (m.group(1) or m.group(2)) else int(txt)
            self.index[ptr] = (first_line, self.line(i))
            return v, m.end()
        for word, val in _CONSTANTS:
            if s.startswith(word, i):
                self.index[ptr] = (first_line, self.line(i))
                return val, i + len(word)
        self.fail("unexpected character" if i < len(s) else "unexpected end of data", i)
        raise AssertionError  # unreachable


def parse_with_lines(text: str) -> tuple[Any, dict[str, tuple[int, int]]]:
    """``(json.loads(text), {pointer: (first_line, last_line)})``; :class:`JsonSyntaxError` on bad JSON."""
    p = _Parser(text)
    i = p.ws(0)
    obj, j = p.value(i, "", p.line(i))
    j = p.ws(j)
    if j != len(text):
        p.fail("extra data after the JSON value", j)
    return obj, p.index
