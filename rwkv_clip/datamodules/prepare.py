"""Pack image-text pairs into LitData chunks for training: ``python -m rwkv_clip.datamodules.prepare --help``.

Inputs: CSV / TSV / JSONL / Parquet tables, folders of images with ``.txt`` / ``.json`` sidecars, and
WebDataset ``.tar`` shards (img2dataset's layout). Output (``output_dir``)::

    train/            LitData dataset (index.json + chunk-*.bin) -> ImageTextDataModule(train_dir=...)
    val/              same, only when --val_fraction > 0 held some keys back -> val_dir
    skipped.jsonl     one line per skipped row: key, source, split, reason, error
    summary.json      the counts of the last run and of the whole dataset
    .prepare/         resume state (state.json) and per-part skip lists; keep it to append/resume later

Samples follow ``rwkv_clip.schema``: {"key", "image" (JPEG bytes), "text", "synthetic_caption",
"generated_caption", "tags"}, missing texts as "". The input is processed in *parts* of ``part_size`` rows; worker
processes pack a part into a staging folder (:func:`write_samples`), and then it is committed: chunks moved in,
then the state file replaced atomically, then index.json rebuilt from it. An interrupted run therefore resumes at
the first uncommitted part, and every row ends up in the output exactly once.

Every committed part also keeps the hashes of the keys it wrote (``.prepare/parts/*.keys.npy``): an append skips
rows whose key the dataset already holds, and keys that repeat within a run are counted in the summary.

As a library: :func:`prepare` is the command; :func:`write_samples` writes samples you built yourself (dicts of
bytes / str / int) into a new LitData folder in this process, with the same writer and index.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from typing import Any, Iterable, Iterator, Literal, Optional, Union

import numpy as np

from rwkv_clip.datamodules._prepare_sources import (
    SampleWriter, Source, estimate_rows, fingerprint, iter_units, key_hash, preflight, resolve_sources, split_of)
from rwkv_clip.schema import KEY, Columns, check_prepared_dir
from rwkv_clip.tables import atomic_file, write_json_atomic

SPLITS = ("train", "val")
STATE_DIR = ".prepare"
STATE_VERSION = 1

# The progress thread writes to the terminal while prepare forks workers from the main thread. Holding this lock
# across fork() means a child is never born while the parent's thread holds stdout/stderr's internal lock.
_FORK_LOCK = threading.Lock()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_FORK_LOCK.acquire, after_in_parent=_FORK_LOCK.release,
                        after_in_child=_FORK_LOCK.release)


def prepare(
    inputs: Union[str, list[str]],
    output_dir: str,
    mode: Optional[Literal["overwrite", "append", "resume"]] = None,
    input_format: Optional[Literal["csv", "tsv", "jsonl", "parquet", "folder", "webdataset"]] = None,
    image_key: str = "image",
    text_key: str = "text",
    synthetic_caption_key: str = "synthetic_caption",
    generated_caption_key: str = "generated_caption",
    tags_key: str = "tags",
    id_key: str = "key",
    image_root: Optional[str] = None,
    max_side: int = 512,
    quality: int = 90,
    val_fraction: float = 0.0,
    num_workers: Optional[int] = None,
    chunk_bytes: str = "64MB",
    part_size: int = 50_000,
    start_method: Optional[Literal["fork", "spawn", "forkserver"]] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Pack image-text pairs into LitData chunks (train/ and optional val/ under output_dir).

    Rows with a missing or corrupt image (or no caption at all) are skipped and listed in
    output_dir/skipped.jsonl; the run never stops for one bad row. A run that is interrupted resumes when the
    same command is run again (or with --mode resume). An append skips rows whose key the dataset already holds.
    Option names also work with dashes (--text-key).

    Args:
        inputs: Input file, folder or glob, or a list of them (--inputs '[a.csv, b.csv]'). Formats by extension:
            .csv, .tsv, .jsonl/.ndjson, .parquet (needs pyarrow), .tar (WebDataset shard, img2dataset layout:
            KEY.jpg + KEY.txt / KEY.json); a folder is read as images with sidecar KEY.txt / KEY.json files.
            Table columns: image (a path relative to the table, an absolute path, a base64 data URI, or bytes in
            Parquet), text, and optional synthetic_caption, generated_caption, tags (a list, or a string
            separated by , | or ;).
        output_dir: Output folder; gets train/, val/ (if val_fraction > 0), skipped.jsonl, summary.json.
        mode: What to do when output_dir already holds a dataset: 'overwrite' replaces it, 'append' adds the
            inputs to it (rows whose key it already holds are skipped and counted as already_in_dataset),
            'resume' finishes an interrupted run. Unset: refuse, unless the folder holds an
            interrupted run of the same inputs and options, which is then resumed.
        input_format: Force one format for every input instead of guessing from the extension.
        image_key: Column (or sidecar JSON key) that holds the image.
        text_key: Column that holds the raw alt-text (required column; may be empty in a row that has another
            caption). In sidecar JSON, 'caption' is used when this key is absent.
        synthetic_caption_key: Column with the captioner's caption (optional).
        generated_caption_key: Column with the LLM-rewritten caption (optional).
        tags_key: Column with detection tags, a list or a comma-separated string (optional).
        id_key: Column with a unique sample key (optional). Without it the key is FILESTEM-ROWINDEX; in folders
            it is the image path without extension, in shards the WebDataset key. The val split hashes it.
        image_root: Folder that relative image paths start from (default: the folder of each table).
        max_side: Shrink images so the longer side is at most this many pixels (never upscale; 0 = keep size).
        quality: JPEG quality of the re-encoded images (1-100; above 95 mostly grows the files).
        val_fraction: Fraction of keys held back in output_dir/val, chosen by a hash of the key, so it is the
            same across runs, worker counts and appends. 0 = no val split.
        num_workers: Worker processes for decoding and resizing (default: all CPU cores; 0: in this process).
        chunk_bytes: Target size of one LitData chunk, e.g. '64MB'.
        part_size: Rows per resumable part: an interrupted run redoes at most one part.
        start_method: Multiprocessing start method of the workers (default: 'fork' where available, else
            'spawn', which starts slower).
        progress: Show a progress bar.
    """
    t0 = time.time()
    if max_side < 0:
        raise ValueError(f"max_side must be >= 0 (0 keeps the size), got {max_side}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100 (JPEG quality, 90 is a good default), got {quality}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), e.g. 0.01, got {val_fraction}")
    if part_size < 1:
        raise ValueError(f"part_size must be >= 1, got {part_size}")
    if num_workers is None:
        num_workers = os.cpu_count() or 1
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 (0 = in this process), got {num_workers}")
    if start_method is None:
        start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"

    cols = Columns(key=id_key, image=image_key, text=text_key, synthetic_caption=synthetic_caption_key,
                   generated_caption=generated_caption_key, tags=tags_key)
    sources = resolve_sources(inputs, input_format)
    out = os.path.abspath(os.path.expanduser(output_dir))
    for s in sources:
        if s.format == "folder" and (out == s.path or out.startswith(s.path.rstrip(os.sep) + os.sep)):
            raise ValueError(f"output_dir {out} is inside the input folder {s.path}; pick a folder outside it")
    # Everything that changes which rows go where, or what they look like; a resume must match it exactly.
    options = {"columns": dataclasses.asdict(cols), "image_root": image_root, "max_side": max_side,
               "quality": quality, "val_fraction": val_fraction, "part_size": part_size, "chunk_bytes": chunk_bytes}
    for s in sources:
        preflight(s, cols)
    fp = fingerprint(sources)

    store = _Store(out)
    run = store.open(mode, fp, options)
    resumed_parts = len(run["parts"])
    if resumed_parts:
        print(f"prepare: resuming run {run['id']} in {out}: {resumed_parts} part(s) already done", file=sys.stderr)
    known_keys = store.known_keys(run)

    ctx = mp.get_context(start_method)
    counter = ctx.Value("q", 0)
    bar = _Progress(counter, sum(estimate_rows(s) for s in sources), progress)
    try:
        for k, (per_split, n_rows) in enumerate(_iter_parts(sources, cols, image_root, part_size, val_fraction)):
            if str(k) in run["parts"]:
                bar.base += n_rows  # committed by the interrupted run
                bar.resumed_rows += n_rows
                continue
            bar.desc(f"part {k + 1}")
            staging = store.staging(run["id"], k)
            for split in SPLITS:
                items = per_split[split]
                if not items:
                    continue
                fn = SampleWriter(split, val_fraction, max_side, quality, cols, staging, known_keys, counter)
                _write_part(fn, items, os.path.join(staging, split), chunk_bytes, min(num_workers, len(items)),
                            start_method)
            store.commit_part(run, k, staging, time.time() - t0)
            bar.base += n_rows
            with counter.get_lock():
                counter.value = 0
    except KeyboardInterrupt:
        bar.close()
        print(f"\nprepare: interrupted after {len(run['parts'])} committed part(s). Run the same command again "
              f"(or with --mode resume) to continue; finished parts are kept.", file=sys.stderr)
        raise
    bar.close()
    return store.finish(run, time.time() - t0, bar.base - bar.resumed_rows)


def write_samples(samples: Iterable[dict[str, Any]], output_dir: str, chunk_bytes: str = "64MB") -> int:
    """Write samples into a new LitData folder ``output_dir`` in this process; returns how many were written.

    Every sample is a dict with the same fields in the same order, holding bytes, str, int or float (the
    formats ``rwkv_clip.schema`` allows); nothing is re-encoded. The chunks come from litdata's ``BinaryWriter``,
    the same bytes for the same samples, and ``index.json`` is written last, atomically: a folder with an index
    is complete. This is prepare's own writer (``--num_workers 0``); the demo generator uses it too.
    """
    from litdata.streaming.writer import BinaryWriter

    if os.path.exists(os.path.join(output_dir, "index.json")):
        raise ValueError(f"{output_dir} already holds a LitData dataset; write into a new folder")
    writer = BinaryWriter(output_dir, chunk_bytes=chunk_bytes)
    n = 0
    for sample in samples:
        writer.add_item(n, sample)
        n += 1
    if n == 0:
        return 0
    writer.done()
    # BinaryWriter leaves one index per writer ("<rank>.index.json"): here one writer, so it is the whole index.
    (part,) = glob.glob(os.path.join(output_dir, "*.index.json"))
    with open(part, encoding="utf-8") as f:
        index = json.load(f)
    write_json_atomic(os.path.join(output_dir, "index.json"), {**index, "updated_at": str(time.time())})
    os.remove(part)
    return n


def _write_part(fn: SampleWriter, items: list[dict[str, Any]], output_dir: str, chunk_bytes: str,
                num_workers: int, start_method: str) -> None:
    """Turn one split of one part into samples and write them with :func:`write_samples`: in this process
    (``num_workers`` 0), or in worker processes that take units from a shared queue, each into its own folder
    ``output_dir/w<k>``. The workers ignore Ctrl-C: the main process stops them and reports the interruption."""
    if num_workers == 0:
        write_samples((sample for unit in items for sample in fn(unit)), os.path.join(output_dir, "w0"), chunk_bytes)
        return
    ctx = mp.get_context(start_method)
    queue = ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(fn, queue, os.path.join(output_dir, f"w{k}"), chunk_bytes),
                           daemon=True) for k in range(num_workers)]
    try:
        for w in workers:
            w.start()
        for unit in items:
            queue.put(unit)
        for _ in workers:
            queue.put(None)
        for w in workers:
            w.join()
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
                w.join()
    failed = [w.exitcode for w in workers if w.exitcode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} worker process(es) of prepare failed (exit codes {failed}; the error is "
                           "printed above). Finished parts are kept: run the same command again to continue")


def _worker(fn: SampleWriter, queue: Any, output_dir: str, chunk_bytes: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    write_samples((sample for unit in iter(queue.get, None) for sample in fn(unit)), output_dir, chunk_bytes)


def _iter_parts(sources: list[Source], cols: Columns, image_root: Optional[str], part_size: int,
                val_fraction: float) -> Iterator[tuple[dict[str, list[dict[str, Any]]], int]]:
    """Cut the inputs into parts of about ``part_size`` rows, deterministically (the resume depends on it).

    Cheap units (a table row, a folder image) are routed to their split here; heavy units (a Parquet row group
    with image bytes, a tar shard) go to both splits' passes and the worker keeps the rows of its split.
    """
    per_split: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    n = 0
    for src in sources:
        for unit, rows in iter_units(src, cols, image_root):
            if unit["kind"] in ("tar", "parquet"):
                per_split["train"].append(unit)
                if val_fraction > 0:
                    per_split["val"].append(unit)
            else:
                per_split[split_of(unit["key"], val_fraction)].append(unit)
            n += rows
            if n >= part_size:
                yield per_split, n
                per_split, n = {s: [] for s in SPLITS}, 0
    if n:
        yield per_split, n


class _Progress:
    """A tqdm bar fed from a counter that the worker processes increment."""

    def __init__(self, counter: Any, total: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.counter, self.base, self.resumed_rows = counter, 0, 0
        self.bar = tqdm(total=total or None, unit="img", disable=not enabled, dynamic_ncols=True, smoothing=0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        if enabled:
            self._thread.start()

    def desc(self, text: str) -> None:
        with _FORK_LOCK:
            self.bar.set_description(text, refresh=False)

    def _update(self) -> None:
        with _FORK_LOCK:
            n = self.base + self.counter.value
            if n != self.bar.n:
                self.bar.update(n - self.bar.n)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self._update()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._update()
        self.bar.close()


# ----------------------------------------------------------------------------------------- output and state

class _Store:
    """The output folder. ``.prepare/state.json`` is the source of truth: the chunks of each split, and per run
    the committed parts and their counts. ``train/index.json`` and ``val/index.json`` are rebuilt from it.
    ``.prepare/parts/`` holds each committed part's skip list and the sorted hashes of the keys it wrote."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.meta = os.path.join(out, STATE_DIR)
        self.parts_dir = os.path.join(self.meta, "parts")
        self.state_path = os.path.join(self.meta, "state.json")
        self.state: dict[str, Any] = {}
        self.run_keys = np.zeros(0, dtype=np.uint64)  # sorted hashes of the keys this run has committed

    # -- opening: refuse / overwrite / append / resume
    def _holds_data(self) -> bool:
        if os.path.exists(self.state_path):
            return True
        return any(os.path.isdir(d) and os.listdir(d) for d in (os.path.join(self.out, s) for s in SPLITS))

    def open(self, mode: Optional[str], fp: list, options: dict[str, Any]) -> dict[str, Any]:
        if os.path.exists(os.path.join(self.out, "index.json")):
            raise ValueError(f"{self.out} is itself a LitData dataset (it has index.json); prepare writes "
                             f"OUTPUT/train and OUTPUT/val, so choose another output_dir")
        if mode == "overwrite":
            for name in (*SPLITS, STATE_DIR, "skipped.jsonl", "summary.json"):
                p = os.path.join(self.out, name)
                if os.path.isdir(p):
                    shutil.rmtree(p)
                elif os.path.exists(p):
                    os.remove(p)
        if not self._holds_data():
            if mode == "resume":
                raise ValueError(f"--mode resume: {self.out} holds no interrupted run to resume")
            self.state = {"version": STATE_VERSION, "splits": {s: {"chunks": [], "config": None} for s in SPLITS},
                          "runs": []}
            return self._new_run(fp, options)

        if os.path.exists(self.state_path):
            with open(self.state_path, encoding="utf-8") as f:
                self.state = json.load(f)
        else:
            self.state = self._import_foreign()
        last = self.state["runs"][-1] if self.state["runs"] else None
        if last is not None and last["status"] != "done" and not last["parts"] and (
                last["inputs"] != fp or last["options"] != options):
            self.state["runs"].pop()  # interrupted before committing anything: nothing to resume, forget it
            last = self.state["runs"][-1] if self.state["runs"] else None
            if last is None and not any(self.state["splits"][s]["chunks"] for s in SPLITS):
                shutil.rmtree(self.meta, ignore_errors=True)
                return self.open(mode, fp, options)
        if last is not None and last["status"] != "done":
            if last["inputs"] == fp and last["options"] == options:
                self._clean_uncommitted()
                return last  # resume (whatever the mode: appending the same inputs twice is never the intent)
            raise ValueError(
                f"{self.out} holds an interrupted run with other inputs or options. Rerun that exact command to "
                f"resume it (its inputs and options are in {self.state_path}, runs[-1]), or start over with "
                f"--mode overwrite")
        if mode == "resume":
            raise ValueError(f"--mode resume: the last run in {self.out} finished; nothing to resume "
                             f"(use --mode append to add inputs)")
        if mode is None:
            raise ValueError(f"{self.out} already holds a prepared dataset; pass --mode overwrite to replace it, "
                             f"--mode append to add these inputs to it, or choose another output_dir")
        self._clean_uncommitted()
        return self._new_run(fp, options)

    def _new_run(self, fp: list, options: dict[str, Any]) -> dict[str, Any]:
        run = {"id": len(self.state["runs"]), "status": "running", "inputs": fp, "options": options,
               "parts": {}, "started_at": time.time()}
        self.state["runs"].append(run)
        os.makedirs(self.meta, exist_ok=True)
        write_json_atomic(self.state_path, self.state)
        return run

    def _import_foreign(self) -> dict[str, Any]:
        """An output folder made by something else (e.g. the demo generator): adopt its chunks so we can append."""
        state = {"version": STATE_VERSION, "splits": {}, "runs": [], "keys_complete": False}
        for s in SPLITS:
            index = os.path.join(self.out, s, "index.json")
            if os.path.exists(index):
                with open(index, encoding="utf-8") as f:
                    idx = json.load(f)
                state["splits"][s] = {"chunks": idx.get("chunks", []), "config": idx.get("config")}
            elif os.path.isdir(os.path.join(self.out, s)) and os.listdir(os.path.join(self.out, s)):
                raise ValueError(f"{os.path.join(self.out, s)} holds files but no index.json; it is not a LitData "
                                 f"dataset. Move it away or use --mode overwrite")
            else:
                state["splits"][s] = {"chunks": [], "config": None}
        return state

    def _clean_uncommitted(self) -> None:
        """Drop what an interrupted part left: staging folders and chunk files that no index refers to."""
        shutil.rmtree(os.path.join(self.meta, "staging"), ignore_errors=True)
        for s in SPLITS:
            d = os.path.join(self.out, s)
            if not os.path.isdir(d):
                continue
            known = {c["filename"] for c in self.state["splits"][s]["chunks"]}
            for name in os.listdir(d):
                if name.startswith("chunk-") and name.endswith(".bin") and name not in known:
                    os.remove(os.path.join(d, name))
        self._write_indexes()

    # -- the keys the dataset holds
    def _keys_path(self, run_id: int, part: Union[int, str]) -> str:
        return os.path.join(self.parts_dir, f"run{run_id:04d}-part{int(part):06d}.keys.npy")

    def known_keys(self, run: dict[str, Any]) -> Optional[str]:
        """Write the sorted key hashes of every sample committed before ``run`` to ``.prepare/known-keys.npy``
        (the workers skip those keys) and return its path, or None when there are none. Also loads the keys
        ``run`` itself committed before an interruption, for the count of repeated keys."""
        earlier, unknown = [], not self.state.get("keys_complete", True)
        for r in self.state["runs"]:
            for part in r["parts"]:
                path = self._keys_path(r["id"], part)
                if not os.path.exists(path):
                    unknown = True  # committed by an older prepare that kept no keys
                elif r is run:
                    self.run_keys = np.union1d(self.run_keys, np.load(path))
                else:
                    earlier.append(np.load(path))
        if unknown:
            earlier.append(self._read_all_keys())
        if not earlier:
            return None
        path = os.path.join(self.meta, "known-keys.npy")
        with atomic_file(path, "wb") as f:
            np.save(f, np.unique(np.concatenate(earlier)))
        return path

    def _read_all_keys(self) -> Any:
        """The key hashes of every sample in the splits, read from the chunks once (a dataset made by another
        tool or an older prepare) and kept in ``.prepare/parts/existing.keys.npy``."""
        path = os.path.join(self.parts_dir, "existing.keys.npy")
        if not os.path.exists(path):
            from litdata import StreamingDataset

            hashes = []
            for s in SPLITS:
                d = os.path.join(self.out, s)
                if self.state["splits"][s]["chunks"]:
                    check_prepared_dir(d)
                    print(f"prepare: reading the keys of {d} once, to skip them on append", file=sys.stderr)
                    hashes += [key_hash(str(sample.get(KEY, ""))) for sample in StreamingDataset(d)]
            os.makedirs(self.parts_dir, exist_ok=True)
            with atomic_file(path, "wb") as f:
                np.save(f, np.unique(np.array(hashes, dtype=np.uint64)))
        return np.load(path)

    def _part_keys(self, staging: str) -> tuple[Any, int, list[str]]:
        """The sorted key hashes a staged part wrote, how many of its keys this run wrote before, and examples."""
        keys: list[str] = []
        keys_dir = os.path.join(staging, "keys")
        if os.path.isdir(keys_dir):
            for name in sorted(os.listdir(keys_dir)):
                with open(os.path.join(keys_dir, name), encoding="utf-8") as f:
                    keys += [json.loads(line) for line in f if line.strip()]
        hashes = np.array([key_hash(k) for k in keys], dtype=np.uint64)
        before = np.isin(hashes, self.run_keys)
        seen: set[int] = set()
        repeats, examples = 0, []
        for key, h, b in zip(keys, hashes.tolist(), before.tolist()):
            if b or h in seen:
                repeats += 1
                if len(examples) < 5 and key not in examples:
                    examples.append(key)
            seen.add(h)
        return np.unique(hashes), repeats, examples

    def staging(self, run_id: int, part: int) -> str:
        d = os.path.join(self.meta, "staging", f"run{run_id:04d}-part{part:06d}")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        return d

    # -- committing one part
    def commit_part(self, run: dict[str, Any], part: int, staging: str, elapsed: float) -> None:
        counts: dict[str, Any] = {}
        moves: list[tuple[str, str]] = []
        new_chunks: dict[str, list[dict[str, Any]]] = {}
        for s in SPLITS:
            counts[s] = 0
            split_state = self.state["splits"][s]
            taken = {c["filename"] for c in split_state["chunks"]}
            nxt = split_state.get("next", 0)
            new_chunks[s] = []
            for idx_path in sorted(glob.glob(os.path.join(staging, s, "w*", "index.json"))):  # one per worker
                with open(idx_path, encoding="utf-8") as f:
                    idx = json.load(f)
                if split_state["config"] is None:
                    split_state["config"] = idx["config"]
                elif (split_state["config"].get("data_format"), split_state["config"].get("data_spec")) != (
                        idx["config"].get("data_format"), idx["config"].get("data_spec")):
                    raise ValueError(f"{os.path.join(self.out, s)} holds samples of another schema "
                                     f"({split_state['config'].get('data_format')}); prepare cannot append to it")
                for c in idx["chunks"]:
                    while f"chunk-0-{nxt}.bin" in taken:
                        nxt += 1
                    name = f"chunk-0-{nxt}.bin"  # litdata's chunk-RANK-INDEX naming, so its own append still works
                    nxt += 1
                    moves.append((os.path.join(os.path.dirname(idx_path), c["filename"]),
                                  os.path.join(self.out, s, name)))
                    new_chunks[s].append({**c, "filename": name})
                    counts[s] += c["chunk_size"]
            split_state["next"] = nxt
        part_keys, repeats, examples = self._part_keys(staging)
        skipped: Counter = Counter()
        skip_lines: list[str] = []
        skip_dir = os.path.join(staging, "skipped")
        if os.path.isdir(skip_dir):
            for name in sorted(os.listdir(skip_dir)):
                with open(os.path.join(skip_dir, name), encoding="utf-8") as f:
                    for line in f:
                        if line.strip():
                            rec = json.loads(line)
                            rec["run"], rec["part"] = run["id"], part
                            skipped[rec["reason"]] += 1
                            skip_lines.append(json.dumps(rec, ensure_ascii=False))
        # 1) chunks and skip list into place (a crash here leaves only unreferenced files: cleaned on resume)
        for src, dst in moves:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(src, dst)
        os.makedirs(self.parts_dir, exist_ok=True)
        with atomic_file(os.path.join(self.parts_dir, f"run{run['id']:04d}-part{part:06d}.skipped.jsonl")) as f:
            f.write("".join(line + "\n" for line in sorted(skip_lines)))
        with atomic_file(self._keys_path(run["id"], part), "wb") as f:
            np.save(f, part_keys)
        # 2) the commit point: one atomic replace of the state file
        for s, chunks in new_chunks.items():
            self.state["splits"][s]["chunks"].extend(chunks)
        run["parts"][str(part)] = {"train": counts["train"], "val": counts["val"], "skipped": dict(skipped),
                                   "repeated_keys": repeats, "repeated_key_examples": examples,
                                   "elapsed": round(elapsed, 3)}
        write_json_atomic(self.state_path, self.state)
        new = np.setdiff1d(part_keys, self.run_keys, assume_unique=True)
        self.run_keys = np.insert(self.run_keys, np.searchsorted(self.run_keys, new), new)
        # 3) derived files (rebuilt from the state on resume, so a crash here is harmless)
        self._write_indexes()
        shutil.rmtree(staging, ignore_errors=True)

    def _write_indexes(self) -> None:
        for s in SPLITS:
            st = self.state["splits"][s]
            if not st["chunks"]:
                continue
            d = os.path.join(self.out, s)
            os.makedirs(d, exist_ok=True)
            write_json_atomic(os.path.join(d, "index.json"),
                              {"chunks": st["chunks"], "config": st["config"], "updated_at": str(time.time())})

    def _write_skipped(self) -> None:
        with atomic_file(os.path.join(self.out, "skipped.jsonl")) as f:
            if os.path.isdir(self.parts_dir):
                for name in sorted(os.listdir(self.parts_dir)):
                    if name.endswith(".skipped.jsonl"):
                        with open(os.path.join(self.parts_dir, name), encoding="utf-8") as g:
                            shutil.copyfileobj(g, f)

    # -- finishing
    def finish(self, run: dict[str, Any], elapsed: float, rows_now: int) -> dict[str, Any]:
        """Close the run; ``rows_now`` = rows processed by this call (not the parts of an interrupted run)."""
        parts = run["parts"].values()
        written = {s: sum(p[s] for p in parts) for s in SPLITS}
        skipped: Counter = Counter()
        for p in parts:
            skipped.update(p["skipped"])
        n_written = sum(written.values())
        if n_written == 0:
            # Nothing to keep from this run; leave the folder as it was (plus skipped.jsonl to see why).
            self.state["runs"].remove(run)
            if not self.state["runs"] and not any(self.state["splits"][s]["chunks"] for s in SPLITS):
                self._write_skipped()
                shutil.rmtree(self.meta, ignore_errors=True)
                for s in SPLITS:
                    d = os.path.join(self.out, s)
                    if os.path.isdir(d) and not os.listdir(d):
                        os.rmdir(d)
            else:
                for name in os.listdir(self.parts_dir):
                    if name.startswith(f"run{run['id']:04d}-"):
                        os.remove(os.path.join(self.parts_dir, name))
                write_json_atomic(self.state_path, self.state)
                self._write_skipped()
            why = ", ".join(f"{r}: {n}" for r, n in skipped.most_common()) or "the inputs have no rows"
            raise ValueError(f"prepare wrote no sample to {self.out} ({why}); see "
                             f"{os.path.join(self.out, 'skipped.jsonl')} for every skipped row")
        run["status"] = "done"
        run["finished_at"] = time.time()
        write_json_atomic(self.state_path, self.state)
        self._write_skipped()
        totals = {s: sum(c["chunk_size"] for c in self.state["splits"][s]["chunks"]) for s in SPLITS}
        repeated = sum(p.get("repeated_keys", 0) for p in parts)
        examples = list(dict.fromkeys(k for p in parts for k in p.get("repeated_key_examples", [])))[:5]
        summary = {
            "output_dir": self.out,
            "train_dir": os.path.join(self.out, "train") if totals["train"] else None,
            "val_dir": os.path.join(self.out, "val") if totals["val"] else None,
            "written": written,
            "skipped": dict(skipped.most_common()),
            "skipped_total": sum(skipped.values()),
            "duplicate_keys": repeated,
            "duplicate_key_examples": examples,
            "seconds": round(elapsed, 2),
            "rows_per_s": round(rows_now / max(elapsed, 1e-9), 1),
            "dataset_total": totals,
            "run": run["id"],
        }
        write_json_atomic(os.path.join(self.out, "summary.json"), summary)
        skip_txt = ", ".join(f"{r} {n}" for r, n in skipped.most_common())
        print(f"prepare: wrote {n_written} samples (train {written['train']}, val {written['val']}) in "
              f"{elapsed:.1f} s ({summary['rows_per_s']} rows/s); skipped {summary['skipped_total']}"
              + (f" ({skip_txt}) -> {os.path.join(self.out, 'skipped.jsonl')}" if skip_txt else ""), file=sys.stderr)
        print(f"prepare: dataset now train={totals['train']} at {summary['train_dir']}, val={totals['val']} at "
              f"{summary['val_dir']}", file=sys.stderr)
        if repeated:
            print(f"prepare: warning: {repeated} samples share their key with an earlier sample of these inputs "
                  f"(e.g. {', '.join(map(repr, examples))}). They were kept, but a key should name one pair: give "
                  f"--id_key a column of unique ids, or remove the repeated rows", file=sys.stderr)
        if skipped.get("already_in_dataset"):
            print(f"prepare: {skipped['already_in_dataset']} rows were skipped because the dataset already holds "
                  f"their key (the same input appended twice?)", file=sys.stderr)
        if run["options"]["val_fraction"] > 0 and not totals["val"]:
            print(f"prepare: warning: val_fraction={run['options']['val_fraction']} held back no sample "
                  f"(too few rows); there is no val split", file=sys.stderr)
        return summary


# ------------------------------------------------------------------------------------------------------ CLI

def main(argv: Optional[list[str]] = None) -> int:
    """``python -m rwkv_clip.datamodules.prepare``: the exit status (0 done, 1 bad input, 130 interrupted)."""
    from rwkv_clip.command import run

    return run(prepare, argv, prog="python -m rwkv_clip.datamodules.prepare", interrupted="")  # prepare says it


if __name__ == "__main__":
    sys.exit(main())
