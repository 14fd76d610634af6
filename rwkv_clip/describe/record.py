"""Record: every finished row goes to the output at once, crash-safely, and a rerun with ``--resume`` continues
from what is there.

The output is appended row by row (:class:`rwkv_clip.tables.TableAppender`) in completion order and fsync'ed every
``flush_every`` rows. Each record starts with ``row`` (its index in the input) and ends with ``status``, so a
record cut by a crash is short and detected when the output is read back (:func:`load_done`), and dropped.
Parquet cannot be appended: rows go to a JSONL journal beside it, and the .parquet is written at the end.
"""

from __future__ import annotations

import logging
import os
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rwkv_clip.describe.request import STATUSES, Outcome
from rwkv_clip.schema import IMAGE, KEY
from rwkv_clip.tables import (Table, TableAppender, decode_value, keep_rows, need_pyarrow, table_format,
                              write_parquet)

log = logging.getLogger("rwkv_clip.describe")

OUTPUT_FORMATS = ("csv", "tsv", "jsonl", "parquet")
_STATUS_CODE = {s: i + 1 for i, s in enumerate(STATUSES)}
MAX_SHOWN_FAILED = 20


@dataclass
class Summary:
    input: str
    output: str
    step: str = "describe"
    total: int = 0                 # rows this run is responsible for (all, or the --sample)
    generated: int = 0
    fallback: int = 0
    failed: int = 0                # includes the input rows that could not be read
    unreadable: int = 0
    done_before: int = 0           # rows found finished in the output by --resume
    processed: int = 0             # rows finished by this run
    elapsed: float = 0.0
    setup_s: float = 0.0           # of elapsed: loading the model, or reaching the server
    retries: dict = field(default_factory=dict)
    fallback_reasons: dict = field(default_factory=dict)
    failed_rows: list = field(default_factory=list)   # (row, key, reason)
    complete: bool = False         # every row has a status
    stopped: Optional[str] = None  # why the run ended early, if it did
    instruction_pairs: Optional[int] = None

    @property
    def ok(self) -> bool:
        """Every row is done and none failed: what the command's exit status 0 means."""
        return self.complete and not self.failed

    @property
    def rows_per_s(self) -> float:
        return self.processed / self.elapsed if self.elapsed > 0 else 0.0

    def counts(self) -> dict[str, int]:
        return {s: getattr(self, s) for s in STATUSES}

    def format(self) -> str:
        lines = [f"{self.step}: {self.input} -> {self.output}",
                 f"  rows {self.total}: generated {self.generated} | fallback {self.fallback} | failed {self.failed}"
                 f" | not done {self.total - self.generated - self.fallback - self.failed}",
                 f"  this run: {self.processed} rows in {self.elapsed:.1f} s ({self.rows_per_s:.1f} rows/s)"
                 f"; done before: {self.done_before}"]
        if self.retries:
            lines.append(f"  retries: {sum(self.retries.values())} ("
                         + ", ".join(f"{k}: {v}" for k, v in sorted(self.retries.items())) + ")")
        if self.fallback_reasons:
            lines.append("  fallback reasons: " + ", ".join(f"{k}: {v}" for k, v in
                                                          sorted(self.fallback_reasons.items())))
        if self.failed_rows:
            unreadable = f", {self.unreadable} of them unreadable in the input" if self.unreadable else ""
            lines.append(f"  failed rows ({self.failed}{unreadable}; rerun with --resume true to retry them):")
            for r, k, reason in self.failed_rows[:MAX_SHOWN_FAILED]:
                lines.append(f"    row {r}" + (f" (key {k})" if k else "") + f": {reason}")
            if len(self.failed_rows) > MAX_SHOWN_FAILED:
                lines.append(f"    ... all listed in {self.output}.describe.json")
        if self.instruction_pairs is not None:
            lines.append(f"  instruction pairs written: {self.instruction_pairs}")
        if self.stopped:
            lines.append(f"  STOPPED EARLY: {self.stopped}. Rerun with --resume true to continue.")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- where to write

@dataclass
class OutputPaths:
    """The files of one run: the output, the journal rows are appended to (the output itself, except for
    Parquet), the state file (``OUTPUT.describe.json``) and the folder for image bytes (``OUTPUT_images``)."""

    path: str
    fmt: str
    journal: str
    journal_fmt: str
    state: str
    images_dir: str

    @classmethod
    def choose(cls, inp: str, in_fmt: str, output: Optional[str], output_format: Optional[str],
               instruction_data: Optional[str], name: str = "described") -> "OutputPaths":
        """``name``: the default output is INPUT.<name>.<suffix>."""
        output = output or _default_output(inp, in_fmt, instruction_data, name)
        fmt = output_format or table_format(output)
        if fmt not in OUTPUT_FORMATS:
            raise ValueError(f"output {output}: unknown format from suffix {Path(output).suffix!r}; use one of "
                             f".csv, .jsonl, .ndjson, .parquet, .tsv (or pass --output_format)")
        out_path, in_path = Path(output), Path(inp)
        if out_path.resolve() == in_path.resolve() or _same_path(out_path, in_path):
            raise ValueError(f"--output {output} is the input; choose a new file (the input is never edited)")
        if in_fmt == "litdata" and in_path.resolve() in out_path.resolve().parents:
            raise ValueError(f"--output {output} is inside the input LitData directory; write it elsewhere")
        if fmt == "parquet":
            need_pyarrow()
            journal, journal_fmt = output + ".journal.jsonl", "jsonl"
        else:
            journal, journal_fmt = output, fmt
        return cls(output, fmt, journal, journal_fmt, output + ".describe.json",
                   str(out_path.with_suffix("")) + "_images")

    def check_fresh_or_resumable(self, resume: bool) -> None:
        existing = [p for p in (self.journal, self.path) if os.path.exists(p)]
        if existing and not resume:
            raise FileExistsError(f"{existing[0]} exists; pass --resume true to continue that run, "
                                  "or choose another --output")
        if resume and self.fmt == "parquet" and os.path.exists(self.path) and not os.path.exists(self.journal):
            raise ValueError(f"cannot resume {self.path}: its journal {self.journal} is gone; choose another --output")

    def write_parquet(self) -> int:
        """The journal's rows as the Parquet output (bytes restored), written atomically."""
        def rows():
            for row in Table(self.journal, "jsonl"):
                if row.values is not None:
                    yield {k: decode_value(v) for k, v in row.values.items()}
        return write_parquet(self.path, rows)


def _default_output(inp: str, in_fmt: str, instruction_data: Optional[str], name: str = "described") -> str:
    if instruction_data:
        return str(Path(instruction_data).with_suffix("")) + ".rows.jsonl"
    p = Path(inp.rstrip("/"))
    if in_fmt == "litdata":
        try:
            need_pyarrow()
            ext = ".parquet"
        except ImportError:
            ext = ".jsonl"
        return f"{p}.{name}{ext}"
    return f"{p.with_suffix('')}.{name}{p.suffix}"


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- writing

def _image_ext(b: bytes) -> str:
    if b[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if b[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if b[:4] == b"RIFF" and b[8:12] == b"WEBP":
        return ".webp"
    if b[:4] == b"GIF8":
        return ".gif"
    return ".img"


class OutputWriter:
    """Appends finished rows: ``row`` first, then the input's columns, then the field, ``reason`` and ``status``.

    Image bytes are saved as files under ``images_dir`` (``inline_bytes``: kept in the row, for the Parquet
    journal). Image paths under the output's folder are written relative to it, others stay absolute, so they
    resolve from the output wherever it is.
    """

    def __init__(self, paths: OutputPaths, field: str) -> None:
        self.paths, self.field = paths, field
        self.inline_bytes = paths.fmt == "parquet"
        self.out_dir = os.path.dirname(os.path.abspath(paths.path))
        self._table = TableAppender(paths.journal, paths.journal_fmt)

    def _image(self, row_idx: int, v: Any) -> Any:
        if isinstance(v, bytes):
            if self.inline_bytes:
                return v
            os.makedirs(self.paths.images_dir, exist_ok=True)
            p = os.path.join(self.paths.images_dir, f"{row_idx:09d}{_image_ext(v)}")
            with open(p, "wb") as f:
                f.write(v)
            v = os.path.abspath(p)
        if isinstance(v, str) and os.path.isabs(v):
            rel = os.path.relpath(v, self.out_dir)
            return v if rel.startswith("..") else Path(rel).as_posix()
        return v

    def write(self, idx: int, row: dict[str, Any], outcome: Outcome, prompt: bool = False) -> None:
        out = {"row": idx}
        out.update((k, v) for k, v in row.items() if k not in ("row", self.field, "reason", "status", "prompt"))
        if IMAGE in out:
            out[IMAGE] = self._image(idx, out[IMAGE])
        if prompt and outcome.prompt is not None:
            out["prompt"] = outcome.prompt
        out.update({self.field: outcome.value, "reason": outcome.reason, "status": outcome.status})
        self._table.write(out)

    def flush(self) -> None:
        self._table.flush()

    def close(self) -> None:
        self._table.close()


class Recorder:
    """Writes each finished row and keeps the summary's counts: flushes every ``flush_every`` rows (and at least
    every 5 s), shows progress, and lists failed rows."""

    def __init__(self, writer: OutputWriter, summary: Summary, flush_every: int, progress: bool,
                 keep_prompts: bool) -> None:
        from tqdm.auto import tqdm

        self.writer, self.summary, self.flush_every, self.keep_prompts = writer, summary, flush_every, keep_prompts
        self.since_flush, self.last_flush = 0, time.time()
        self.pbar = tqdm(total=summary.total, initial=summary.done_before, unit="row", dynamic_ncols=True,
                         smoothing=0.05, mininterval=0.5, disable=not progress, desc=summary.step)

    def record(self, idx: int, row: dict[str, Any], outcome: Outcome) -> None:
        self.writer.write(idx, row, outcome, self.keep_prompts)
        s = self.summary
        setattr(s, outcome.status, getattr(s, outcome.status) + 1)
        if outcome.status == "fallback":
            reason = outcome.reason.split(" (")[0]
            s.fallback_reasons[reason] = s.fallback_reasons.get(reason, 0) + 1
        elif outcome.status == "failed":
            s.failed_rows.append((idx, row.get(KEY), outcome.reason))
        self._done()
        self.since_flush += 1
        if self.since_flush >= self.flush_every or time.time() - self.last_flush > 5.0:
            self.writer.flush()
            self.since_flush, self.last_flush = 0, time.time()

    def unreadable(self, idx: int, error: str) -> None:
        """An input row that could not be read: nothing to write, but it is counted and listed as failed."""
        self.summary.failed += 1
        self.summary.unreadable += 1
        self.summary.failed_rows.append((idx, None, error))
        self._done()

    def _done(self) -> None:
        s = self.summary
        s.processed += 1
        self.pbar.update(1)
        self.pbar.set_postfix(gen=s.generated, fb=s.fallback, fail=s.failed, refresh=False)

    def close(self) -> None:
        self.pbar.close()
        self.writer.close()


# ---------------------------------------------------------------------------------------------- resuming

@dataclass
class DoneState:
    done: bytearray          # per input row: 0 = to do, else 1 + STATUSES index of the kept record
    counts: dict
    failed: list             # (row, key, reason) of failed rows kept (when not retrying them)
    dropped: int             # records removed (cut by a crash, unreadable, duplicates, failed rows to retry)


def _row_of(values: Optional[dict], n_rows: int) -> Optional[int]:
    if values is None or values.get("status") not in STATUSES:
        return None
    try:
        i = int(values.get("row"))
    except (TypeError, ValueError):
        return None
    return i if 0 <= i < n_rows else None


def load_done(path: str, fmt: str, n_rows: int, retry_failed: bool = True) -> DoneState:
    """Which input rows an earlier run finished. Records cut by a crash (also inside a multi-byte character),
    unreadable ones, repeats of a row (the last is kept) and, with ``retry_failed``, failed rows are dropped from
    the file (:func:`rwkv_clip.tables.keep_rows`), so appending can continue."""
    winner = array("q", [-1]) * n_rows
    status = bytearray(n_rows)
    failed: dict[int, tuple] = {}
    total = bad = out_of_range = 0
    for ordinal, row in enumerate(Table(path, fmt)):
        total += 1
        i = _row_of(row.values, n_rows) if row.ended else None
        if i is None:
            bad += 1
            if row.values is not None and row.ended and row.values.get("status") in STATUSES:
                out_of_range += 1
            continue
        winner[i], status[i] = ordinal, _STATUS_CODE[row.values["status"]]
        if row.values["status"] == "failed":
            failed[i] = (i, row.values.get(KEY), row.values.get("reason"))
        else:
            failed.pop(i, None)
    if out_of_range:
        raise ValueError(f"{path} has {out_of_range} row(s) whose `row` index is not in the input ({n_rows} rows): "
                         "it was made from a different input; choose another --output")
    retry = _STATUS_CODE["failed"] if retry_failed else -1
    keep = bytearray(1 if s and s != retry else 0 for s in status)
    dropped = total - sum(keep)
    if dropped:
        def kept(ordinal: int, row: Any) -> bool:
            i = _row_of(row.values, n_rows) if row.ended else None
            return i is not None and bool(keep[i]) and winner[i] == ordinal

        keep_rows(path, fmt, kept)
        if bad:
            log.warning("%s: dropped %d cut or unreadable record(s) left by an interrupted run", path, bad)
    done, counts = bytearray(n_rows), {s: 0 for s in STATUSES}
    for i, s in enumerate(status):
        if keep[i]:
            done[i] = s
            counts[STATUSES[s - 1]] += 1
    kept_failed = [failed[i] for i in sorted(failed) if keep[i]]
    return DoneState(done, counts, kept_failed, dropped)
