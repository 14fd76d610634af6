"""Tables in and out: CSV, TSV, JSONL and Parquet, for ``prepare``, ``describe`` and evaluation.

Reading (:class:`Table`):
- every row comes with its 0-based index and where it is (``file:line``, ``file:row N`` for Parquet), so a
  message can name both;
- a row that cannot be read comes back with the reason instead of stopping the read: invalid UTF-8, bad JSON, a
  CSV record with the wrong number of fields or a broken quote. One bad row never ends a long job, and counting
  the rows and reading them always agree (blank lines are no rows);
- :func:`image_value` turns an image cell into bytes, or a string: an absolute path (a relative one starts at the
  table's folder), a URL or a data URI.

CSV, TSV and JSONL are read line by line with Python's ``csv`` and ``json``: pyarrow's readers cannot say on which
line a row starts once values hold newlines, and stop at the first bad JSON line. Parquet is read with pyarrow.

Writing: :func:`write_json_atomic` and :func:`atomic_file` replace a file in one step; :class:`TableAppender`
appends rows crash-safely: a crash loses at most the rows since the last ``flush()``, a cut last row is detected
when the file is read back, and :func:`keep_rows` removes it (or any other rows) before appending again.
:func:`write_parquet` writes a Parquet file atomically.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import dataclasses
import io
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

log = logging.getLogger(__name__)

TABLE_FORMATS = ("csv", "tsv", "jsonl", "parquet")
FORMAT_BY_SUFFIX = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images make long cells


def table_format(path: str) -> Optional[str]:
    """The table format of ``path`` from its suffix, or None."""
    return FORMAT_BY_SUFFIX.get(Path(path).suffix.lower())


def need_pyarrow():
    """``pyarrow.parquet``, or an ImportError that says what to do."""
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("Parquet input/output needs pyarrow, which is not installed: `pip install pyarrow`, "
                          "or use CSV/JSONL instead") from None
    return pq


# ------------------------------------------------------------------------------------------------------ reading

@dataclasses.dataclass
class Row:
    """One row of a table: its ``values`` (column -> value), or None and the ``error`` that kept it unread."""

    index: int                      # 0-based, counting every row (read or not) in file order
    where: str                      # "file:line" (the row's first line) or "file:row N"
    values: Optional[dict[str, Any]] = None
    error: Optional[str] = None
    start: int = 0                  # byte offsets of the row in a text file
    end: int = 0
    ended: bool = True              # its last line ends with a newline (False: the file was cut in this row)


class _Lines:
    """The lines of a binary file, decoded one by one: line numbers and byte offsets are tracked, and a line that
    is not UTF-8 is decoded with replacement characters and noted in ``bad`` (for the row it belongs to)."""

    def __init__(self, f: io.BufferedReader) -> None:
        self.f, self.lineno, self.offset, self.ended = f, 0, 0, True
        self.bad: Optional[str] = None

    def __iter__(self) -> Iterator[str]:
        for raw in self.f:
            self.lineno += 1
            self.offset += len(raw)
            self.ended = raw.endswith(b"\n")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if self.bad is None:
                    self.bad = (f"invalid UTF-8 on line {self.lineno} (byte {e.start + 1} of the line is "
                                f"{raw[e.start:e.start + 1]!r}); save the file as UTF-8")
                text = raw.decode("utf-8", errors="replace")
            if self.lineno == 1 and text.startswith("\ufeff"):  # a byte-order mark (Excel's "CSV UTF-8")
                text = text[1:]
            yield text


class Table:
    """A CSV, TSV, JSONL or Parquet file, read row by row (see the module docstring)."""

    def __init__(self, path: str, fmt: Optional[str] = None) -> None:
        self.path = str(path)
        self.fmt = fmt or table_format(self.path)
        if self.fmt not in TABLE_FORMATS:
            raise ValueError(f"{self.path}: cannot tell the table format from its suffix; use one of "
                             f"{', '.join(sorted(FORMAT_BY_SUFFIX))}")
        if not os.path.isfile(self.path):
            raise ValueError(f"{self.path} does not exist or is not a file")
        self._header: Optional[list[str]] = None

    @property
    def base_dir(self) -> str:
        """The folder that relative image paths in this table start from."""
        return os.path.dirname(os.path.abspath(self.path))

    # -- columns
    def columns(self) -> list[str]:
        """The column names: the CSV header, the keys of the first JSON object, or the Parquet schema. Cheap: it
        reads the start of the file only. A file whose header (or first record) is unreadable raises ValueError."""
        if self.fmt == "parquet":
            return list(self._parquet().schema_arrow.names)
        if self.fmt == "jsonl":
            for row in self._jsonl():
                if row.values is None:
                    raise ValueError(f"{row.where}: {row.error}; JSONL needs one JSON object per line")
                return list(row.values)
            return []
        return list(self._csv_header())

    # -- rows
    def __iter__(self) -> Iterator[Row]:
        if self.fmt == "jsonl":
            return self._jsonl()
        if self.fmt == "parquet":
            return self._parquet_rows()
        return self._csv()

    def count(self) -> int:
        """The number of rows (read or not): exactly what iterating yields."""
        if self.fmt == "parquet":
            return self._parquet().metadata.num_rows
        return sum(1 for _ in self)

    def estimate_rows(self) -> int:
        """A fast row count for a progress bar: lines for text formats (exact unless values hold newlines)."""
        if self.fmt == "parquet":
            return self.count()
        with open(self.path, "rb") as f:
            lines = sum(buf.count(b"\n") for buf in iter(lambda: f.read(1 << 20), b""))
        return max(0, lines - (self.fmt != "jsonl"))

    def _jsonl(self) -> Iterator[Row]:
        index = 0
        with open(self.path, "rb") as f:
            lines = _Lines(f)
            start = 0
            for text in lines:
                row = Row(index, f"{self.path}:{lines.lineno}", start=start, end=lines.offset, ended=lines.ended)
                start = lines.offset
                if not text.strip():
                    lines.bad = None
                    continue
                if lines.bad is not None:
                    row.error, lines.bad = lines.bad, None
                else:
                    try:
                        obj = json.loads(text)
                    except ValueError as e:
                        obj, row.error = None, f"unreadable JSON ({e})"
                    if isinstance(obj, dict):
                        row.values = obj
                    elif row.error is None:
                        row.error = f"a JSON {type(obj).__name__} where an object was expected"
                yield row
                index += 1

    def _records(self) -> Iterator[tuple[int, Optional[list[str]], Optional[str], int, int, int, bool]]:
        """(first line, last line, fields or None, error, start, end, ended) of each non-blank CSV record."""
        with open(self.path, "rb") as f:
            lines = _Lines(f)
            reader = csv.reader(iter(lines), delimiter="\t" if self.fmt == "tsv" else ",", strict=True)
            while True:
                first, start = lines.lineno + 1, lines.offset
                lines.bad = None
                try:
                    fields: Optional[list[str]] = next(reader)
                    error = lines.bad
                except StopIteration:
                    return
                except csv.Error as e:
                    fields = None
                    error = lines.bad or f"malformed CSV ({e})" + (
                        f": a quote opened on line {first} is not closed properly, so lines {first}-{lines.lineno} "
                        "were read as one row" if lines.lineno > first else "")
                if error is None and (not fields or (len(fields) == 1 and not fields[0].strip())):
                    continue  # a blank line
                yield first, lines.lineno, fields, error, start, lines.offset, lines.ended

    def _csv_header(self) -> list[str]:
        if self._header is None:
            for first, _, fields, error, *_ in self._records():
                if error is not None:
                    raise ValueError(f"{self.path}:{first}: cannot read the header: {error}")
                self._header = fields
                break
            else:
                self._header = []
        return self._header

    def _csv(self) -> Iterator[Row]:
        records = self._records()
        header = None
        for first, last, fields, error, start, end, ended in records:
            if header is None:
                if error is not None:
                    raise ValueError(f"{self.path}:{first}: cannot read the header: {error}")
                header = self._header = fields
                index = 0
                continue
            row = Row(index, f"{self.path}:{first}", start=start, end=end, ended=ended)
            index += 1
            if error is None and len(fields) != len(header):
                n = len(fields)
                error = f"{n} field{'s' if n != 1 else ''} where the header has {len(header)}"
                if last > first:
                    error += (f" (lines {first}-{last} were read as one row: is a quote on line {first} "
                              "not closed?)")
            if error is not None:
                row.error = error
            else:
                row.values = dict(zip(header, fields))
            yield row

    def _parquet(self):
        pq = need_pyarrow()
        try:
            return pq.ParquetFile(self.path)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses
            raise ValueError(f"{self.path} is not a readable Parquet file ({type(e).__name__}: {e})") from None

    def _parquet_rows(self) -> Iterator[Row]:
        index = 0
        for batch in self._parquet().iter_batches(batch_size=1024):
            for values in batch.to_pylist():
                yield Row(index, f"{self.path}:row {index}", values)
                index += 1

    # -- Parquet row groups (a worker process can read one by itself)
    def row_groups(self) -> list[tuple[int, int, int]]:
        """(row group, index of its first row, rows) of a Parquet file."""
        meta = self._parquet().metadata
        out, offset = [], 0
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            out.append((rg, offset, n))
            offset += n
        return out

    def read_row_group(self, rg: int, offset: int, columns: Optional[list[str]] = None) -> list[Row]:
        rows = self._parquet().read_row_group(rg, columns=columns).to_pylist()
        return [Row(offset + j, f"{self.path}:row {offset + j}", values) for j, values in enumerate(rows)]

    def column_is_binary(self, name: str) -> bool:
        """True when a Parquet column holds bytes (or image structs with bytes) rather than paths."""
        import pyarrow as pa

        t = self._parquet().schema_arrow.field(name).type
        return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_struct(t)


# ------------------------------------------------------------------------------------------------------ images

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(value: str) -> bool:
    return bool(_URL.match(value))


def image_value(value: Any, base_dir: str) -> Union[bytes, str, None]:
    """An image cell as bytes, or as a string: an absolute path (a relative one starts at ``base_dir``), a URL or a
    ``data:`` URI. Accepts bytes, paths, Hugging Face image dicts ``{"bytes", "path"}`` and PIL images; None when
    the cell is empty."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value) or None
    if isinstance(value, dict):
        return image_value(value.get("bytes") or value.get("path"), base_dir)
    if hasattr(value, "save") and hasattr(value, "size"):  # a PIL image (litdata can decode JPEG fields to PIL)
        buf = io.BytesIO()
        value.save(buf, format=getattr(value, "format", None) or "JPEG")
        return buf.getvalue()
    s = str(value).strip()
    if not s:
        return None
    if s.startswith("data:") or is_url(s):
        return s
    return os.path.abspath(os.path.join(base_dir, os.path.expanduser(s)))


def decode_data_uri(value: str) -> bytes:
    """The bytes of a base64 ``data:image/...;base64,...`` URI."""
    head, _, payload = value.partition(",")
    if ";base64" not in head:
        raise ValueError("only base64 data URIs are supported")
    return base64.b64decode(payload, validate=False)


# ------------------------------------------------------------------------------------------------------ writing

@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w"):
    """Open a temporary file beside ``path``; on success it is flushed, fsync'ed and renamed over ``path``, on an
    error removed. Readers see the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, obj: Any) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)


def encode_value(value: Any) -> Any:
    """A value as JSON can hold it: bytes become ``{"$bytes": base64}`` (:func:`decode_value` reverses it)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    return value


def decode_value(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"$bytes"}:
        return base64.b64decode(value["$bytes"])
    return value


class TableAppender:
    """Appends rows (dicts) to a JSONL, CSV or TSV file; :meth:`flush` makes them durable (flush + fsync).

    CSV/TSV take their header from the file, or from the first row written; later rows are written in its order
    (missing columns empty, extra ones dropped with one warning). Lists and dicts go into CSV cells as JSON, and
    bytes into any cell as ``{"$bytes": base64}``.

    After a crash, read the file back with :class:`Table` (a cut row comes back unreadable, or without
    ``ended``) and remove what is not wanted with :func:`keep_rows` before appending again: a CSV row cut inside
    a quoted cell would swallow the rows written after it. (A file that does not end with a newline gets one
    first, so at least a cut JSONL line never spoils the next.)
    """

    def __init__(self, path: str, fmt: str) -> None:
        if fmt not in ("csv", "tsv", "jsonl"):
            raise ValueError(f"cannot append to a {fmt} table; use csv, tsv or jsonl")
        self.path, self.fmt = str(path), fmt
        self._header: Optional[list[str]] = None
        size = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        if size and fmt != "jsonl":
            self._header = Table(self.path, fmt)._csv_header() or None
        self._f = open(self.path, "a", encoding="utf-8", newline="")
        if size:
            with open(self.path, "rb") as g:
                g.seek(size - 1)
                if g.read(1) != b"\n":
                    self._f.write("\n")
        self._csv = csv.writer(self._f, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n")
        self._warned = False

    def write(self, row: dict[str, Any]) -> None:
        if self.fmt == "jsonl":
            self._f.write(json.dumps({k: encode_value(v) for k, v in row.items()}, ensure_ascii=False,
                                     default=str) + "\n")
            return
        if self._header is None:
            self._header = list(row)
            self._csv.writerow(self._header)
        extra = set(row) - set(self._header)
        if extra and not self._warned:
            self._warned = True
            log.warning("%s: dropping columns not in its header: %s", self.path, sorted(extra))
        self._csv.writerow([_cell(row.get(k)) for k in self._header])

    def flush(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self.flush()
            self._f.close()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple, bytes, bytearray, memoryview)):
        return json.dumps(encode_value(value), ensure_ascii=False, default=str)
    return str(value)


def keep_rows(path: str, fmt: str, keep: Callable[[int, Row], bool]) -> int:
    """Leave only the rows of a CSV, TSV or JSONL file for which ``keep(ordinal, row)`` is true (``ordinal``
    counts every row, read or not); returns how many are kept. When every dropped row comes after the last kept
    one (the leftover of a crash) the file is cut there, else it is rewritten atomically. Kept rows keep their
    exact bytes."""
    spans, header_end = [], None  # byte ranges of the kept rows, in file order
    for ordinal, row in enumerate(Table(path, fmt)):
        if header_end is None:
            header_end = row.start  # CSV: the header (and any blank lines) before the first row
        if keep(ordinal, row):
            spans.append((row.start, row.end))
    if header_end is None:
        return 0
    ends = [header_end] + [end for _, end in spans]
    if all(start == end for (start, _), end in zip(spans, ends)):
        with open(path, "rb+") as f:
            f.truncate(ends[-1])
            f.flush()
            os.fsync(f.fileno())
        return len(spans)
    with open(path, "rb") as src, atomic_file(path, "wb") as dst:
        dst.write(src.read(header_end))
        for start, end in spans:
            src.seek(start)
            dst.write(src.read(end - start))
    return len(spans)


def write_parquet(path: str, rows: Callable[[], Iterable[dict[str, Any]]], batch_rows: int = 2048) -> int:
    """Write the dicts that ``rows()`` yields to a Parquet file, atomically; returns the row count.

    ``rows`` is called twice: once to find the columns (in first-seen order) and their types (bytes, int, float
    or bool when every value is one; otherwise str, with lists and dicts as JSON), once to write.
    """
    pq = need_pyarrow()
    import pyarrow as pa

    seen: dict[str, set] = {}
    for rec in rows():
        for k, v in rec.items():
            seen.setdefault(k, set())
            if v is not None:
                seen[k].add(type(v))

    def arrow_type(ts: set) -> Any:
        if ts == {bytes}:
            return pa.binary()
        if ts and ts <= {int}:
            return pa.int64()
        if ts and ts <= {int, float}:
            return pa.float64()
        if ts == {bool}:
            return pa.bool_()
        return pa.string()

    schema = pa.schema([(k, arrow_type(ts)) for k, ts in seen.items()])
    as_string = {k for k in seen if schema.field(k).type == pa.string()}

    def norm(k: str, v: Any) -> Any:
        if v is None or k not in as_string or isinstance(v, str):
            return v
        return json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else str(v)

    n = 0
    with atomic_file(path, "wb") as f, pq.ParquetWriter(f, schema) as w:
        buf: list[dict[str, Any]] = []
        for rec in rows():
            buf.append({k: norm(k, rec.get(k)) for k in seen})
            if len(buf) >= batch_rows:
                w.write_table(pa.Table.from_pylist(buf, schema=schema))
                n, buf = n + len(buf), []
        if buf or n == 0:
            w.write_table(pa.Table.from_pylist(buf, schema=schema))
            n += len(buf)
    return n
