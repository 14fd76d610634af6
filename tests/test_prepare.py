"""Tests for ``python -m rwkv_clip.datamodules.prepare``: every input format, bad rows, modes, val split, resume."""

import base64
import csv
import glob
import io
import json
import os
import multiprocessing
import signal
import tarfile
import threading
import time

import pytest
from PIL import Image

litdata = pytest.importorskip("litdata")

from rwkv_clip.datamodules import prepare as P  # noqa: E402
from rwkv_clip.datamodules._prepare_sources import split_of  # noqa: E402

FIELDS = ("key", "image", "text", "synthetic_caption", "generated_caption", "tags")


def _img(path, size=(60, 30), color=(200, 30, 30), mode="RGB"):
    im = Image.new(mode, size, color if mode == "RGB" else (*color, 128))
    im.save(path)
    return path


def _jpeg_bytes(size=(50, 40), color=(10, 200, 10)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def _read(split_dir):
    """All samples of a prepared split, keyed by sample key; checks the schema and that images decode."""
    ds = litdata.StreamingDataset(str(split_dir))
    out = {}
    for s in ds:
        assert tuple(s) == FIELDS
        assert all(isinstance(s[f], str) for f in FIELDS if f != "image")
        im = Image.open(io.BytesIO(s["image"]))
        assert im.format == "JPEG" and im.mode == "RGB"
        im.load()
        assert s["key"] not in out, f"duplicate key {s['key']}"
        out[s["key"]] = {**s, "size": im.size}
    assert len(ds) == len(out)
    return out


def _skipped(out_dir):
    with open(os.path.join(out_dir, "skipped.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_csv(path, rows, fields=("image", "text", "synthetic_caption", "tags"), delimiter=","):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


def _run(inputs, out, **kw):
    kw.setdefault("num_workers", 1)
    kw.setdefault("progress", False)
    return P.prepare(inputs=inputs, output_dir=str(out), **kw)


# ----------------------------------------------------------------------------------------------- formats

def test_csv_relative_paths_resize_and_bad_rows(tmp_path):
    (tmp_path / "img").mkdir()
    _img(tmp_path / "img" / "wide.jpg", (100, 40))
    _img(tmp_path / "img" / "tall.png", (30, 90))
    _img(tmp_path / "img" / "small.jpg", (20, 10))  # smaller than max_side: must not be upscaled
    _img(tmp_path / "img" / "rgba.png", (50, 50), mode="RGBA")
    (tmp_path / "img" / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    full = _jpeg_bytes((80, 80))
    (tmp_path / "img" / "truncated.jpg").write_bytes(full[: len(full) // 3])
    rows = [
        {"image": "img/wide.jpg", "text": "a wide red box", "synthetic_caption": "a red rectangle", "tags": "red,box"},
        {"image": "img/tall.png", "text": "", "synthetic_caption": "a tall one", "tags": ""},  # raw text empty: ok
        {"image": "img/small.jpg", "text": "small", "synthetic_caption": "", "tags": '["x", "y"]'},
        {"image": "img/rgba.png", "text": "transparent", "synthetic_caption": "", "tags": ""},
        {"image": "img/missing.jpg", "text": "gone", "synthetic_caption": "", "tags": ""},
        {"image": "img/corrupt.jpg", "text": "broken", "synthetic_caption": "", "tags": ""},
        {"image": "img/truncated.jpg", "text": "cut", "synthetic_caption": "", "tags": ""},
        {"image": "img/wide.jpg", "text": "", "synthetic_caption": "", "tags": "only tags"},  # no caption at all
        {"image": "", "text": "no image", "synthetic_caption": "", "tags": ""},
    ]
    csv_path = _write_csv(tmp_path / "pairs.csv", rows)
    out = tmp_path / "out"
    summary = _run(str(csv_path), out, max_side=32)

    got = _read(out / "train")
    assert sorted(got) == [f"pairs-{i:09d}" for i in range(4)]
    assert got["pairs-000000000"]["size"] == (32, 13)  # 100x40 -> longer side 32
    assert got["pairs-000000001"]["size"] == (11, 32)
    assert got["pairs-000000002"]["size"] == (20, 10)  # never upscaled
    assert got["pairs-000000003"]["size"] == (32, 32)
    assert got["pairs-000000000"]["text"] == "a wide red box"
    assert got["pairs-000000000"]["synthetic_caption"] == "a red rectangle"
    assert got["pairs-000000000"]["tags"] == "red, box"
    assert got["pairs-000000000"]["generated_caption"] == ""  # absent column -> ""
    assert got["pairs-000000001"]["text"] == ""
    assert got["pairs-000000002"]["tags"] == "x, y"
    px = Image.open(io.BytesIO(got["pairs-000000003"]["image"])).getpixel((16, 16))
    assert min(px) > 100  # half-transparent red over white, not over black

    reasons = {r["key"]: r["reason"] for r in _skipped(out)}
    assert reasons == {"pairs-000000004": "missing_file", "pairs-000000005": "corrupt_image",
                       "pairs-000000006": "corrupt_image", "pairs-000000007": "no_text",
                       "pairs-000000008": "no_image"}
    assert summary["written"] == {"train": 4, "val": 0}
    assert summary["skipped"] == {"corrupt_image": 2, "missing_file": 1, "no_text": 1, "no_image": 1}
    assert summary["train_dir"] == str(out / "train") and summary["val_dir"] is None
    with open(out / "summary.json") as f:
        assert json.load(f)["skipped_total"] == 5


def test_jsonl_absolute_paths_data_uri_and_cli_flags(tmp_path, capsys):
    a = _img(tmp_path / "a.jpg", (64, 64))
    records = [
        {"id": "r1", "img": str(a), "title": "first", "tags": ["dog", "ball"], "generated_caption": "a dog"},
        {"id": "r2", "img": "data:image/jpeg;base64," + base64.b64encode(_jpeg_bytes()).decode(), "title": "uri"},
        {"id": "r3", "img": str(tmp_path / "nope.jpg"), "title": "missing"},
        {"id": "r4", "img": "https://example.com/x.jpg", "title": "url"},
    ]
    src = tmp_path / "sub" / "pairs.jsonl"
    src.parent.mkdir()
    src.write_text("\n".join(json.dumps(r) for r in records) + "\n\nnot json\n")
    out = tmp_path / "out"
    # the CLI as a user types it: dashed and underscored spellings both work
    assert P.main(["--inputs", str(src), "--output-dir", str(out), "--text-key", "title", "--image_key", "img",
                   "--id-key=id", "--max-side", "48", "--num_workers", "1", "--progress", "false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    got = _read(out / "train")
    assert sorted(got) == ["r1", "r2"]
    assert got["r1"]["text"] == "first" and got["r1"]["tags"] == "dog, ball"
    assert got["r1"]["generated_caption"] == "a dog" and got["r1"]["size"] == (48, 48)
    assert got["r2"]["size"] == (48, 38)
    reasons = sorted(r["reason"] for r in _skipped(out))
    assert reasons == ["bad_row", "missing_file", "url"]
    assert summary["written"]["train"] == 2


def test_parquet_bytes_with_val_split(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    n = 40
    images = [_jpeg_bytes((30 + i, 20)) for i in range(n)]
    images[7] = b"garbage"
    table = pa.table({
        "image": pa.array(images, pa.binary()),
        "caption": [f"caption {i}" for i in range(n)],
        "tags": [["t", str(i)] for i in range(n)],
    })
    path = tmp_path / "data.parquet"
    pq.write_table(table, path, row_group_size=16)  # 3 row groups -> 3 worker units
    out = tmp_path / "out"
    summary = _run(str(path), out, text_key="caption", val_fraction=0.25, max_side=0)
    train, val = _read(out / "train"), _read(out / "val")
    keys = {f"data-{i:09d}" for i in range(n)} - {"data-000000007"}
    assert set(train) | set(val) == keys and not set(train) & set(val)
    assert all(split_of(k, 0.25) == "val" for k in val) and all(split_of(k, 0.25) == "train" for k in train)
    assert 0 < len(val) < len(train)
    for k, s in {**train, **val}.items():
        i = int(k.split("-")[1])
        assert s["text"] == f"caption {i}" and s["tags"] == f"t, {i}" and s["size"] == (30 + i, 20)
    assert [r["reason"] for r in _skipped(out)] == ["corrupt_image"]
    assert summary["written"] == {"train": len(train), "val": len(val)}
    assert summary["val_dir"] == str(out / "val")


def test_folder_with_sidecars(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    _img(root / "a.jpg")
    (root / "a.txt").write_text("plain text caption\n")
    _img(root / "sub" / "b.png", mode="RGBA")
    (root / "sub" / "b.json").write_text(json.dumps(
        {"text": "b raw", "synthetic_caption": "b synth", "generated_caption": "b gen", "tags": ["p", "q"]}))
    _img(root / "c.jpg")  # no sidecar
    _img(root / "d.webp")
    (root / "d.json").write_text(json.dumps({"caption": "img2dataset style", "url": "http://x"}))
    _img(root / "e.jpg")
    (root / "e.json").write_text("{broken")
    out = tmp_path / "out"
    _run(str(root), out)
    got = _read(out / "train")
    assert sorted(got) == ["a", "d", "sub/b"]
    assert got["a"]["text"] == "plain text caption"
    assert (got["sub/b"]["text"], got["sub/b"]["synthetic_caption"], got["sub/b"]["generated_caption"],
            got["sub/b"]["tags"]) == ("b raw", "b synth", "b gen", "p, q")
    assert got["d"]["text"] == "img2dataset style"
    assert sorted((r["key"], r["reason"]) for r in _skipped(out)) == [("c", "bad_sidecar"), ("e", "bad_sidecar")]


def _add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_webdataset_tar_and_bad_rows(tmp_path):
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tf:
        for i in range(6):
            key = f"{i:09d}"
            _add(tf, f"{key}.jpg", _jpeg_bytes((600, 300)) if i != 3 else b"corrupt")
            _add(tf, f"{key}.txt", f"caption {i}".encode())
            _add(tf, f"{key}.json", json.dumps({"key": key, "caption": f"caption {i}", "tags": "a, b"}).encode())
    (tmp_path / "00001.tar").write_bytes(b"this is not a tar file" * 40)
    out = tmp_path / "out"
    summary = _run(str(tmp_path / "*.tar"), out, max_side=100, val_fraction=0.4)
    train = _read(out / "train")
    val = _read(out / "val") if (out / "val").exists() else {}
    assert val and all(split_of(k, 0.4) == "val" for k in val) and all(split_of(k, 0.4) == "train" for k in train)
    got = {**train, **val}
    assert sorted(got) == [f"{i:09d}" for i in (0, 1, 2, 4, 5)]
    assert all(s["size"] == (100, 50) and s["tags"] == "a, b" for s in got.values())
    assert got["000000004"]["text"] == "caption 4"
    assert sorted(r["reason"] for r in _skipped(out)) == ["corrupt_image", "corrupt_tar"]
    assert summary["skipped_total"] == 2


# ----------------------------------------------------------------------------------------------- errors

def test_missing_column_is_a_clear_error(tmp_path):
    _img(tmp_path / "a.jpg")
    path = _write_csv(tmp_path / "t.csv", [{"image": "a.jpg", "title": "x"}], fields=("image", "title"))
    with pytest.raises(ValueError) as e:
        _run(str(path), tmp_path / "out")
    msg = str(e.value)
    assert str(path) in msg and "'text'" in msg and "['image', 'title']" in msg and "--text_key" in msg
    with pytest.raises(ValueError, match="tags_key"):
        _run(str(path), tmp_path / "out", text_key="title", tags_key="labels")
    with pytest.raises(ValueError, match="does not exist"):
        _run(str(tmp_path / "nope.csv"), tmp_path / "out")
    with pytest.raises(ValueError, match="matches no file"):
        _run(str(tmp_path / "*.tsv"), tmp_path / "out")


def test_empty_result_is_an_error(tmp_path):
    path = _write_csv(tmp_path / "t.csv", [{"image": "gone.jpg", "text": "x"}, {"image": "gone2.jpg", "text": "y"}],
                      fields=("image", "text"))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="wrote no sample.*missing_file: 2"):
        _run(str(path), out)
    assert len(_skipped(out)) == 2
    assert not (out / "train").exists() and not (out / ".prepare").exists()
    _img(tmp_path / "gone.jpg")
    assert _run(str(path), out)["written"]["train"] == 1  # the failed run did not block the folder


# ----------------------------------------------------------------------------------------------- modes

def test_refuse_overwrite_append(tmp_path):
    _img(tmp_path / "a.jpg")
    one = _write_csv(tmp_path / "one.csv", [{"image": "a.jpg", "text": f"one {i}"} for i in range(3)],
                     fields=("image", "text"))
    two = _write_csv(tmp_path / "two.tsv", [{"image": "a.jpg", "text": f"two {i}"} for i in range(2)],
                     fields=("image", "text"), delimiter="\t")
    out = tmp_path / "out"
    _run(str(one), out)
    with pytest.raises(ValueError, match="already holds.*--mode overwrite.*--mode append"):
        _run(str(one), out)
    with pytest.raises(ValueError, match="nothing to resume"):
        _run(str(one), out, mode="resume")
    assert len(_read(out / "train")) == 3
    s = _run(str(two), out, mode="append")
    assert s["written"]["train"] == 2 and s["dataset_total"]["train"] == 5
    got = _read(out / "train")
    assert sorted(v["text"] for v in got.values()) == ["one 0", "one 1", "one 2", "two 0", "two 1"]
    s = _run(str(two), out, mode="overwrite")
    assert s["dataset_total"]["train"] == 2 and sorted(_read(out / "train")) == ["two-000000000", "two-000000001"]
    s = _run([str(one), str(two)], out, mode="overwrite")  # a list of inputs
    assert s["dataset_total"]["train"] == 5


def test_val_split_is_stable_across_workers_parts_and_appends(tmp_path):
    _img(tmp_path / "a.jpg", (16, 16))
    first = _write_csv(tmp_path / "first.csv", [{"image": "a.jpg", "text": f"t{i}"} for i in range(60)],
                       fields=("image", "text"))
    second = _write_csv(tmp_path / "second.csv", [{"image": "a.jpg", "text": f"s{i}"} for i in range(30)],
                        fields=("image", "text"))
    _run(str(first), tmp_path / "o1", val_fraction=0.2, num_workers=2, part_size=25)
    _run(str(first), tmp_path / "o2", val_fraction=0.2, num_workers=1, part_size=1000)
    val1, val2 = _read(tmp_path / "o1" / "val"), _read(tmp_path / "o2" / "val")
    assert set(val1) == set(val2) == {f"first-{i:09d}" for i in range(60) if split_of(f"first-{i:09d}", 0.2) == "val"}
    assert 3 <= len(val1) <= 25
    assert set(_read(tmp_path / "o1" / "train")) == set(_read(tmp_path / "o2" / "train"))
    _run(str(second), tmp_path / "o1", val_fraction=0.2, mode="append")
    val_after = _read(tmp_path / "o1" / "val")
    assert set(val1) <= set(val_after) and all(k.startswith("second-") for k in set(val_after) - set(val1))
    assert len(val_after) + len(_read(tmp_path / "o1" / "train")) == 90


# ----------------------------------------------------------------------------------------------- resume

def _rows_csv(tmp_path, n):
    _img(tmp_path / "a.jpg", (16, 16))
    return _write_csv(tmp_path / "rows.csv", [{"image": "a.jpg" if i != 5 else "missing.jpg", "text": f"t{i}"}
                                              for i in range(n)], fields=("image", "text"))


def test_resume_after_failure_during_a_part(tmp_path, monkeypatch):
    path = _rows_csv(tmp_path, 50)
    out = tmp_path / "out"
    real = P._write_part
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        real(*args, **kwargs)  # the part's chunks are written to staging ...
        if len(calls) == 5:
            raise RuntimeError("simulated crash")  # ... then the process dies before the commit

    monkeypatch.setattr(P, "_write_part", flaky)
    opts = dict(val_fraction=0.2, part_size=10)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(str(path), out, **opts)
    state = json.loads((out / ".prepare" / "state.json").read_text())
    done = len(state["runs"][-1]["parts"])
    assert 1 <= done < 5
    partial = len(_read(out / "train"))  # what is committed is readable meanwhile
    assert 0 < partial < 40
    with pytest.raises(ValueError, match="interrupted run with other inputs or options"):
        _run(str(path), out, val_fraction=0.2, part_size=10, max_side=64)
    monkeypatch.setattr(P, "_write_part", real)
    s = _run(str(path), out, **opts)  # same command: resumes
    train, val = _read(out / "train"), _read(out / "val")
    assert set(train) | set(val) == {f"rows-{i:09d}" for i in range(50) if i != 5}
    assert not set(train) & set(val)
    assert s["written"]["train"] + s["written"]["val"] == 49 and s["skipped"] == {"missing_file": 1}
    assert [r["key"] for r in _skipped(out)] == ["rows-000000005"]
    assert not (out / ".prepare" / "staging").exists() or not os.listdir(out / ".prepare" / "staging")


def test_resume_after_crash_inside_commit(tmp_path, monkeypatch):
    """Chunks already moved into train/, but the state file never written: they must not be counted twice."""
    path = _rows_csv(tmp_path, 30)
    out = tmp_path / "out"
    real = P.write_json_atomic
    commits = []

    def crashing(p, obj):
        if str(p).endswith("state.json") and obj["runs"] and obj["runs"][-1]["parts"]:
            commits.append(1)
            if len(commits) == 2:
                raise OSError("disk gone")
        real(p, obj)

    monkeypatch.setattr(P, "write_json_atomic", crashing)
    with pytest.raises(OSError, match="disk gone"):
        _run(str(path), out, part_size=10)
    n_files = len([f for f in os.listdir(out / "train") if f.endswith(".bin")])
    monkeypatch.setattr(P, "write_json_atomic", real)
    _run(str(path), out, part_size=10, mode="resume")
    got = _read(out / "train")
    assert sorted(got) == [f"rows-{i:09d}" for i in range(30) if i != 5]
    index = json.loads((out / "train" / "index.json").read_text())
    assert sorted(os.listdir(out / "train")) == sorted([c["filename"] for c in index["chunks"]] + ["index.json"])
    assert n_files >= 2  # the crash really left uncommitted chunks behind


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        P.main(["--help"])
    text = capsys.readouterr().out
    for name in ("inputs", "output_dir", "mode", "image_key", "text_key", "synthetic_caption_key",
                 "generated_caption_key", "tags_key", "id_key", "max_side", "quality", "val_fraction",
                 "num_workers", "part_size", "chunk_bytes"):
        assert f"--{name}" in text
    assert "overwrite" in text and "never upscale" in text


def test_interrupted_append_resumes_instead_of_appending_twice(tmp_path, monkeypatch):
    _img(tmp_path / "a.jpg", (16, 16))
    one = _write_csv(tmp_path / "one.csv", [{"image": "a.jpg", "text": f"o{i}"} for i in range(4)],
                     fields=("image", "text"))
    two = _write_csv(tmp_path / "two.csv", [{"image": "a.jpg", "text": f"t{i}"} for i in range(12)],
                     fields=("image", "text"))
    out = tmp_path / "out"
    _run(str(one), out)
    real, calls = P._write_part, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        real(*args, **kwargs)

    monkeypatch.setattr(P, "_write_part", flaky)
    with pytest.raises(RuntimeError):
        _run(str(two), out, mode="append", part_size=5)
    monkeypatch.setattr(P, "_write_part", real)
    s = _run(str(two), out, mode="append", part_size=5)  # the same append again: finishes it, no duplicates
    assert s["dataset_total"]["train"] == 16
    assert sorted(v["text"] for v in _read(out / "train").values()) == sorted(
        [f"o{i}" for i in range(4)] + [f"t{i}" for i in range(12)])


# ------------------------------------------------------------------------------------------- no accidental duplicates

def test_append_skips_keys_already_in_the_dataset(tmp_path):
    _img(tmp_path / "a.jpg", (16, 16))
    first = _write_csv(tmp_path / "first.csv", [{"key": f"k{i}", "image": "a.jpg", "text": f"t{i}"} for i in range(3)],
                       fields=("key", "image", "text"))
    out = tmp_path / "out"
    _run(str(first), out, val_fraction=0.3)
    with pytest.raises(ValueError, match="wrote no sample.*already_in_dataset: 3"):
        _run(str(first), out, mode="append", val_fraction=0.3)  # the same input again: nothing new
    both = _write_csv(tmp_path / "both.csv", [{"key": f"k{i}", "image": "a.jpg", "text": f"t{i}"} for i in range(1, 5)],
                      fields=("key", "image", "text"))
    s = _run(str(both), out, mode="append", val_fraction=0.3)
    assert s["written"]["train"] + s["written"]["val"] == 2 and s["skipped"] == {"already_in_dataset": 2}
    got = {**_read(out / "train"), **(_read(out / "val") if (out / "val").exists() else {})}
    assert sorted(got) == ["k0", "k1", "k2", "k3", "k4"]  # _read also asserts that no key repeats
    assert sorted(r["key"] for r in _skipped(out) if r["reason"] == "already_in_dataset") == ["k1", "k2"]


def test_duplicate_ids_in_one_input_are_flagged(tmp_path, capsys):
    _img(tmp_path / "a.jpg", (16, 16))
    rows = [{"id": k, "img": str(tmp_path / "a.jpg"), "text": f"text {i}"} for i, k in enumerate("abcab")]
    src = tmp_path / "dup.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = _run(str(src), tmp_path / "out", id_key="id", image_key="img", part_size=2)
    assert s["written"]["train"] == 5  # kept (they may be different pairs), but said
    assert s["duplicate_keys"] == 2 and s["duplicate_key_examples"] == ["a", "b"]
    assert "2 samples share their key" in capsys.readouterr().err


def test_skipped_line_numbers_after_a_quoted_newline(tmp_path):
    _img(tmp_path / "a.jpg", (16, 16))
    path = _write_csv(tmp_path / "pairs.csv", [
        {"image": "a.jpg", "text": "two\nlines"},       # lines 2-3
        {"image": "gone.jpg", "text": "missing"},       # line 4
        {"image": "a.jpg", "text": ""},                 # line 5: no caption
    ], fields=("image", "text"))
    _run(str(path), tmp_path / "out")
    assert sorted(r["source"] for r in _skipped(tmp_path / "out")) == [f"{path}:4", f"{path}:5"]


def test_malformed_csv_rows_are_skipped_with_their_lines(tmp_path):
    _img(tmp_path / "a.jpg", (16, 16))
    path = tmp_path / "pairs.csv"
    path.write_bytes(b"image,text\n"
                     b"a.jpg,fine\n"
                     b"a.jpg,one,too many\n"
                     b"a.jpg\n"
                     b"a.jpg,caf\xe9\n"        # Latin-1
                     b"\n"
                     b"a.jpg,also fine\n")
    s = _run(str(path), tmp_path / "out")
    assert s["written"]["train"] == 2 and s["skipped"] == {"bad_row": 3}
    errors = {r["source"]: r["error"] for r in _skipped(tmp_path / "out")}
    assert "3 fields" in errors[f"{path}:3"] and "1 field" in errors[f"{path}:4"]
    assert "UTF-8" in errors[f"{path}:5"]


# ----------------------------------------------------------------------------------------------- the writer, Ctrl-C

def test_write_samples_is_a_library_writer(tmp_path):
    from rwkv_clip.schema import check_prepared_dir

    samples = [{"key": f"s{i}", "image": _jpeg_bytes((8 + i, 8)), "text": f"t{i}", "label": i % 3} for i in range(40)]
    assert P.write_samples(iter(samples), str(tmp_path / "a"), chunk_bytes="4KB") == 40
    P.write_samples(iter(samples), str(tmp_path / "b"), chunk_bytes="4KB")
    chunks = sorted(f for f in os.listdir(tmp_path / "a") if f.endswith(".bin"))
    assert len(chunks) > 1 and sorted(os.listdir(tmp_path / "a")) == sorted(chunks + ["index.json"])
    assert all((tmp_path / "a" / c).read_bytes() == (tmp_path / "b" / c).read_bytes() for c in chunks)  # same bytes
    check_prepared_dir(str(tmp_path / "a"))  # only safe formats
    assert list(litdata.StreamingDataset(str(tmp_path / "a"))) == samples  # nothing re-encoded
    with pytest.raises(ValueError, match="already holds a LitData dataset"):
        P.write_samples(iter(samples), str(tmp_path / "a"))


def test_in_process_and_worker_processes_write_the_same_samples(tmp_path):
    path = _rows_csv(tmp_path, 30)
    signal_before = signal.getsignal(signal.SIGINT)
    a = _run(str(path), tmp_path / "w0", num_workers=0, val_fraction=0.3, part_size=7)
    b = _run(str(path), tmp_path / "w2", num_workers=2, val_fraction=0.3, part_size=7)
    assert signal.getsignal(signal.SIGINT) is signal_before  # no Ctrl-C handler left behind
    assert a["written"] == b["written"] and a["skipped"] == b["skipped"] == {"missing_file": 1}
    for split in ("train", "val"):
        x, y = _read(tmp_path / "w0" / split), _read(tmp_path / "w2" / split)
        assert {k: v["text"] for k, v in x.items()} == {k: v["text"] for k, v in y.items()}


def test_ctrl_c_stops_with_status_130_and_the_same_command_resumes(tmp_path, capsys):
    path = _rows_csv(tmp_path, 60)
    out = tmp_path / "out"
    argv = ["--inputs", str(path), "--output_dir", str(out), "--num_workers", "2", "--part_size", "5",
            "--progress", "false"]
    main_thread = threading.main_thread().ident

    def ctrl_c_after_the_first_part():
        # once a part is committed and both workers of a later one are running: a Ctrl-C that lands inside
        # fork() is swallowed by CPython (an exception in an at-fork hook), so it is not sent then
        deadline = time.time() + 60
        while time.time() < deadline and not ((out / "train" / "index.json").exists()
                                              and glob.glob(str(out / ".prepare" / "staging" / "*" / "*" / "w1"))):
            time.sleep(0.005)
        signal.pthread_kill(main_thread, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever was installed
    try:
        threading.Thread(target=ctrl_c_after_the_first_part, daemon=True).start()
        assert P.main(argv) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not multiprocessing.active_children()  # the workers were stopped
    assert "Run the same command again" in capsys.readouterr().err
    assert 1 <= len(json.loads((out / ".prepare" / "state.json").read_text())["runs"][-1]["parts"]) < 12
    assert P.main(argv) == 0
    assert sorted(_read(out / "train")) == [f"rows-{i:09d}" for i in range(60) if i != 5]
