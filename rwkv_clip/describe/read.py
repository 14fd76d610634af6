"""Read: the input rows of a describe run, under the schema's field names.

The columns named by ``--text_key`` and the others are renamed to ``text``, ``synthetic_caption``, ``tags``,
``image`` and ``key``, so the output feeds ``prepare`` with its default keys; other columns are carried along.
Images: a relative path is resolved against the input file's folder, bytes (LitData, Parquet) stay bytes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from rwkv_clip.describe.prompt import PROMPT_FIELDS
from rwkv_clip.schema import (IMAGE, SYNTHETIC_CAPTION, TAGS, TEXT, Columns, check_prepared_dir, clean_text,
                              format_tags, index_fields)
from rwkv_clip.tables import FORMAT_BY_SUFFIX, TABLE_FORMATS, Table, image_value, table_format

log = logging.getLogger("rwkv_clip.describe")

INPUT_FORMATS = (*TABLE_FORMATS, "litdata")


def input_format(path: str) -> str:
    """The format of an input from its suffix, or "litdata" for a prepared directory."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "index.json")):
            return "litdata"
        raise ValueError(f"input {path} is a directory without index.json, so not a prepared LitData dataset")
    fmt = table_format(path)
    if fmt is None:
        raise ValueError(f"input {path}: unknown format from suffix {Path(path).suffix!r}; use one of "
                         f"{', '.join(sorted(FORMAT_BY_SUFFIX))} or a LitData directory (or pass --input_format)")
    return fmt


class RowReader:
    """The rows of a CSV/TSV, JSONL or Parquet file or of a prepared LitData directory, as ``(index, row, error)``:
    ``row`` in the schema's field names, or None with ``error`` ("file:line: why") for a row that cannot be read.

    The columns are checked when the reader is made, so a wrong ``--text_key`` fails before any output exists.
    """

    def __init__(self, path: str, columns: Columns = Columns(), fmt: Optional[str] = None,
                 required: tuple = (), any_of: tuple = PROMPT_FIELDS) -> None:
        if not os.path.exists(path):
            raise ValueError(f"input {path} does not exist")
        self.path, self.columns = str(path), columns
        self.fmt = fmt or input_format(self.path)
        if self.fmt not in INPUT_FORMATS:
            raise ValueError(f"--input_format must be one of {INPUT_FORMATS}, got {self.fmt!r}")
        if self.fmt == "litdata":
            self._table = None
            self.base_dir = os.path.abspath(self.path)
            found = index_fields(check_prepared_dir(self.path)) or []
        else:
            self._table = Table(self.path, self.fmt)
            self.base_dir = self._table.base_dir
            found = self._table.columns()
        absent = columns.check(found, f"input {self.path}", required=required, any_of=any_of)
        missing = [getattr(columns, f) for f in any_of if f in absent]
        if missing:
            log.warning("input %s has no column(s) %s; they are treated as empty", self.path, missing)
        self._len: Optional[int] = None

    @property
    def total(self) -> int:
        """The rows there are to do (a step reader has fewer than the index range when input rows were unreadable)."""
        return len(self)

    def __len__(self) -> int:
        if self._len is None:
            if self._table is not None:
                log.info("counting rows of %s", self.path)
                self._len = self._table.count()
            else:
                self._len = len(self._litdata())
        return self._len

    def _litdata(self) -> Any:
        try:
            from litdata import StreamingDataset
        except ImportError:
            raise ImportError("reading a LitData directory needs litdata: pip install litdata") from None
        return StreamingDataset(os.path.abspath(self.path), shuffle=False)

    def rows(self, want: Optional[Callable[[int], bool]] = None) -> Iterator[tuple[int, Optional[dict], Optional[str]]]:
        """Every row, or only those with ``want(index)`` true (a resume skips the rest cheaply)."""
        if self._table is None:
            for i, sample in enumerate(self._litdata()):
                if want is None or want(i):
                    yield i, self.canonical(dict(sample)), None
            return
        for row in self._table:
            if want is None or want(row.index):
                if row.values is None:
                    yield row.index, None, f"{row.where}: {row.error}"
                else:
                    yield row.index, self.canonical(row.values), None

    def canonical(self, raw: dict[str, Any]) -> dict[str, Any]:
        row = self.columns.rename(raw)
        for f in (TEXT, SYNTHETIC_CAPTION):
            row[f] = clean_text(row.get(f))
        tags = row.get(TAGS)
        row[TAGS] = tags.strip() if isinstance(tags, str) else format_tags(tags)  # kept as written, lists joined
        if IMAGE in row:
            row[IMAGE] = image_value(row[IMAGE], self.base_dir)
        return row


class StepReader(RowReader):
    """The finished output of one step of ``describe all`` as the input of the next, under the first input's row
    indices: each record starts with ``row`` (its index in the first input) and ends with the step's ``status`` and
    ``reason``, which are carried on as ``<step>_status`` and ``<step>_reason``."""

    def __init__(self, path: str, n_rows: int, step: str) -> None:
        super().__init__(path, Columns(), "jsonl", any_of=())
        self._len, self.step = n_rows, step
        self._total: Optional[int] = None

    @property
    def total(self) -> int:
        if self._total is None:
            self._total = sum(1 for _ in self.rows())
        return self._total

    def rows(self, want: Optional[Callable[[int], bool]] = None) -> Iterator[tuple[int, Optional[dict], Optional[str]]]:
        for row in self._table:
            if row.values is None or not row.ended:  # the step finished, so its journal was cleaned by the resume
                continue
            values = dict(row.values)
            idx = int(values.pop("row"))
            if want is None or want(idx):
                values[f"{self.step}_status"] = values.pop("status", "")
                values[f"{self.step}_reason"] = values.pop("reason", "")
                yield idx, self.canonical(values), None
