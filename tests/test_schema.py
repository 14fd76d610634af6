"""The shared data schema: tags, and the checks that keep a LitData directory from running code."""

import json
import os

import pytest

from rwkv_clip.schema import (
    UnsafeDatasetError,
    check_prepared_dir,
    format_tags,
    index_fields,
    parse_tags,
    read_index,
)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("dog, cat", ["dog", "cat"]),
        ("dog | cat | Dog", ["dog", "cat"]),  # RAM++'s separator; repeats dropped case-insensitively
        ("dog;  big   cat;", ["dog", "big cat"]),
        ('["a", "b, c"]', ["a", "b, c"]),  # a JSON list keeps commas inside a tag
        (["x", None, " y "], ["x", "y"]),
        (None, []),
        (float("nan"), []),
        ("", []),
    ],
)
def test_parse_tags(value, expected):
    assert parse_tags(value) == expected


def test_format_tags():
    assert format_tags("a|b;c") == "a, b, c"


def _write_litdata(path, sample):
    from litdata.streaming.writer import BinaryWriter

    writer = BinaryWriter(str(path), chunk_bytes="1MB")
    writer.add_item(0, sample)
    writer.done()
    writer._merge_no_wait()


def test_prepared_dir_with_plain_fields_passes(tmp_path):
    _write_litdata(tmp_path, {"key": "a", "image": b"\xff\xd8", "text": "hi", "label": 1})
    config = check_prepared_dir(str(tmp_path))
    assert index_fields(config) == ["key", "image", "text", "label"]


class _Payload:  # litdata stores an unknown type with its pickle serializer
    pass


def test_pickled_field_is_refused_before_reading(tmp_path):
    _write_litdata(tmp_path, {"key": "a", "obj": _Payload()})
    with pytest.raises(UnsafeDatasetError, match=r"'obj' as 'pickle'"):
        check_prepared_dir(str(tmp_path))


def test_malformed_index_names_the_file(tmp_path):
    (tmp_path / "index.json").write_text('{"config": ')
    with pytest.raises(ValueError, match=str(tmp_path / "index.json")):
        read_index(str(tmp_path / "index.json"))
    with pytest.raises(FileNotFoundError, match="prepare"):
        check_prepared_dir(str(tmp_path / "missing"))


def test_index_without_formats_is_refused(tmp_path):
    (tmp_path / "index.json").write_text(json.dumps({"config": {"data_spec": "x"}, "chunks": []}))
    with pytest.raises(UnsafeDatasetError, match="no 'data_format'"):
        check_prepared_dir(str(tmp_path))
