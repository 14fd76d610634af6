"""The data schema of rwkv-clip, in one place: what a prepared sample holds, which input column feeds each field,
how tags are written, and how a prepared LitData directory is opened without running code stored in it.

A prepared sample (written by ``python -m rwkv_clip.datamodules.prepare``) is a dict:

| field               | type  | what                                                              |
|---------------------|-------|-------------------------------------------------------------------|
| `key`               | str   | unique id of the pair                                             |
| `image`             | bytes | the encoded image (JPEG)                                          |
| `text`              | str   | the raw alt-text ("" when missing)                                |
| `synthetic_caption` | str   | a captioner's caption ("" when missing)                           |
| `generated_caption` | str   | an LLM's description merging the others ("" when missing)         |
| `tags`              | str   | object tags, ``"a, b, c"``: input to the LLM only, never trained on |

Evaluation sets may add an int `label`. Every image the towers see is normalised with CLIP's mean and std
(``CLIP_MEAN``, ``CLIP_STD``: OpenAI's values, as timm ships them). This module imports neither torch nor litdata
(timm only when those two are first read), so command-line tools that only read tables start at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterable, Optional, Sequence

KEY = "key"
IMAGE = "image"
TEXT = "text"
SYNTHETIC_CAPTION = "synthetic_caption"
GENERATED_CAPTION = "generated_caption"
TAGS = "tags"
LABEL = "label"
TEXT_FIELDS = (TEXT, SYNTHETIC_CAPTION, GENERATED_CAPTION)  # the three texts a training sample draws from
SAMPLE_FIELDS = (KEY, IMAGE, *TEXT_FIELDS, TAGS)  # a prepared sample, in its stored order


def clean_text(value: Any) -> str:
    """A table cell as a stripped string; a missing cell (None, NaN) as ``""``."""
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN from pandas-written tables
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return str(value).strip()


# ---------------------------------------------------------------------------------------------------- columns

@dataclasses.dataclass(frozen=True)
class Columns:
    """Which input column (or sidecar JSON key) holds each sample field.

    ``Columns(text="title")`` reads the sample's ``text`` from the column ``title``; the commands set it with
    ``--text_key title`` (``--id_key`` for ``key``).
    """

    key: str = KEY
    image: str = IMAGE
    text: str = TEXT
    synthetic_caption: str = SYNTHETIC_CAPTION
    generated_caption: str = GENERATED_CAPTION
    tags: str = TAGS

    @staticmethod
    def flag(field: str) -> str:
        """The command-line option that names the column of ``field``."""
        return "--id_key" if field == KEY else f"--{field}_key"

    def get(self, row: dict[str, Any], field: str) -> Any:
        return row.get(getattr(self, field))

    def rename(self, row: dict[str, Any]) -> dict[str, Any]:
        """The row with each mapped column under its field's name; other columns are kept as they are."""
        out = dict(row)
        for f in dataclasses.fields(self):
            column = getattr(self, f.name)
            if column != f.name and column in out:
                out[f.name] = out.pop(column)
        return out

    def check(self, found: Sequence[str], where: str, required: Sequence[str] = (),
              any_of: Sequence[str] = ()) -> list[str]:
        """Raise a ValueError naming ``where`` and the columns ``found`` when a ``required`` field's column is
        missing, when none of ``any_of`` is there, or when a column the user renamed on purpose is not there.
        Returns the optional fields whose column is absent."""
        found = list(found)
        for field in required:
            column = getattr(self, field)
            if column not in found:
                raise ValueError(f"{where}: missing required column {column!r} ({field}); columns found: {found}. "
                                 f"Rename the column or pass {self.flag(field)} <column>.")
        if any_of and not any(getattr(self, f) in found for f in any_of):
            names = ", ".join(repr(getattr(self, f)) for f in any_of)
            flags = ", ".join(self.flag(f) for f in any_of)
            raise ValueError(f"{where} has none of the columns {names} (found: {found[:20]}); rename them with "
                             f"{flags}")
        absent = []
        for f in dataclasses.fields(self):
            column = getattr(self, f.name)
            if column not in found:
                if column != f.default:
                    raise ValueError(f"{where}: column {column!r} given with {self.flag(f.name)} is not in the file; "
                                     f"columns found: {found}")
                absent.append(f.name)
        return absent


# ---------------------------------------------------------------------------------------------------- tags

_TAG_SEPARATORS = re.compile(r"[|,;]")  # RAM++ writes "a | b | c"; people write "a, b" or "a; b"


def parse_tags(value: Any) -> list[str]:
    """Tags from a list, a JSON list in a string, or a string separated by ``,``, ``|`` or ``;``.

    Whitespace is collapsed, empty tags dropped and repeats (case-insensitive) kept once, in first-seen order.
    """
    if value is None:
        return []
    if isinstance(value, float) and value != value:  # NaN from pandas-written tables
        return []
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        s = value.strip()
        parsed = None
        if s.startswith("["):
            try:
                parsed = json.loads(s)
            except ValueError:
                parsed = None
        parts: Iterable[Any] = parsed if isinstance(parsed, list) else _TAG_SEPARATORS.split(s)
    elif isinstance(value, Iterable):  # list, tuple, numpy array, pyarrow list
        parts = value
    else:
        parts = [value]
    seen, out = set(), []
    for part in parts:
        tag = " ".join(str(part).split()) if part is not None else ""
        if tag and tag.lower() not in seen:
            seen.add(tag.lower())
            out.append(tag)
    return out


def format_tags(value: Any) -> str:
    """Tags as the one string a prepared sample stores: ``"a, b, c"``."""
    return ", ".join(parse_tags(value))


# ---------------------------------------------------------------------------------------------------- LitData

# LitData serialises each field with a named serializer, recorded in index.json's "data_format". Streaming
# deserialises with it, and "pickle" (also chosen for any field type litdata does not know) unpickles, which runs
# code. Every reader of a LitData directory checks the formats against this list before it reads a sample.
# "file", "video", "audio" and the like write temporary files and call external decoders; they are refused too.
SAFE_DATA_FORMATS = frozenset({"str", "text", "bytes", "int", "float", "bool", "jpeg", "pil",
                               "numpy", "no_header_numpy", "tensor", "no_header_tensor"})


class UnsafeDatasetError(ValueError):
    """A LitData directory stores a field in a format whose reading could run code."""


def read_index(index_path: str) -> dict[str, Any]:
    """The parsed ``index.json`` of a LitData directory, with errors that name the file."""
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{index_path} does not exist: the folder is not a prepared LitData dataset; create one with "
            "`python -m rwkv_clip.datamodules.prepare`") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{index_path} is not valid JSON ({e}): the dataset's index is damaged; prepare the "
                         "dataset again, or restore index.json") from None
    if not (isinstance(index, dict) and isinstance(index.get("config"), dict)
            and isinstance(index.get("chunks"), list)):
        raise ValueError(f"{index_path} is not a LitData index (it needs a 'config' object and a 'chunks' list)")
    return index


def index_fields(config: dict[str, Any]) -> Optional[list[str]]:
    """Field names recorded in an index's ``config``, in the order of its ``data_format`` (None when unknown)."""
    try:
        spec = json.loads(config["data_spec"])
        return list(json.loads(spec[1]["context"]))
    except (KeyError, TypeError, ValueError, IndexError):
        types = config.get("types")  # newer litdata also writes {field: format}, sorted by name
        return list(types) if isinstance(types, dict) else None


def check_data_format(config: dict[str, Any], where: str) -> None:
    """Refuse an index whose fields are stored in a format outside :data:`SAFE_DATA_FORMATS`."""
    formats = config.get("data_format")
    if not isinstance(formats, list) or not formats:
        raise UnsafeDatasetError(f"{where}: the index records no 'data_format', so it cannot be checked before "
                                 "reading; prepare the dataset again with `python -m rwkv_clip.datamodules.prepare`")
    fields = index_fields(config)
    if fields is None or len(fields) != len(formats):
        fields = [f"field {i}" for i in range(len(formats))]
    stored = list(zip(fields, formats))
    if isinstance(config.get("types"), dict):
        stored += list(config["types"].items())
    bad = list(dict.fromkeys((str(name), str(fmt)) for name, fmt in stored
                             if not isinstance(fmt, str) or fmt.split(":")[0] not in SAFE_DATA_FORMATS))
    if bad:
        listed = ", ".join(f"{name!r} as {fmt!r}" for name, fmt in bad)
        raise UnsafeDatasetError(
            f"{where} stores {listed}: reading such a field could run code stored in the data (pickle) or call "
            f"external decoders, so it is refused. Allowed formats: {sorted(SAFE_DATA_FORMATS)}. Store images as "
            "bytes and texts as str, as `python -m rwkv_clip.datamodules.prepare` does.")


def check_prepared_dir(path: str) -> dict[str, Any]:
    """Check a local LitData directory before anything reads it; returns its index ``config``."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} does not exist or is not a directory; create a dataset with "
                                "`python -m rwkv_clip.datamodules.prepare`")
    index_path = os.path.join(path, "index.json")
    config = read_index(index_path)["config"]
    check_data_format(config, index_path)
    return config


def __getattr__(name: str) -> Any:
    """``CLIP_MEAN`` and ``CLIP_STD`` from timm, imported on first use (timm imports torch)."""
    if name in ("CLIP_MEAN", "CLIP_STD"):
        from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        return OPENAI_CLIP_MEAN if name == "CLIP_MEAN" else OPENAI_CLIP_STD
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
