"""Row readers (CSV/TSV, JSONL, Parquet, LitData) and crash-safe appending writers (JSONL, CSV/TSV, Parquet).

Rows come out canonical: the columns named by the key flags are renamed to text / synthetic_caption / tags /
image / key, so the output feeds `python -m rwkv_clip.datamodules.prepare` with its default keys.
Images: a relative path is resolved against the input file's folder; bytes (LitData, Parquet) are kept as bytes.
Writers: JSONL and CSV are appended and fsync'ed per batch, every record complete or detectably cut (JSONL: a
line without its newline; CSV: `row` is the first column and `status` the last, so a cut record is short).
Parquet cannot be appended: rows go to a JSONL journal beside it and the .parquet is written at the end.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import os
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

log = logging.getLogger("rwkv_clip.describe")

STATUSES = ("generated", "fallback", "failed")
_STATUS_CODE = {s: i + 1 for i, s in enumerate(STATUSES)}
INPUT_FORMATS = ("csv", "tsv", "jsonl", "parquet", "litdata")
OUTPUT_FORMATS = ("csv", "tsv", "jsonl", "parquet")
_EXT = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}

csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))


def need_pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("Parquet input/output needs pyarrow, which is not installed: `pip install pyarrow`, "
                          "or use CSV/JSONL instead") from None
    return pq


def detect_format(path: str, kind: str = "input") -> str:
    p = Path(path)
    if kind == "input" and p.is_dir():
        if (p / "index.json").is_file():
            return "litdata"
        raise ValueError(f"input {path} is a directory without index.json, so not a prepared LitData dataset")
    fmt = _EXT.get(p.suffix.lower())
    allowed = INPUT_FORMATS if kind == "input" else OUTPUT_FORMATS
    if fmt is None:
        raise ValueError(f"{kind} {path}: unknown format from suffix {p.suffix!r}; use one of "
                         f"{', '.join(sorted(_EXT))}" + (" or a LitData directory" if kind == "input" else "")
                         + f" (or pass --{kind}_format)")
    return fmt


@dataclass
class Keys:
    """Input column names of each canonical field (like the prepare command's --text_key etc.)."""
    text: str = "text"
    synthetic_caption: str = "synthetic_caption"
    tags: str = "tags"
    image: str = "image"
    key: str = "key"

    def mapping(self) -> dict:
        return {"text": self.text, "synthetic_caption": self.synthetic_caption, "tags": self.tags,
                "image": self.image, "key": self.key}


def _is_url(s: str) -> bool:
    return "://" in s[:16]


def _image_value(v, base_dir: Path):
    """Image as bytes, or an absolute path / URL string."""
    if v is None:
        return None
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    if isinstance(v, dict):  # Hugging Face datasets' Image struct: {"bytes": ..., "path": ...}
        return _image_value(v.get("bytes") or v.get("path"), base_dir)
    if hasattr(v, "save") and hasattr(v, "size"):  # PIL image (litdata can decode JPEG columns to PIL)
        buf = io.BytesIO()
        v.save(buf, format=getattr(v, "format", None) or "JPEG")
        return buf.getvalue()
    s = str(v)
    if not s or _is_url(s) or os.path.isabs(s):
        return s
    return str((base_dir / s).resolve())


class RowSource:
    """Iterates `(index, row, error)`: row is a canonical dict, or None with an error string for an unreadable one."""

    def __init__(self, path: str, keys: Keys = Keys(), fmt: Optional[str] = None):
        self.path = str(path)
        p = Path(path)
        if not p.exists():
            raise ValueError(f"input {path} does not exist")
        self.fmt = fmt or detect_format(path, "input")
        if self.fmt not in INPUT_FORMATS:
            raise ValueError(f"--input_format must be one of {INPUT_FORMATS}, got {self.fmt!r}")
        self.keys = keys
        self.base_dir = p.resolve() if self.fmt == "litdata" else p.resolve().parent
        self._len: Optional[int] = None
        self._checked = False

    # ------------------------------------------------------------------------------ length
    def __len__(self) -> int:
        if self._len is None:
            self._len = self._count()
        return self._len

    def _count(self) -> int:
        if self.fmt == "jsonl":
            with open(self.path, "rb") as f:
                return sum(1 for line in f if line.strip())
        if self.fmt in ("csv", "tsv"):
            with open(self.path, newline="", encoding="utf-8-sig") as f:
                r = csv.reader(f, delimiter="\t" if self.fmt == "tsv" else ",")
                return max(0, sum(1 for _ in r) - 1)
        if self.fmt == "parquet":
            return need_pyarrow().ParquetFile(self.path).metadata.num_rows
        return len(self._litdata())

    def _litdata(self):
        try:
            from litdata import StreamingDataset
        except ImportError:
            raise ImportError("reading a LitData directory needs litdata: pip install litdata") from None
        return StreamingDataset(str(Path(self.path).resolve()), shuffle=False)

    # ------------------------------------------------------------------------------ rows
    def _raw(self) -> Iterator[tuple[Optional[dict], Optional[str]]]:
        if self.fmt == "jsonl":
            with open(self.path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except ValueError as e:
                        yield None, f"unreadable JSON on line {n} of {self.path}: {e}"
                        continue
                    yield (obj, None) if isinstance(obj, dict) else (None, f"line {n} is not a JSON object")
        elif self.fmt in ("csv", "tsv"):
            with open(self.path, newline="", encoding="utf-8-sig") as f:
                r = csv.DictReader(f, delimiter="\t" if self.fmt == "tsv" else ",")
                self._check_columns(r.fieldnames or [])
                for row in r:
                    row.pop(None, None)  # extra unnamed fields of a ragged row
                    yield row, None
        elif self.fmt == "parquet":
            pf = need_pyarrow().ParquetFile(self.path)
            self._check_columns(pf.schema_arrow.names)
            for batch in pf.iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    yield row, None
        else:
            ds = self._litdata()
            for row in ds:
                yield dict(row), None

    def _check_columns(self, cols) -> None:
        if self._checked:
            return
        self._checked = True
        m = self.keys.mapping()
        present = [f for f in ("text", "synthetic_caption", "tags") if m[f] in cols]
        if not present:
            raise ValueError(f"input {self.path} has none of the columns {m['text']!r}, {m['synthetic_caption']!r}, "
                             f"{m['tags']!r} (found: {list(cols)[:20]}); rename them with --text_key, "
                             "--synthetic_caption_key and --tags_key")
        missing = [m[f] for f in ("text", "synthetic_caption", "tags") if f not in present]
        if missing:
            log.warning("input %s has no column(s) %s; they are treated as empty", self.path, missing)

    def canonical(self, raw: dict) -> dict:
        row = dict(raw)
        for canon, src in self.keys.mapping().items():
            if src != canon and src in row:
                row[canon] = row.pop(src)
        for f in ("text", "synthetic_caption"):
            v = row.get(f)
            row[f] = "" if v is None else str(v)
        t = row.get("tags")
        row["tags"] = ", ".join(map(str, t)) if isinstance(t, (list, tuple)) else ("" if t is None else str(t))
        if "image" in row:
            row["image"] = _image_value(row["image"], self.base_dir)
        return row

    def __iter__(self) -> Iterator[tuple[int, Optional[dict], Optional[str]]]:
        return self.rows()

    def rows(self, want=None) -> Iterator[tuple[int, Optional[dict], Optional[str]]]:
        """Like iter(), but only rows with want(index) true are canonicalised and yielded (cheap resume skips)."""
        for i, (raw, err) in enumerate(self._raw()):
            if raw is not None and not self._checked:
                self._check_columns(raw.keys())
            if want is None or want(i):
                yield i, (self.canonical(raw) if raw is not None else None), err


# ---------------------------------------------------------------------------------------------- writing
def _image_ext(b: bytes) -> str:
    if b[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if b[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if b[:4] == b"RIFF" and b[8:12] == b"WEBP":
        return ".webp"
    if b[:4] in (b"GIF8",):
        return ".gif"
    return ".img"


def order_columns(row: dict) -> list:
    """row first, status last: lets a resume detect a CSV record cut by a kill (see module docstring)."""
    tail = ["generated_caption", "reason", "status"]
    return ["row"] + [k for k in row if k not in tail and k != "row"] + tail


class RowWriter:
    """Appends finished rows to a JSONL or CSV file; `flush()` makes them durable (flush + fsync).

    Image bytes are written as files under `images_dir` (path in the row, relative to the output's folder), or,
    with bytes_mode="b64" (the Parquet journal), inlined as {"$bytes": base64}.
    Local image paths under the output's folder are written relative to it, other paths stay absolute."""

    def __init__(self, path: str, fmt: str, images_dir: Optional[str] = None, bytes_mode: str = "file"):
        self.path, self.fmt, self.bytes_mode = Path(path), fmt, bytes_mode
        self.out_dir = self.path.resolve().parent
        self.images_dir = Path(images_dir) if images_dir else None
        exists = self.path.exists() and self.path.stat().st_size > 0
        self._f = open(self.path, "a", encoding="utf-8", newline="")
        self._csv = None
        self._header = None
        if fmt in ("csv", "tsv") and exists:
            with open(self.path, newline="", encoding="utf-8") as f:
                self._header = next(csv.reader(f, delimiter=self._delim), None)
        self._warned = False

    @property
    def _delim(self) -> str:
        return "\t" if self.fmt == "tsv" else ","

    def _image(self, row_idx: int, v):
        if isinstance(v, bytes):
            if self.bytes_mode == "b64":
                return {"$bytes": base64.b64encode(v).decode("ascii")}
            if self.images_dir is None:
                raise ValueError("image bytes need an images directory for CSV/JSONL output")
            self.images_dir.mkdir(parents=True, exist_ok=True)
            p = self.images_dir / f"{row_idx:09d}{_image_ext(v)}"
            p.write_bytes(v)
            v = str(p.resolve())
        if isinstance(v, str) and v and os.path.isabs(v):
            try:
                rel = Path(v).relative_to(self.out_dir)
                return rel.as_posix()
            except ValueError:
                return v
        return v

    def _value(self, v):
        if isinstance(v, (bytes, bytearray)):
            return {"$bytes": base64.b64encode(bytes(v)).decode("ascii")}
        return v

    def write(self, row: dict) -> None:
        row = dict(row)
        if "image" in row:
            row["image"] = self._image(row["row"], row["image"])
        row = {k: row.get(k) for k in order_columns(row)}
        if self.fmt == "jsonl":
            self._f.write(json.dumps({k: self._value(v) for k, v in row.items()}, ensure_ascii=False,
                                     default=str) + "\n")
            return
        if self._header is None:
            self._header = list(row)
            csv.writer(self._f, delimiter=self._delim, lineterminator="\n").writerow(self._header)
        if self._csv is None:
            self._csv = csv.writer(self._f, delimiter=self._delim, lineterminator="\n")
        extra = set(row) - set(self._header)
        if extra and not self._warned:
            self._warned = True
            log.warning("CSV output %s: dropping columns not in its header: %s", self.path, sorted(extra))

        def cell(v):
            if v is None:
                return ""
            if isinstance(v, (dict, list, tuple, bytes, bytearray)):
                return json.dumps(self._value(v), ensure_ascii=False, default=str)
            return str(v)
        self._csv.writerow([cell(row.get(k)) for k in self._header])

    def flush(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self.flush()
            self._f.close()


# ---------------------------------------------------------------------------------------------- reading output
def iter_records(path: str, fmt: str) -> Iterator[tuple[Optional[dict], bool]]:
    """Records of an output/journal file as (dict or None if unreadable, complete?)."""
    if fmt == "jsonl":
        with open(path, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                complete = line.endswith(b"\n")
                try:
                    obj = json.loads(line)
                except ValueError:
                    yield None, False
                    continue
                yield (obj, complete) if isinstance(obj, dict) else (None, False)
        return
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        ends_nl = size == 0 or (f.seek(size - 1) >= 0 and f.read(1) == b"\n")
    with open(path, newline="", encoding="utf-8") as f:
        r = csv.reader(f, delimiter="\t" if fmt == "tsv" else ",")
        header = next(r, None)
        if header is None:
            return
        prev = None
        for rec in r:
            if prev is not None:
                yield prev
            prev = (dict(zip(header, rec)), len(rec) == len(header))
        if prev is not None:
            yield (prev[0], prev[1] and ends_nl)


def _row_of(rec: Optional[dict], n_rows: int) -> Optional[int]:
    if rec is None or rec.get("status") not in STATUSES:
        return None
    try:
        i = int(rec.get("row"))
    except (TypeError, ValueError):
        return None
    return i if 0 <= i < n_rows else None


def _truncate_partial_tail(path: str) -> bool:
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return False
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return False
        pos = size
        while pos > 0:
            start = max(0, pos - 65536)
            f.seek(start)
            j = f.read(pos - start).rfind(b"\n")
            if j >= 0:
                f.truncate(start + j + 1)
                break
            pos = start
        else:
            f.truncate(0)
        log.warning("%s: cut off a partial last line left by an interrupted run", path)
        return True


@dataclass
class DoneState:
    done: bytearray          # per input row: 0 = to do, else 1 + STATUSES index of the kept record
    counts: dict
    failed: list             # (row, key, reason) of failed rows kept (when not retrying them)
    dropped: int             # records removed (cut by a kill, duplicates, failed rows to retry)


def load_done(path: str, fmt: str, n_rows: int, retry_failed: bool = True) -> DoneState:
    """Read what an earlier run wrote; drop cut records, duplicates (keep the last) and, if retry_failed, failed
    rows; rewrite the file atomically when anything was dropped. Returns which input rows are done."""
    if fmt == "jsonl":
        _truncate_partial_tail(path)  # the usual leftover of a kill: cheap to cut, no rewrite needed
    winner = array("q", [-1]) * n_rows
    status = bytearray(n_rows)
    bad, total, out_of_range = 0, 0, 0
    for ordinal, (rec, complete) in enumerate(iter_records(path, fmt)):
        total += 1
        i = _row_of(rec, n_rows) if complete else None
        if i is None:
            bad += 1
            if complete and rec is not None and rec.get("status") in STATUSES:
                out_of_range += 1
            continue
        winner[i] = ordinal
        status[i] = _STATUS_CODE[rec["status"]]
    if out_of_range:
        raise ValueError(f"{path} has {out_of_range} row(s) whose `row` index is not in the input "
                         f"({n_rows} rows): it was made from a different input; choose another --output")
    failed_code = _STATUS_CODE["failed"]
    keep = bytearray(1 if (s != 0 and not (retry_failed and s == failed_code)) else 0 for s in status)
    kept = sum(keep)
    dropped = total - kept
    failed = []
    if dropped:
        tmp = str(path) + ".tmp"
        if fmt == "jsonl":
            with open(tmp, "w", encoding="utf-8") as out, open(path, "rb") as f:
                ordinal = -1
                for line in f:
                    if not line.strip():
                        continue
                    ordinal += 1
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    i = _row_of(rec, n_rows) if isinstance(rec, dict) and line.endswith(b"\n") else None
                    if i is not None and keep[i] and winner[i] == ordinal:
                        out.write(line.decode("utf-8"))
                out.flush()
                os.fsync(out.fileno())
        else:
            with open(path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f, delimiter="\t" if fmt == "tsv" else ","))
            with open(tmp, "w", encoding="utf-8", newline="") as out:
                w = csv.writer(out, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n")
                w.writerow(header)
                for ordinal, (rec, complete) in enumerate(iter_records(path, fmt)):
                    i = _row_of(rec, n_rows) if complete else None
                    if i is not None and keep[i] and winner[i] == ordinal:
                        w.writerow([rec.get(k, "") for k in header])
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, path)
        if bad:
            log.warning("%s: dropped %d cut/unreadable record(s) left by an interrupted run", path, bad)
    done = bytearray(n_rows)
    counts = {s: 0 for s in STATUSES}
    for i, s in enumerate(status):
        if keep[i]:
            done[i] = s
            counts[STATUSES[s - 1]] += 1
    if counts["failed"]:
        for rec, complete in iter_records(path, fmt):
            if rec is not None and rec.get("status") == "failed":
                failed.append((int(rec["row"]), rec.get("key"), rec.get("reason")))
    return DoneState(done, counts, failed, dropped)


# ---------------------------------------------------------------------------------------------- parquet
def _decode(v):
    if isinstance(v, dict) and set(v) == {"$bytes"}:
        return base64.b64decode(v["$bytes"])
    return v


def journal_to_parquet(journal: str, output: str, batch_rows: int = 2048) -> int:
    """Write the journal's records (a JSONL file) to a Parquet file atomically; returns the row count."""
    pq = need_pyarrow()
    import pyarrow as pa
    # Pass 1: column order and types (str unless every value is bytes / int / float / bool).
    cols: dict = {}
    for rec, complete in iter_records(journal, "jsonl"):
        if rec is None:
            continue
        for k, v in rec.items():
            v = _decode(v)
            if v is None:
                cols.setdefault(k, set())
            else:
                cols.setdefault(k, set()).add(type(v))

    def arrow_type(ts):
        if ts == {bytes}:
            return pa.binary()
        if ts and ts <= {int}:
            return pa.int64()
        if ts and ts <= {int, float}:
            return pa.float64()
        if ts == {bool}:
            return pa.bool_()
        return pa.string()
    schema = pa.schema([(k, arrow_type(ts)) for k, ts in cols.items()])
    conv = {k: (schema.field(k).type == pa.string()) for k in cols}

    def norm(k, v):
        v = _decode(v)
        if v is None or not conv[k] or isinstance(v, str):
            return v
        return json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else str(v)
    tmp = output + ".tmp"
    n = 0
    with pq.ParquetWriter(tmp, schema) as w:
        buf = []
        for rec, complete in iter_records(journal, "jsonl"):
            if rec is None:
                continue
            buf.append({k: norm(k, rec.get(k)) for k in cols})
            if len(buf) >= batch_rows:
                w.write_table(pa.Table.from_pylist(buf, schema=schema))
                n += len(buf)
                buf = []
        if buf or n == 0:
            w.write_table(pa.Table.from_pylist(buf, schema=schema))
            n += len(buf)
    os.replace(tmp, output)
    return n
