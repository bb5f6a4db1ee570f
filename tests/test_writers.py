"""Output writers: headers, cell formatting (byte-identical to the reference CSVs), JSON, atomic sets."""
import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from jaxlens import writers as W
from reference_data import HEADERS_JSON, MILESTONES_CSV, PURE_CSV, REF_DIR, SKELETON  # noqa: F401

PACKAGE_HEADERS = Path(W.__file__).parent / "data" / "csv_headers.json"

# columns whose cells are text; every other reference cell must parse to None / bool / int / float
_TEXT_COLUMNS = {"fact_key", "prompt_id", "prompt_variant", "token", "lens", "risk_tier",
                 *(f"top{i}" for i in range(1, 21))}


def _read_reference(path):
    text = path.read_bytes().decode("utf-8")
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=",", quotechar='"', escapechar="\\",
                           doublequote=True))
    return text, rows


def _typed(rows):
    return [[W.parse_cell(c) for c in r] for r in rows]


# ------------------------------------------------------------------------------------------ headers

def test_package_header_file_matches_reference():
    assert PACKAGE_HEADERS.read_bytes() == HEADERS_JSON.read_bytes()
    ref = json.loads(HEADERS_JSON.read_text(encoding="utf-8"))
    assert list(W.CSV_HEADERS) == list(ref)
    for key, cols in ref.items():
        assert W.CSV_HEADERS[key] == cols
        assert W.header(key) == cols


def test_header_lookup_and_copy_block():
    pure = W.header("-pure-next-token.csv")
    assert W.header("pure-next-token") == pure == W.header("pure-next-token.csv")
    assert W.header("pure-next-token-tuned") == pure == W.header("pure-next-token-prism")
    assert W.header("milestones") == ["layer", "csv_row_index", "is_copy_strict", "is_copy_soft_k",
                                      "is_semantic_norm", "is_semantic_confirmed", "answer_rank",
                                      "p_answer", "kl_to_final_bits", "entropy_bits", "lens"]
    assert W.header("records")[-3:] == ["top20", "prob20", "rest_mass"] and len(W.header("records")) == 50
    assert W.copy_flag_columns() == ["copy_strict@0.95", "copy_strict@0.7", "copy_strict@0.8",
                                     "copy_strict@0.9", "copy_soft_k1@0.5", "copy_soft_k2@0.5",
                                     "copy_soft_k3@0.5"]
    h = W.header("pure-next-token", copy_flag_columns=["copy_strict@0.9", "copy_soft_k1@0.33"])
    i = h.index("copy_collapse")
    assert h[i + 1:i + 4] == ["copy_strict@0.9", "copy_soft_k1@0.33", "entropy_collapse"]
    assert len(h) == len(pure) - 5
    W.header("pure-next-token")[0] = "mutated"                 # copies, not the table itself
    assert W.header("pure-next-token")[0] == "fact_key"
    with pytest.raises(ValueError):
        W.header("milestones", copy_flag_columns=["copy_strict@0.9"])
    with pytest.raises(KeyError):
        W.header("no-such-file")
    assert W.csv_filename("Qwen3-14B", "milestones") == "output-Qwen3-14B-milestones.csv"
    assert W.json_filename("Qwen3-14B") == "output-Qwen3-14B.json"


# ------------------------------------------------------------------------------ reference round trip

def test_pure_next_token_rows_rewrite_byte_identical():
    text, rows = _read_reference(PURE_CSV)
    assert rows[0] == W.header("pure-next-token")
    body = rows[1:]
    assert len(body) >= 30
    typed = _typed(body)
    # the sample must exercise quoting: commas, quotes, embedded newlines and non-ASCII text
    cells = [c for r in body for c in r]
    assert any("," in c for c in cells) and any('"' in c for c in cells)
    assert any("\n" in c for c in cells) and any(not c.isascii() for c in cells)
    # typed values really are typed (floats as floats, flags as bools) outside the text columns
    for r in typed:
        for col, v in zip(rows[0], r):
            if col not in _TEXT_COLUMNS:
                assert not isinstance(v, str), (col, v)
    # first 30 rows, then all of them, byte for byte (dict rows and list rows)
    head30 = W.render_csv("pure-next-token", typed[:30])
    assert text.startswith(head30)
    assert W.render_csv("pure-next-token", typed) == text
    dict_rows = [{k: v for k, v in zip(rows[0], r) if v is not None} for r in typed]
    assert W.render_csv("pure-next-token", dict_rows) == text


def test_reference_fp32_values_rewrite_from_float32():
    """Values that are exactly representable in fp32 were written from fp32 tensors: writing the
    np.float32 must give the reference text."""
    _, rows = _read_reference(PURE_CSV)
    n = 0
    for r in rows[1:]:
        for c in r:
            v = W.parse_cell(c)
            if type(v) is float and float(np.float32(v)) == v:
                assert W.format_cell(np.float32(v)) == c
                n += 1
    assert n > 1000


def test_milestones_rewrite_byte_identical(tmp_path):
    text, rows = _read_reference(MILESTONES_CSV)
    assert rows[0] == W.header("milestones") and len(rows) == 5
    out = W.write_csv(tmp_path / "m.csv", "milestones", _typed(rows[1:]))
    assert out.read_bytes() == MILESTONES_CSV.read_bytes()


# ---------------------------------------------------------------------------------- cell formatting

@pytest.mark.parametrize("value, text", [
    (np.float32(0.1), "0.10000000149011612"),
    (0.1, "0.1"),
    (np.float64(0.1), "0.1"),
    (1e-30, "1e-30"),
    (np.float32(1e-30), "1.0000000031710769e-30"),
    (-0.0, "-0.0"),
    (np.float32(-0.0), "-0.0"),
    (17.212854385375977, "17.212854385375977"),
    (float("nan"), "nan"), (np.float32("inf"), "inf"), (float("-inf"), "-inf"),
    (np.float16(0.5), "0.5"),
    (True, "True"), (False, "False"), (np.bool_(True), "True"), (np.bool_(False), "False"),
    (None, ""), ("", ""),
    (3, "3"), (-7, "-7"), (np.int64(100736), "100736"), (np.int32(-2), "-2"), (np.uint8(255), "255"),
    (np.array(0.25, dtype=np.float32), "0.25"), (np.array(5), "5"),
    ("Berlin", "Berlin"), (" Berlin", " Berlin"),
])
def test_format_cell(value, text):
    assert W.format_cell(value) == text


def test_format_cell_rejects_unknown_types():
    with pytest.raises(TypeError):
        W.format_cell(object())
    with pytest.raises(TypeError):
        W.format_cell(b"bytes")


@pytest.mark.parametrize("token, cell", [
    ('a,b', '"a,b"'),
    ('say "hi"', '"say ""hi"""'),
    (' "', '" """'),
    (',', '","'),
    ('?\n\n', '"?\n\n"'),
    ('a\rb', '"a\rb"'),
    ('back\\slash', 'back\\\\slash'),
    ('x\\"y', '"x\\\\""y"'),
    ('当之', '当之'),
    ('→ ü', '→ ü'),
    ('  ', '  '),
])
def test_quoting(token, cell):
    line = W.format_row([token, 1])
    assert line == cell + ",1\n"
    # reads back with the reference dialect
    back = next(csv.reader(io.StringIO(line, newline=""), escapechar="\\"))
    assert back == [token, "1"]


def test_quoting_agrees_with_stdlib_csv_writer():
    fields = ['a,b', 'say "hi"', '?\n\n', 'back\\slash', 'x\\"y', '当之', '', ' x', 'True', '1.5']
    buf = io.StringIO()
    csv.writer(buf, delimiter=",", quotechar='"', quoting=csv.QUOTE_MINIMAL, escapechar="\\",
               lineterminator="\n").writerow(fields)
    assert W.format_row(fields) == buf.getvalue()
    assert W.format_row([""]) == '""\n'                      # csv.writer quotes a lone empty field


@pytest.mark.parametrize("text, value", [
    ("", None), ("True", True), ("False", False), ("0", 0), ("-12", -12), ("100736", 100736),
    ("0.5", 0.5), ("1e-30", 1e-30), ("-0.0", -0.0), ("7.23783432476921e-06", 7.23783432476921e-06),
    ("Berlin", "Berlin"), (" 1", " 1"), ("007", "007"), ("1.50", "1.50"), ("1E5", "1E5"), ("+1", "+1"),
    ("true", "true"),
])
def test_parse_cell(text, value):
    got = W.parse_cell(text)
    assert type(got) is type(value) and got == value
    assert W.format_cell(got) == text


def test_parse_cell_nan_inf():
    assert np.isnan(W.parse_cell("nan")) and W.parse_cell("inf") == float("inf")
    assert W.parse_cell("-inf") == float("-inf")


# ---------------------------------------------------------------------------------------- CSV rows

def test_rows_dicts_and_lists(tmp_path):
    cols = W.header("artifact-audit")
    rows = [{"layer": "_summary", "js_divergence": np.float32(0.5), "risk_tier": "high"},
            [0, 6.51e-05, None, np.float64(0.0147), np.float32(2 / 3), None, None]]
    p = W.write_csv(tmp_path / "a.csv", "artifact-audit", rows)
    assert p.read_text(encoding="utf-8") == (",".join(cols) + "\n" + "_summary,0.5,,,,,high\n"
                                             + "0,6.51e-05,,0.0147,0.6666666865348816,,\n")
    with pytest.raises(ValueError, match="bogus"):
        W.render_csv("artifact-audit", [{"layer": 1, "bogus": 2, "also_bad": 3}])
    with pytest.raises(ValueError, match="cells"):
        W.render_csv("artifact-audit", [[1, 2]])
    with pytest.raises(TypeError):
        W.render_csv("artifact-audit", ["layer"])
    assert W.render_csv("milestones", []) == ",".join(W.header("milestones")) + "\n"


def test_write_csv_with_custom_copy_flags(tmp_path):
    flags = ["copy_strict@0.9", "copy_soft_k1@0.33"]
    row = {"layer": 3, "copy_collapse": False, "copy_strict@0.9": True, "copy_soft_k1@0.33": np.bool_(False)}
    p = W.write_csv(tmp_path / "p.csv", "pure-next-token", [row], copy_flag_columns=flags)
    hdr, line = p.read_text(encoding="utf-8").splitlines()
    h = hdr.split(",")
    assert h == W.header("pure-next-token", flags)
    cells = line.split(",")
    assert cells[h.index("copy_strict@0.9")] == "True" and cells[h.index("copy_soft_k1@0.33")] == "False"
    with pytest.raises(ValueError, match="copy_strict@0.95"):
        W.render_csv("pure-next-token", [{"copy_strict@0.95": True}], copy_flag_columns=flags)


# --------------------------------------------------------------------------------------------- JSON

def test_json_conversion_and_format(tmp_path):
    obj = {
        "z_first": 1,
        "fact_key": "Germany→Berlin",
        "f32": np.float32(0.1),
        "f64": np.float64(0.25),
        "i64": np.int64(7),
        "b": np.bool_(True),
        "arr": np.array([0.5, 0.1], dtype=np.float32),
        "mat": np.arange(4, dtype=np.int32).reshape(2, 2),
        "tup": (1, None, "x"),
        "nested": {"nan": float("nan"), "inf": np.float32("inf"), "keys": {np.int64(1): None, 2: True}},
        "a_last": [],
        "path": Path("/tmp/x"),
    }
    text = W.dumps_json(obj)
    assert "→" in text and "\\u2192" not in text
    assert not text.endswith("\n")
    back = json.loads(text)
    assert list(back) == list(obj)                                  # insertion order kept
    assert back["f32"] == 0.10000000149011612 and '"f32": 0.10000000149011612' in text
    assert back["i64"] == 7 and back["b"] is True
    assert back["arr"] == [0.5, 0.10000000149011612] and back["mat"] == [[0, 1], [2, 3]]
    assert back["tup"] == [1, None, "x"] and back["path"] == "/tmp/x"
    assert back["nested"]["keys"] == {"1": None, "2": True}
    assert '"nan": NaN' in text and '"inf": Infinity' in text
    assert text == json.dumps(json.loads(text), indent=2, ensure_ascii=False)   # json.dump layout
    a, b = W.write_json(tmp_path / "a.json", obj), W.write_json(tmp_path / "b.json", obj)
    assert a.read_bytes() == b.read_bytes() == text.encode("utf-8")
    with pytest.raises(TypeError, match="nested.bad"):
        W.dumps_json({"nested": {"bad": object()}})


# -------------------------------------------------------------------------------------- atomicity

def _listing(d):
    return sorted(p.name for p in Path(d).iterdir())


def test_output_set_success_replaces_and_reports(tmp_path):
    out_dir = tmp_path / "deep" / "run"
    with W.OutputSet(out_dir) as out:
        out.json("output-M.json", {"a": 1})
        out.csv("output-M-milestones.csv", "milestones", [])
        out.text("evaluation-M.md", "")
        assert _listing(out_dir) == sorted([".output-M.json.tmp-%d" % os.getpid(),
                                            ".output-M-milestones.csv.tmp-%d" % os.getpid(),
                                            ".evaluation-M.md.tmp-%d" % os.getpid()])
    assert _listing(out_dir) == ["evaluation-M.md", "output-M-milestones.csv", "output-M.json"]
    assert out.paths == [out_dir / n for n in _listing(out_dir)]
    with W.OutputSet(out_dir) as out:
        out.json("output-M.json", {"a": 2})
    assert json.loads((out_dir / "output-M.json").read_text()) == {"a": 2}
    with pytest.raises(RuntimeError):
        out.json("late.json", {})


def test_output_set_exception_leaves_nothing(tmp_path):
    (tmp_path / "output-M.json").write_text("old")
    before = _listing(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with W.OutputSet(tmp_path) as out:
            out.json("output-M.json", {"new": True})
            out.csv("output-M-milestones.csv", "milestones", [[None] * 11])
            raise RuntimeError("boom")
    assert _listing(tmp_path) == before
    assert (tmp_path / "output-M.json").read_text() == "old"
    assert out.paths == []


def test_output_set_failed_write_inside_block(tmp_path):
    # a bad row mid-stream: the partial temp file goes away and the exception propagates
    with pytest.raises(ValueError, match="nope"):
        with W.OutputSet(tmp_path) as out:
            out.text("keep.txt", "x")
            out.csv("bad.csv", "milestones", [{"layer": 1}, {"nope": 2}])
    assert _listing(tmp_path) == []
    # caught inside the block: the rest of the set still lands, the failed file does not
    with W.OutputSet(tmp_path) as out:
        out.text("keep.txt", "x")
        with pytest.raises(ValueError):
            out.csv("bad.csv", "milestones", [{"nope": 2}])
        with pytest.raises(ValueError):
            out.text("keep.txt", "twice")
        with pytest.raises(ValueError):
            out.text("sub/dir.txt", "x")
    assert _listing(tmp_path) == ["keep.txt"]


def test_runs_are_byte_identical(tmp_path):
    rows = [{"layer": i, "p_answer": np.float32(i / 7), "lens": "norm", "is_semantic_norm": i % 2 == 0}
            for i in range(5)]
    obj = {"x": np.linspace(0, 1, 5, dtype=np.float32), "s": "Germany→Berlin"}
    blobs = []
    for run in ("a", "b"):
        with W.OutputSet(tmp_path / run) as out:
            out.csv("m.csv", "milestones", rows)
            out.json("o.json", obj)
        blobs.append({p.name: p.read_bytes() for p in out.paths})
    assert blobs[0] == blobs[1]
