"""Input readers and the per-sample worker for ``rwkv_clip.datamodules.prepare``.

The main process walks the inputs and cuts them into *units*: one row of a table or one image of a folder
(cheap: texts and a path), or one Parquet row group holding image bytes / one WebDataset shard (heavy: the
worker reads them itself, so image bytes never travel through the main process). Workers turn units into
samples of the schema below and report bad rows instead of raising, so one bad image never stops a run.
"""

from __future__ import annotations

import base64
import binascii
import csv
import dataclasses
import hashlib
import io
import json
import os
import sys
import tarfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

from PIL import Image, ImageOps, UnidentifiedImageError

# The LitData sample schema (INTERFACES.md). Key order matters: litdata infers one data format per dataset.
TEXT_FIELDS = ("text", "synthetic_caption", "generated_caption", "tags")
CAPTION_FIELDS = ("text", "synthetic_caption", "generated_caption")  # a sample needs at least one of these
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FORMAT_BY_EXT = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
                 ".tar": "webdataset"}
FORMATS = ("csv", "tsv", "jsonl", "parquet", "folder", "webdataset")


@dataclasses.dataclass(frozen=True)
class Columns:
    """Where each schema field lives in the input (column names for tables, keys for sidecar JSON)."""

    image: str = "image"
    text: str = "text"
    synthetic_caption: str = "synthetic_caption"
    generated_caption: str = "generated_caption"
    tags: str = "tags"
    id: str = "key"

    def text_columns(self) -> dict[str, str]:
        return {f: getattr(self, f) for f in TEXT_FIELDS}


DEFAULT_COLUMNS = Columns()


@dataclasses.dataclass(frozen=True)
class Source:
    path: str
    format: str


# --------------------------------------------------------------------------------------------------- helpers

def split_of(key: str, val_fraction: float) -> str:
    """'val' for a stable ``val_fraction`` of keys: a hash of the key alone, so the split does not depend on the
    order, the other rows, the number of workers or later appends."""
    if val_fraction <= 0:
        return "train"
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
    return "val" if h < val_fraction * 2.0**64 else "train"


def clean_text(value: Any) -> str:
    """Any cell (None, NaN, number, str) -> stripped str; missing -> ''."""
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN from pandas-written files
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return str(value).strip()


def clean_tags(value: Any) -> str:
    """Tags as one comma-separated string: accepts a list, a JSON list in a string, or a comma string."""
    if value is None:
        return ""
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            try:
                parsed = json.loads(s)
            except ValueError:
                parsed = None
            if isinstance(parsed, list):
                value = parsed
            else:
                return ", ".join(t.strip() for t in s.split(",") if t.strip())
        else:
            return ", ".join(t.strip() for t in s.split(",") if t.strip())
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ndarray":
        return ", ".join(clean_text(t) for t in value if clean_text(t))
    return clean_text(value)


def clean_texts(raw: dict[str, Any]) -> dict[str, str]:
    out = {f: clean_text(raw.get(f)) for f in CAPTION_FIELDS}
    out["tags"] = clean_tags(raw.get("tags"))
    return out


def decode_data_uri(value: str) -> Optional[bytes]:
    """``data:image/...;base64,....`` -> bytes (None when ``value`` is not a base64 data URI)."""
    if not value.startswith("data:"):
        return None
    head, _, payload = value.partition(",")
    if ";base64" not in head:
        raise ValueError("only base64 data URIs are supported")
    return base64.b64decode(payload, validate=False)


def encode_image(src: "bytes | str", max_side: int, quality: int) -> bytes:
    """Decode (bytes or a path), fix EXIF rotation, convert to RGB, shrink so the longer side is at most
    ``max_side`` (never upscale; 0 = keep size), re-encode as JPEG."""
    fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # > 178 Mpx still raises: skipped
        with Image.open(fp) as im:
            w, h = im.size
            if max_side and max(w, h) > max_side and im.format == "JPEG":
                # JPEG DCT scaling to the smallest power-of-two size that is still >= the target: big photos
                # decode several times faster. (EXIF rotation only swaps axes, the longer side is the same.)
                s = max_side / max(w, h)
                im.draft("RGB", (max(1, round(w * s)), max(1, round(h * s))))
            im.load()  # force the full decode here so truncated files fail now
            im = ImageOps.exif_transpose(im)
            if im.mode != "RGB":
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    rgba = im.convert("RGBA")
                    im = Image.new("RGB", rgba.size, (255, 255, 255))
                    im.paste(rgba, mask=rgba.getchannel("A"))  # transparent -> white, not black
                else:
                    im = im.convert("RGB")
            w, h = im.size
            if max_side and max(w, h) > max_side:
                s = max_side / max(w, h)
                im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def image_error_reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "missing_file"
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return "image_too_large"
    return "corrupt_image"


# ------------------------------------------------------------------------------------------ source discovery

def resolve_sources(inputs: "str | list[str]", input_format: Optional[str] = None) -> list[Source]:
    """Expand paths and globs into a sorted, de-duplicated list of sources with their format."""
    import glob

    entries = [inputs] if isinstance(inputs, str) else list(inputs)
    if not entries:
        raise ValueError("no inputs given: pass --inputs FILE, a glob like 'data/*.csv', a folder, or a list")
    paths: list[str] = []
    for entry in entries:
        entry = os.path.expanduser(str(entry))
        if glob.has_magic(entry):
            matched = sorted(glob.glob(entry, recursive=True))
            if not matched:
                raise ValueError(f"inputs: the glob {entry!r} matches no file")
            paths.extend(matched)
        elif os.path.exists(entry):
            paths.append(entry)
        else:
            raise ValueError(f"inputs: {entry!r} does not exist")
    sources, seen = [], set()
    for p in paths:
        ap = os.path.abspath(p)
        if ap in seen:
            continue
        seen.add(ap)
        if input_format is not None:
            fmt = input_format
        elif os.path.isdir(ap):
            fmt = "folder"
        else:
            ext = Path(ap).suffix.lower()
            if ext not in FORMAT_BY_EXT:
                raise ValueError(
                    f"inputs: cannot tell the format of {ap!r} from its extension {ext!r}; supported: "
                    f"{sorted(FORMAT_BY_EXT)} or a folder of images, or pass --input_format one of {list(FORMATS)}")
            fmt = FORMAT_BY_EXT[ext]
        if fmt == "folder" and not os.path.isdir(ap):
            raise ValueError(f"inputs: {ap!r} is not a folder but --input_format is 'folder'")
        if fmt != "folder" and os.path.isdir(ap):
            raise ValueError(f"inputs: {ap!r} is a folder; use a glob like '{ap}/*.tar' for files inside it")
        sources.append(Source(ap, fmt))
    return sources


def fingerprint(sources: list[Source]) -> list[list[Any]]:
    """What must not change between an interrupted run and its resume (paths, sizes, mtimes)."""
    out = []
    for s in sources:
        if s.format == "folder":
            h = hashlib.sha1()
            for rel in _folder_images(s.path):
                st = os.stat(os.path.join(s.path, rel))
                h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            out.append([s.path, s.format, h.hexdigest()])
        else:
            st = os.stat(s.path)
            out.append([s.path, s.format, st.st_size, st.st_mtime_ns])
    return out


def _missing_column_error(path: str, what: str, name: str, found: list[str], flag: str) -> ValueError:
    return ValueError(
        f"{path}: missing required column {name!r} ({what}); columns found: {found}. "
        f"Rename the column or pass --{flag} <column>.")


def _check_columns(path: str, found: list[str], cols: Columns, require_image: bool = True) -> None:
    """Required columns must exist; optional ones only when the user renamed them on purpose."""
    if require_image and cols.image not in found:
        raise _missing_column_error(path, "the image path or bytes", cols.image, found, "image_key")
    if cols.text not in found:
        raise _missing_column_error(path, "the raw caption", cols.text, found, "text_key")
    for f in ("synthetic_caption", "generated_caption", "tags"):
        name = getattr(cols, f)
        if name != getattr(DEFAULT_COLUMNS, f) and name not in found:
            raise ValueError(f"{path}: column {name!r} given with --{f}_key is not in the file; "
                             f"columns found: {found}")


def preflight(src: Source, cols: Columns) -> None:
    """Check a table's columns before anything is written, so a bad input fails fast and leaves no state."""
    if src.format in ("csv", "tsv"):
        with open(src.path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f, delimiter="\t" if src.format == "tsv" else ","), None)
        _check_columns(src.path, list(header or []), cols)
    elif src.format == "jsonl":
        for _ in _iter_jsonl(src.path, cols, os.path.dirname(src.path)):
            break  # the first record is checked inside
    elif src.format == "parquet":
        _check_columns(src.path, _pyarrow().read_schema(src.path).names, cols)


def _row_unit(key: str, image: Any, texts: dict[str, str], origin: str, base: str) -> dict[str, Any]:
    """A cheap unit: texts plus an image reference (path string, or bytes from a data URI/binary cell)."""
    if isinstance(image, dict):  # Hugging Face image struct {"bytes": ..., "path": ...}
        image = image.get("bytes") or image.get("path")
    if isinstance(image, str):
        image = image.strip()
        if image and not image.startswith("data:") and "://" not in image:
            image = os.path.join(base, os.path.expanduser(image))  # absolute paths stay absolute
    return {"kind": "row", "key": key, "image": image, "texts": texts, "origin": origin}


def _table_key(path: str, index: int, cols: Columns, row: dict[str, Any]) -> str:
    v = clean_text(row.get(cols.id)) if cols.id in row else ""
    return v or f"{Path(path).stem}-{index:09d}"


def iter_units(src: Source, cols: Columns, image_root: Optional[str]) -> Iterator[tuple[dict[str, Any], int]]:
    """Yield ``(unit, n_rows)`` for one source, in a deterministic order (resume relies on it)."""
    base = image_root or os.path.dirname(src.path)
    if src.format in ("csv", "tsv"):
        yield from _iter_csv(src.path, "\t" if src.format == "tsv" else ",", cols, base)
    elif src.format == "jsonl":
        yield from _iter_jsonl(src.path, cols, base)
    elif src.format == "parquet":
        yield from _iter_parquet(src.path, cols, base)
    elif src.format == "folder":
        for rel in _folder_images(src.path):
            stem = os.path.splitext(os.path.join(src.path, rel))[0]
            yield {"kind": "folder", "key": os.path.splitext(rel)[0], "image": os.path.join(src.path, rel),
                   "stem": stem, "origin": os.path.join(src.path, rel)}, 1
    elif src.format == "webdataset":
        yield {"kind": "tar", "path": src.path, "origin": src.path}, count_tar(src.path)
    else:
        raise ValueError(f"unknown input format {src.format!r}; choose one of {list(FORMATS)}")


def _iter_csv(path: str, delimiter: str, cols: Columns, base: str) -> Iterator[tuple[dict[str, Any], int]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images make long cells
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        found = list(reader.fieldnames or [])
        _check_columns(path, found, cols)
        for i, row in enumerate(reader):
            texts = clean_texts({f: row.get(c) for f, c in cols.text_columns().items()})
            yield _row_unit(_table_key(path, i, cols, row), row.get(cols.image) or "", texts,
                            f"{path}:{i + 2}", base), 1  # i + 2: the line number, header included


def _iter_jsonl(path: str, cols: Columns, base: str) -> Iterator[tuple[dict[str, Any], int]]:
    with open(path, encoding="utf-8-sig") as f:
        i = -1
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            i += 1
            try:
                row = json.loads(line)
            except ValueError as e:
                if i == 0:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e}); JSONL needs one object per line") from e
                yield {"kind": "bad", "key": f"{Path(path).stem}-{i:09d}", "origin": f"{path}:{lineno}",
                       "reason": "bad_row", "error": f"invalid JSON: {e}"}, 1
                continue
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            if i == 0:
                _check_columns(path, list(row), cols)
            texts = clean_texts({f: row.get(c) for f, c in cols.text_columns().items()})
            yield _row_unit(_table_key(path, i, cols, row), row.get(cols.image) or "", texts,
                            f"{path}:{lineno}", base), 1


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading Parquet needs pyarrow: `pip install pyarrow` (or convert the file to "
                          "CSV/JSONL)") from e
    return pq


def _iter_parquet(path: str, cols: Columns, base: str) -> Iterator[tuple[dict[str, Any], int]]:
    pq = _pyarrow()
    import pyarrow as pa

    pf = pq.ParquetFile(path)
    schema = pf.schema_arrow
    _check_columns(path, schema.names, cols)
    itype = schema.field(cols.image).type
    heavy = pa.types.is_binary(itype) or pa.types.is_large_binary(itype) or pa.types.is_struct(itype)
    wanted = [c for c in dict.fromkeys([cols.id, cols.image, *cols.text_columns().values()]) if c in schema.names]
    offset = 0
    for rg in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        if heavy:  # image bytes: the worker reads the row group itself
            yield {"kind": "parquet", "path": path, "row_group": rg, "offset": offset, "base": base,
                   "columns": wanted, "origin": f"{path}#rg{rg}"}, n
        else:  # paths: the row group is small, read it here and hand out rows
            for j, row in enumerate(pf.read_row_group(rg, columns=wanted).to_pylist()):
                texts = clean_texts({f: row.get(c) for f, c in cols.text_columns().items()})
                yield _row_unit(_table_key(path, offset + j, cols, row), row.get(cols.image) or "", texts,
                                f"{path}:row{offset + j}", base), 1
        offset += n


def _folder_images(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTS) and not name.startswith("."):
                out.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return sorted(out)


def _wds_split(name: str) -> tuple[str, str]:
    """WebDataset naming: key = path up to the first dot of the basename, extension = the rest."""
    d, _, b = name.rpartition("/")
    stem, dot, ext = b.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def count_tar(path: str) -> int:
    """Number of image samples in a shard (headers only: tarfile seeks over the payloads)."""
    keys = set()
    try:
        with tarfile.open(path) as tf:
            for m in tf:
                key, ext = _wds_split(m.name)
                if m.isfile() and "." + ext in IMAGE_EXTS:
                    keys.add(key)
    except (tarfile.TarError, OSError, EOFError):
        pass  # the worker reports it as a skip with the exact error
    return max(1, len(keys))


# ------------------------------------------------------------------------------------------------ the worker

class Unit:
    """Opaque wrapper for a unit handed to ``litdata.optimize``. litdata scans plain inputs for strings that are
    existing paths (and then insists every input has one); a leaf object keeps it out of our image paths."""

    __slots__ = ("data",)

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def __getstate__(self) -> dict[str, Any]:
        return self.data

    def __setstate__(self, data: dict[str, Any]) -> None:
        self.data = data


class SampleWriter:
    """The ``fn`` given to ``litdata.optimize``: a generator from one unit to its samples of one split.

    Bad rows are appended to ``skip_dir/skipped-<pid>.jsonl`` (one file per worker process, no locking needed)
    and counted in ``progress`` (a shared counter the main process shows as a progress bar).
    """

    def __init__(self, split: str, val_fraction: float, max_side: int, quality: int, cols: Columns,
                 skip_dir: str, progress: Any = None) -> None:
        self.split, self.val_fraction, self.max_side, self.quality = split, val_fraction, max_side, quality
        self.cols, self.skip_dir, self.progress = cols, skip_dir, progress
        self._skip_file = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_skip_file"] = None
        return state

    # litdata detects generator functions through ``__call__``
    def __call__(self, item: "Unit | dict[str, Any]") -> Iterator[dict[str, Any]]:
        unit = item.data if isinstance(item, Unit) else item
        kind = unit["kind"]
        if kind == "tar":
            yield from self._tar(unit)
        elif kind == "parquet":
            yield from self._parquet(unit)
        else:
            sample = self._one(unit)
            if sample is not None:
                yield sample

    def _tick(self) -> None:
        if self.progress is not None:
            with self.progress.get_lock():
                self.progress.value += 1

    def skip(self, key: str, origin: str, reason: str, error: str) -> None:
        if self._skip_file is None:
            os.makedirs(self.skip_dir, exist_ok=True)
            self._skip_file = open(os.path.join(self.skip_dir, f"skipped-{os.getpid()}.jsonl"), "a",
                                   encoding="utf-8")
        rec = {"key": key, "source": origin, "split": self.split, "reason": reason, "error": error[:500]}
        self._skip_file.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._skip_file.flush()

    def _one(self, unit: dict[str, Any]) -> Optional[dict[str, Any]]:
        """A row or folder unit (already routed to this split by the main process)."""
        key, origin = unit["key"], unit["origin"]
        self._tick()
        try:
            if unit["kind"] == "bad":
                self.skip(key, origin, unit["reason"], unit["error"])
                return None
            if unit["kind"] == "folder":
                texts = self._sidecar(unit["stem"])
                if texts is None:
                    self.skip(key, origin, "bad_sidecar", "no sidecar .txt/.json, or the .json is invalid")
                    return None
            else:
                texts = unit["texts"]
            return self._build(key, unit["image"], texts, origin)
        except Exception as e:  # never let one row kill the run
            self.skip(key, origin, "error", f"{type(e).__name__}: {e}")
            return None

    def _build(self, key: str, image: Any, texts: dict[str, str], origin: str) -> Optional[dict[str, Any]]:
        if not any(texts[f] for f in CAPTION_FIELDS):
            self.skip(key, origin, "no_text", "text, synthetic_caption and generated_caption are all empty")
            return None
        if image is None or (isinstance(image, (str, bytes)) and len(image) == 0):
            self.skip(key, origin, "no_image", "the image field is empty")
            return None
        if isinstance(image, str):
            if "://" in image:
                self.skip(key, origin, "url", f"{image[:200]} is a URL: download the images first "
                                              "(e.g. with img2dataset) and prepare the local copy")
                return None
            if image.startswith("data:"):
                try:
                    image = decode_data_uri(image)
                except (ValueError, binascii.Error) as e:
                    self.skip(key, origin, "corrupt_image", f"bad data URI: {e}")
                    return None
            elif not os.path.isfile(image):
                self.skip(key, origin, "missing_file", f"{image} not found")
                return None
        try:
            jpeg = encode_image(image, self.max_side, self.quality)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError,
                Image.DecompressionBombWarning, EOFError) as e:
            self.skip(key, origin, image_error_reason(e), f"{type(e).__name__}: {e}")
            return None
        return {"key": key, "image": jpeg, **{f: texts[f] for f in TEXT_FIELDS}}

    def _sidecar(self, stem: str) -> Optional[dict[str, str]]:
        raw: dict[str, Any] = {}
        found = False
        if os.path.isfile(stem + ".json"):
            found = True
            try:
                with open(stem + ".json", encoding="utf-8") as f:
                    meta = json.load(f)
            except (ValueError, OSError):
                return None
            if not isinstance(meta, dict):
                return None
            raw = self._from_meta(meta)
        if os.path.isfile(stem + ".txt"):
            found = True
            with open(stem + ".txt", encoding="utf-8", errors="replace") as f:
                raw["text"] = f.read()  # .txt wins for the raw text
        return clean_texts(raw) if found else None

    def _from_meta(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Sidecar JSON -> texts; img2dataset's JSON calls the alt-text ``caption``."""
        raw = {f: meta.get(c) for f, c in self.cols.text_columns().items()}
        if not clean_text(raw.get("text")):
            raw["text"] = meta.get("caption")
        return raw

    def _tar(self, unit: dict[str, Any]) -> Iterator[dict[str, Any]]:
        path = unit["path"]
        group_key, group = None, {}

        def flush():
            if group_key is None:
                return None
            img_ext = next((e for e in group if "." + e in IMAGE_EXTS), None)
            origin = f"{path}:{group_key}"
            if img_ext is None:
                return None  # a text-only member group (img2dataset keeps failed downloads' json out anyway)
            key = group_key.rpartition("/")[2] or group_key
            raw: dict[str, Any] = {}
            if "json" in group:
                try:
                    meta = json.loads(group["json"])
                    if isinstance(meta, dict):
                        raw = self._from_meta(meta)
                except ValueError:
                    pass  # a bad json sidecar just gives no extra texts
            if "txt" in group:
                raw["text"] = group["txt"].decode("utf-8", errors="replace")
            try:
                return self._build(key, group[img_ext], clean_texts(raw), origin)
            except Exception as e:
                self.skip(key, origin, "error", f"{type(e).__name__}: {e}")
                return None

        mine = False
        try:
            with tarfile.open(path) as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    k, ext = _wds_split(m.name)
                    if k != group_key:
                        s = flush()
                        if s is not None:
                            yield s
                        group_key, group = k, {}
                        mine = split_of(k.rpartition("/")[2] or k, self.val_fraction) == self.split
                    if not mine:
                        continue  # the other split's pass takes it: skip the payload (tarfile seeks over it)
                    if ext in ("txt", "json") or "." + ext in IMAGE_EXTS:
                        f = tf.extractfile(m)
                        group[ext] = f.read() if f is not None else b""
                        if "." + ext in IMAGE_EXTS:
                            self._tick()
                s = flush()
                if s is not None:
                    yield s
        except (tarfile.TarError, OSError, EOFError) as e:
            if self.split == "train":  # both splits' passes hit it: report it once
                self.skip(str(group_key or Path(path).stem), path, "corrupt_tar", f"{type(e).__name__}: {e}")

    def _parquet(self, unit: dict[str, Any]) -> Iterator[dict[str, Any]]:
        pq = _pyarrow()
        cols, path = self.cols, unit["path"]
        try:
            rows = pq.ParquetFile(path).read_row_group(unit["row_group"], columns=unit["columns"]).to_pylist()
        except Exception as e:
            if self.split == "train":  # both splits' passes hit it: report it once
                self.skip(f"{Path(path).stem}-rg{unit['row_group']}", unit["origin"], "corrupt_parquet",
                          f"{type(e).__name__}: {e}")
            return
        for j, row in enumerate(rows):
            key = _table_key(path, unit["offset"] + j, cols, row)
            if split_of(key, self.val_fraction) != self.split:
                continue
            self._tick()
            origin = f"{path}:row{unit['offset'] + j}"
            try:
                texts = clean_texts({f: row.get(c) for f, c in cols.text_columns().items()})
                r = _row_unit(key, row.get(cols.image), texts, origin, unit["base"])
                sample = self._build(key, r["image"], texts, origin)
            except Exception as e:
                self.skip(key, origin, "error", f"{type(e).__name__}: {e}")
                continue
            if sample is not None:
                yield sample
