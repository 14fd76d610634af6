"""The table layer: rows with their lines, unreadable rows reported instead of raised, image cells, writers."""

import base64
import csv
import json
import os

import pytest

from rwkv_clip.schema import Columns
from rwkv_clip.tables import Table, TableAppender, image_value, keep_rows, write_json_atomic, write_parquet


def _rows(path, fmt=None):
    rows = list(Table(str(path), fmt))
    assert Table(str(path), fmt).count() == len(rows)  # counting and reading agree, whatever the file holds
    return rows


def test_csv_rows_know_their_lines(tmp_path):
    p = tmp_path / "t.csv"
    p.write_bytes("\ufeffkey,text\n"               # a byte-order mark, as Excel writes it
                  "a,one\n"                         # line 2
                  "\n"                              # blank lines are no rows
                  'b,"two\nlines"\n'                # lines 4-5
                  "c,three\r\n"                     # line 6, CRLF
                  "\n\n".encode("utf-8"))
    rows = _rows(p)
    assert Table(str(p)).columns() == ["key", "text"]
    assert [(r.index, r.where, r.values) for r in rows] == [
        (0, f"{p}:2", {"key": "a", "text": "one"}),
        (1, f"{p}:4", {"key": "b", "text": "two\nlines"}),
        (2, f"{p}:6", {"key": "c", "text": "three"})]
    data = p.read_bytes()
    assert data[rows[1].start:rows[1].end] == b'b,"two\nlines"\n'  # the record's exact bytes


def test_malformed_csv_rows_come_back_with_the_reason(tmp_path):
    p = tmp_path / "t.tsv"
    p.write_bytes(b"key\ttext\n"
                  b"a\tfine\n"
                  b"b\tone\ttoo many\n"               # line 3
                  b"c\n"                              # line 4
                  b"d\tcaf\xe9\n"                     # line 5: Latin-1
                  b"e\tstill fine\n"
                  b'f\t"never closed\n'               # line 7, to the end of the file
                  b"g\tlost\n")
    rows = _rows(p)
    assert [r.values["key"] for r in rows if r.values] == ["a", "e"]
    errors = {r.where.rsplit(":", 1)[1]: r.error for r in rows if r.values is None}
    assert set(errors) == {"3", "4", "5", "7"}
    assert "3 fields where the header has 2" in errors["3"] and "1 field where" in errors["4"]
    assert "invalid UTF-8 on line 5" in errors["5"]
    assert "malformed CSV" in errors["7"] and "quote opened on line 7" in errors["7"]
    assert [r.index for r in rows] == list(range(6))


def test_unreadable_header_names_the_file_and_line(tmp_path):
    p = tmp_path / "t.csv"
    p.write_bytes(b"\n\nke\xffy,text\na,b\n")
    with pytest.raises(ValueError, match=rf"{p}:3: cannot read the header: invalid UTF-8"):
        Table(str(p)).columns()


def test_jsonl_rows(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_bytes(b'{"key": "a"}\n\n[1, 2]\n{"key": "b\xff"}\n{"key": "c", "tags": ["x"]}\n{"key": "d", tru\n'
                  b'{"key": "e"}')  # no newline at the end
    rows = _rows(p)
    assert [(r.index, r.where.rsplit(":", 1)[1]) for r in rows] == [(0, "1"), (1, "3"), (2, "4"), (3, "5"), (4, "6"),
                                                                     (5, "7")]
    assert rows[1].error == "a JSON list where an object was expected"
    assert "invalid UTF-8 on line 4" in rows[2].error and "unreadable JSON" in rows[4].error
    assert rows[3].values == {"key": "c", "tags": ["x"]}
    assert rows[5].values == {"key": "e"} and not rows[5].ended and rows[3].ended
    with pytest.raises(ValueError, match=r"t2.jsonl:1: unreadable JSON"):
        (tmp_path / "t2.jsonl").write_text("not json\n")
        Table(str(tmp_path / "t2.jsonl")).columns()


def test_parquet_rows_and_row_groups(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(5)], "image": [bytes([i]) for i in range(5)]}), p,
                   row_group_size=2)
    t = Table(str(p))
    assert [r.where for r in _rows(p)] == [f"{p}:row {i}" for i in range(5)]
    assert t.row_groups() == [(0, 0, 2), (1, 2, 2), (2, 4, 1)] and t.column_is_binary("image")
    assert [r.values["key"] for r in t.read_row_group(1, 2, ["key"])] == ["k2", "k3"]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="bad.parquet is not a readable Parquet file"):
        Table(str(tmp_path / "bad.parquet")).columns()


def test_image_values(tmp_path):
    base = str(tmp_path)
    assert image_value("img/a.jpg", base) == os.path.join(base, "img", "a.jpg")
    assert image_value(" /abs/b.png ", base) == "/abs/b.png"
    assert image_value("https://x.org/c.jpg", base) == "https://x.org/c.jpg"
    uri = "data:image/png;base64," + base64.b64encode(b"\x89PNG").decode()
    assert image_value(uri, base) == uri
    assert image_value(b"\xff\xd8", base) == b"\xff\xd8"
    assert image_value({"bytes": None, "path": "d.jpg"}, base) == os.path.join(base, "d.jpg")
    assert image_value({"bytes": b"\x01", "path": "d.jpg"}, base) == b"\x01"
    assert image_value("", base) is None and image_value(None, base) is None and image_value(float("nan"), base) is None


def test_columns_map_and_check():
    cols = Columns(text="title", key="id")
    assert cols.rename({"title": "a dog", "id": 3, "url": "x"}) == {"text": "a dog", "key": 3, "url": "x"}
    assert cols.check(["title", "image", "id"], "t.csv", required=("image", "text")) == \
        ["synthetic_caption", "generated_caption", "tags"]
    with pytest.raises(ValueError, match=r"t.csv: missing required column 'title' \(text\).*--text_key"):
        cols.check(["text", "image"], "t.csv", required=("image", "text"))
    with pytest.raises(ValueError, match="column 'id' given with --id_key is not in the file"):
        Columns(key="id").check(["text", "image"], "t.csv")
    with pytest.raises(ValueError, match="has none of the columns 'text', 'tags'.*--text_key, --tags_key"):
        Columns().check(["url"], "t.csv", any_of=("text", "tags"))


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_append_after_a_crash(tmp_path, fmt):
    p = tmp_path / f"o.{fmt}"
    w = TableAppender(str(p), fmt)
    for i in range(3):
        w.write({"row": i, "text": f"line one\nline two {i}", "blob": b"\x00\x01", "status": "ok"})
    w.close()
    with open(p, "ab") as f:  # a crash in the middle of the next row, inside a quoted cell
        f.write(b'3,"line one\n' if fmt == "csv" else b'{"row": 3, "te')
    rows = _rows(p)
    assert [r.values is not None and r.ended for r in rows] == [True, True, True, False]
    assert keep_rows(str(p), fmt, lambda i, r: r.ended and r.values is not None and i != 1) == 2
    w = TableAppender(str(p), fmt)
    w.write({"row": 4, "text": "c", "extra": [1], "status": "ok"})
    w.close()
    rows = _rows(p)
    assert [str(r.values["row"]) for r in rows] == ["0", "2", "4"]
    blob = rows[0].values["blob"] if fmt == "jsonl" else json.loads(rows[0].values["blob"])
    assert blob == {"$bytes": base64.b64encode(b"\x00\x01").decode()}
    assert rows[1].values["text"] == "line one\nline two 2" and rows[2].values["text"] == "c"
    if fmt == "csv":
        with open(p, newline="") as f:
            assert next(csv.reader(f)) == ["row", "text", "blob", "status"]  # the header of the first row


def test_atomic_writers(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    write_json_atomic(str(tmp_path / "s.json"), {"a": "é"})
    assert json.loads((tmp_path / "s.json").read_text(encoding="utf-8")) == {"a": "é"}
    rows = [{"row": 0, "image": b"\x01", "n": 1, "tags": ["a"]}, {"row": 1, "image": None, "n": 2.5, "x": "y"}]
    assert write_parquet(str(tmp_path / "o.parquet"), lambda: iter(rows)) == 2
    got = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert got == [{"row": 0, "image": b"\x01", "n": 1.0, "tags": '["a"]', "x": None},
                   {"row": 1, "image": None, "n": 2.5, "tags": None, "x": "y"}]
    assert sorted(os.listdir(tmp_path)) == ["o.parquet", "s.json"]  # no temporary file left behind
