"""Input sources and the per-sample worker for ``rwkv_clip.datamodules.prepare``.

The main process walks the inputs and cuts them into *units*: one row of a table or one image of a folder
(cheap: texts and a path), or one Parquet row group holding image bytes / one WebDataset shard (heavy: the
worker reads them itself, so image bytes never travel through the main process). Workers turn units into
samples of `rwkv_clip.schema` and report bad rows instead of raising, so one bad image never stops a run.
"""

from __future__ import annotations

import binascii
import dataclasses
import hashlib
import io
import json
import os
import tarfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

from PIL import Image, ImageOps, UnidentifiedImageError

from rwkv_clip.schema import (IMAGE, KEY, SAMPLE_FIELDS, TAGS, TEXT, TEXT_FIELDS, Columns, clean_text,
                              format_tags)
from rwkv_clip.tables import FORMAT_BY_SUFFIX, TABLE_FORMATS, Table, decode_data_uri, image_value, is_url

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FORMAT_BY_EXT = {**FORMAT_BY_SUFFIX, ".tar": "webdataset"}
FORMATS = (*TABLE_FORMATS, "folder", "webdataset")


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


def key_hash(key: str) -> int:
    """A 64-bit hash of a sample key: what the dataset remembers of each key it holds, to skip them on append."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")


class KnownKeys:
    """The keys a dataset held before this run, as a sorted array of :func:`key_hash` values in a ``.npy`` file
    that every worker memory-maps (nothing is copied into the processes)."""

    def __init__(self, path: Optional[str]) -> None:
        self.path = path
        self._hashes = None

    def __contains__(self, key: str) -> bool:
        if self.path is None:
            return False
        if self._hashes is None:
            import numpy as np

            self._hashes = np.load(self.path, mmap_mode="r")
        h = key_hash(key)
        i = int(self._hashes.searchsorted(h))
        return i < len(self._hashes) and int(self._hashes[i]) == h

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_hashes": None}


def clean_texts(raw: dict[str, Any]) -> dict[str, str]:
    """The three texts and the tags of a sample as stored: stripped strings, tags as ``"a, b, c"``."""
    return {**{f: clean_text(raw.get(f)) for f in TEXT_FIELDS}, TAGS: format_tags(raw.get(TAGS))}


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


def preflight(src: Source, cols: Columns) -> None:
    """Check a table's columns before anything is written, so a bad input fails fast and leaves no state."""
    if src.format in TABLE_FORMATS:
        cols.check(Table(src.path, src.format).columns(), src.path, required=(IMAGE, TEXT))


def _row_unit(key: str, row: dict[str, Any], cols: Columns, origin: str, base: str) -> dict[str, Any]:
    """A cheap unit: the texts and the image (bytes, or a path / URL / data URI string) of one table row."""
    return {"kind": "row", "key": key, "image": image_value(cols.get(row, IMAGE), base), "origin": origin,
            "texts": clean_texts({f: cols.get(row, f) for f in (*TEXT_FIELDS, TAGS)})}


def _table_key(path: str, index: int, cols: Columns, row: dict[str, Any]) -> str:
    return clean_text(cols.get(row, KEY)) or f"{Path(path).stem}-{index:09d}"


def iter_units(src: Source, cols: Columns, image_root: Optional[str]) -> Iterator[tuple[dict[str, Any], int]]:
    """Yield ``(unit, n_rows)`` for one source, in a deterministic order (resume relies on it)."""
    base = image_root or os.path.dirname(src.path)
    if src.format in TABLE_FORMATS:
        table = Table(src.path, src.format)  # its columns were checked by preflight()
        if src.format == "parquet" and table.column_is_binary(cols.image):
            # image bytes: a worker reads each row group itself, so the bytes never pass through this process
            wanted = [c for c in dict.fromkeys(getattr(cols, f) for f in SAMPLE_FIELDS) if c in table.columns()]
            for rg, offset, n in table.row_groups():
                yield {"kind": "parquet", "path": src.path, "row_group": rg, "offset": offset, "base": base,
                       "columns": wanted, "origin": f"{src.path}#rg{rg}"}, n
            return
        for row in table:
            if row.values is None:
                yield {"kind": "bad", "key": f"{Path(src.path).stem}-{row.index:09d}", "origin": row.where,
                       "reason": "bad_row", "error": row.error}, 1
            else:
                yield _row_unit(_table_key(src.path, row.index, cols, row.values), row.values, cols, row.where,
                                base), 1
    elif src.format == "folder":
        for rel in _folder_images(src.path):
            stem = os.path.splitext(os.path.join(src.path, rel))[0]
            yield {"kind": "folder", "key": os.path.splitext(rel)[0], "image": os.path.join(src.path, rel),
                   "stem": stem, "origin": os.path.join(src.path, rel)}, 1
    elif src.format == "webdataset":
        yield {"kind": "tar", "path": src.path, "origin": src.path}, count_tar(src.path)
    else:
        raise ValueError(f"unknown input format {src.format!r}; choose one of {list(FORMATS)}")


def estimate_rows(src: Source) -> int:
    """Rows for the progress bar's total (lines for text tables: exact unless cells hold newlines)."""
    try:
        if src.format in TABLE_FORMATS:
            return Table(src.path, src.format).estimate_rows()
        if src.format == "webdataset":
            return count_tar(src.path)
        return len(_folder_images(src.path))
    except Exception:
        return 0


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

class SampleWriter:
    """From one unit to its samples of one split (called in prepare's worker processes, or in the main one).

    Every process appends the rows it skips to ``log_dir/skipped/<pid>.jsonl`` and the keys it writes to
    ``log_dir/keys/<pid>.jsonl`` (one file per process, no locking needed), and counts rows in ``progress`` (a
    shared counter the main process shows as a progress bar). Rows whose key is in ``known_keys`` (the dataset
    already holds them) are skipped.
    """

    def __init__(self, split: str, val_fraction: float, max_side: int, quality: int, cols: Columns,
                 log_dir: str, known_keys: Optional[str] = None, progress: Any = None) -> None:
        self.split, self.val_fraction, self.max_side, self.quality = split, val_fraction, max_side, quality
        self.cols, self.log_dir, self.progress = cols, log_dir, progress
        self.known = KnownKeys(known_keys)
        self._logs: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_logs"] = {}
        return state

    def __call__(self, unit: dict[str, Any]) -> Iterator[dict[str, Any]]:
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

    def _log(self, name: str, record: Any) -> None:
        f = self._logs.get(name)
        if f is None:
            os.makedirs(os.path.join(self.log_dir, name), exist_ok=True)
            f = self._logs[name] = open(os.path.join(self.log_dir, name, f"{os.getpid()}.jsonl"), "a",
                                        encoding="utf-8")
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()

    def skip(self, key: str, origin: str, reason: str, error: str) -> None:
        self._log("skipped", {"key": key, "source": origin, "split": self.split, "reason": reason,
                              "error": error[:500]})

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
        if key in self.known:
            self.skip(key, origin, "already_in_dataset", f"the dataset already holds a sample with the key {key!r}")
            return None
        if not any(texts[f] for f in TEXT_FIELDS):
            self.skip(key, origin, "no_text", "text, synthetic_caption and generated_caption are all empty")
            return None
        if image is None or (isinstance(image, (str, bytes)) and len(image) == 0):
            self.skip(key, origin, "no_image", "the image field is empty")
            return None
        if isinstance(image, str):
            if is_url(image):
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
        self._log("keys", key)
        return {KEY: key, IMAGE: jpeg, **{f: texts[f] for f in SAMPLE_FIELDS[2:]}}

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
                raw[TEXT] = f.read()  # .txt wins for the raw text
        return clean_texts(raw) if found else None

    def _from_meta(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Sidecar JSON -> texts; img2dataset's JSON calls the alt-text ``caption``."""
        raw = {f: self.cols.get(meta, f) for f in (*TEXT_FIELDS, TAGS)}
        if not clean_text(raw.get(TEXT)):
            raw[TEXT] = meta.get("caption")
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
                raw[TEXT] = group["txt"].decode("utf-8", errors="replace")
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
        path = unit["path"]
        try:
            rows = Table(path, "parquet").read_row_group(unit["row_group"], unit["offset"], unit["columns"])
        except Exception as e:
            if self.split == "train":  # both splits' passes hit it: report it once
                self.skip(f"{Path(path).stem}-rg{unit['row_group']}", unit["origin"], "corrupt_parquet",
                          f"{type(e).__name__}: {e}")
            return
        for row in rows:
            key = _table_key(path, row.index, self.cols, row.values)
            if split_of(key, self.val_fraction) != self.split:
                continue
            self._tick()
            try:
                r = _row_unit(key, row.values, self.cols, row.where, unit["base"])
                sample = self._build(key, r["image"], r["texts"], row.where)
            except Exception as e:
                self.skip(key, row.where, "error", f"{type(e).__name__}: {e}")
                continue
            if sample is not None:
                yield sample
