"""The description generation run: read rows, ask the model concurrently, clean/check answers, append results
crash-safely, resume, summarise, and optionally export (prompt, answer) pairs for instruction tuning."""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from rwkv_clip.describe.client import (Backend, FatalBackendError, OpenAIChatClient, RequestFailed,
                                       TransformersBackend)
from rwkv_clip.describe.io import (Keys, RowSource, RowWriter, detect_format, iter_records, journal_to_parquet,
                                   load_done, need_pyarrow, STATUSES)
from rwkv_clip.describe.prompt import (DEFAULT_SYSTEM_PROMPT, PromptTemplate, check_answer, clean_answer,
                                       normalize_tags)

log = logging.getLogger("rwkv_clip.describe")
MAX_LISTED_FAILED = 10_000  # in the .describe.json summary; the output file has them all (status=failed)


@dataclass
class Summary:
    input: str
    output: str
    total: int = 0                 # rows this run is responsible for (all, or the --sample)
    generated: int = 0
    fallback: int = 0
    failed: int = 0
    done_before: int = 0           # rows found finished in the output by --resume
    processed: int = 0             # rows finished by this run
    elapsed: float = 0.0
    retries: dict = field(default_factory=dict)
    fallback_reasons: dict = field(default_factory=dict)
    failed_rows: list = field(default_factory=list)   # (row, key, reason)
    complete: bool = False
    stopped: Optional[str] = None  # why the run ended early, if it did
    instruction_pairs: Optional[int] = None

    @property
    def rows_per_s(self) -> float:
        return self.processed / self.elapsed if self.elapsed > 0 else 0.0

    def format(self) -> str:
        lines = [f"describe: {self.input} -> {self.output}",
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
            lines.append(f"  failed rows ({self.failed}; rerun with --resume true to retry them):")
            for r, k, reason in self.failed_rows[:20]:
                lines.append(f"    row {r}" + (f" (key {k})" if k else "") + f": {reason}")
            if len(self.failed_rows) > 20:
                lines.append(f"    ... all listed in {self.output}.describe.json")
        if self.instruction_pairs is not None:
            lines.append(f"  instruction pairs written: {self.instruction_pairs}")
        if self.stopped:
            lines.append(f"  STOPPED EARLY: {self.stopped}. Rerun with --resume true to continue.")
        return "\n".join(lines)


def _default_output(inp: str, in_fmt: str, instruction_data: Optional[str]) -> str:
    if instruction_data:
        return str(Path(instruction_data).with_suffix("")) + ".rows.jsonl"
    p = Path(inp.rstrip("/"))
    if in_fmt == "litdata":
        try:
            need_pyarrow()
            ext = ".parquet"
        except ImportError:
            ext = ".jsonl"
        return str(p) + ".described" + ext
    return str(p.with_suffix("")) + ".described" + p.suffix


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _atomic_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def describe(
    input: str,
    output: Optional[str] = None,
    base_url: str = "http://localhost:8000/v1",
    model: Optional[str] = None,
    backend: Literal["openai", "transformers"] = "openai",
    api_key_env: str = "OPENAI_API_KEY",
    concurrency: int = 32,
    timeout: float = 60.0,
    max_retries: int = 5,
    backoff_base: float = 1.0,
    backoff_max: float = 60.0,
    temperature: float = 0.2,
    max_tokens: int = 128,
    extra_body: Optional[dict] = None,
    prompt_template: Optional[str] = None,
    system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT,
    max_words: int = 40,
    cap_words: Optional[int] = None,
    min_words: int = 3,
    text_key: str = "text",
    synthetic_caption_key: str = "synthetic_caption",
    tags_key: str = "tags",
    image_key: str = "image",
    id_key: str = "key",
    input_format: Optional[Literal["csv", "tsv", "jsonl", "parquet", "litdata"]] = None,
    output_format: Optional[Literal["csv", "tsv", "jsonl", "parquet"]] = None,
    resume: bool = False,
    retry_failed: bool = True,
    flush_every: int = 64,
    max_consecutive_failures: int = 200,
    sample: Optional[int] = None,
    seed: int = 0,
    instruction_data: Optional[str] = None,
    instruction_format: Literal["alpaca", "sharegpt"] = "alpaca",
    batch_size: int = 8,
    device: str = "auto",
    max_rows: Optional[int] = None,
    progress: bool = True,
) -> Summary:
    """Add an LLM-written generated_caption to every row (RWKV-CLIP's diverse description generation).

    The model merges each row's raw text, synthetic caption and tags into one description (prompt: see
    --prompt_template). Example: python -m rwkv_clip.describe --input rows.csv --base_url http://localhost:8000/v1

    Every row ends with `status` generated | fallback (the answer was empty, a refusal, too short or repeated
    the prompt: generated_caption = the synthetic caption, else the raw text) | failed (the request failed after
    all retries: generated_caption = ""), a `reason`, and `row` (its 0-based index in the input). Rows are
    appended in completion order and fsync'ed every `flush_every` rows; a killed run continues with
    `--resume true`, skipping the rows already done. A summary is printed and saved as OUTPUT.describe.json.

    Args:
        input: CSV/TSV, JSONL or Parquet file, or a prepared LitData directory, with columns text,
            synthetic_caption, tags (any may be missing) and optionally image and key.
        output: New file to write (.jsonl, .csv, .tsv or .parquet). Never the input; an existing output is only
            continued with --resume true. Default: INPUT.described.<same suffix> (LitData input: .parquet if
            pyarrow is installed, else .jsonl). Image bytes (LitData/Parquet input) go to OUTPUT_images/ for
            CSV/JSONL output; image paths are rewritten so they resolve from the output's folder. For .parquet
            output rows are journaled to OUTPUT.journal.jsonl (keep it for --resume) and the Parquet file is
            written at the end.
        base_url: OpenAI-compatible server, including /v1 (vLLM, llama.cpp server, Ollama, TGI, hosted APIs).
        model: Model name on the server (default: the first one listed by BASE_URL/models), or the local model
            directory for --backend transformers.
        backend: "openai" (HTTP chat-completions) or "transformers" (local causal LM; needs transformers).
        api_key_env: Name of the environment variable holding the API key (sent as a Bearer token, never logged).
            Unset or empty: no Authorization header (local servers).
        concurrency: Requests in flight at once.
        timeout: Seconds to wait for the server on one request (connect / each read).
        max_retries: Retries per row on 429, 5xx, timeouts, connection errors and malformed responses.
        backoff_base: First retry delay in seconds; doubles each retry, with jitter in [0.5, 1] x.
        backoff_max: Longest retry delay in seconds (also caps a server's Retry-After).
        temperature: Sampling temperature.
        max_tokens: Longest answer in tokens.
        extra_body: Extra JSON fields for the request body, e.g. {"top_p": 0.9, "seed": 0}.
        prompt_template: Text file with {text}, {synthetic_caption}, {tags} and {max_words} placeholders
            (default: the shipped rwkv_clip/describe/prompt.txt).
        system_prompt: System message (null for none).
        max_words: Word limit asked for in the prompt.
        cap_words: Hard cap on the cleaned answer in words (default: max_words + max_words // 4).
        min_words: Shorter answers are rejected (row falls back).
        text_key: Input column with the raw web text.
        synthetic_caption_key: Input column with the captioner's caption.
        tags_key: Input column with the tags (a string separated by , | ; or a list).
        image_key: Input column with the image (path relative to the input file, absolute path, URL or bytes).
        id_key: Input column with a unique row id (carried through as `key`), as in the prepare command.
        input_format: Override the format detected from the input's suffix.
        output_format: Override the format detected from the output's suffix.
        resume: Continue an existing output: keep its finished rows, redo the rest.
        retry_failed: With --resume, retry the rows an earlier run marked failed.
        flush_every: Flush and fsync the output after this many rows (and at least every 5 s).
        max_consecutive_failures: Stop the run (resumable) after this many failed rows in a row, e.g. when the
            server is down; 0 = never.
        sample: Only process this many rows, drawn uniformly at random (seeded) from the input.
        seed: Seed for --sample.
        instruction_data: Also write the accepted (prompt, answer) pairs as a JSON file for instruction tuning
            (LLaMA-Factory): run a strong model on a --sample, then fine-tune a small model on the pairs.
        instruction_format: "alpaca" ([{"instruction", "input", "output", "system"}]) or "sharegpt"
            ([{"conversations": [{"from": "human", ...}, {"from": "gpt", ...}], "system"}]).
        batch_size: Rows per generate() call for --backend transformers.
        device: Device for --backend transformers ("auto": cuda if available).
        max_rows: Stop after this many new rows (a trial run; continue later with --resume true).
        progress: Show a progress bar (rows/s, ETA).
    """
    t_start = time.time()
    for name, v, lo in (("concurrency", concurrency, 1), ("flush_every", flush_every, 1),
                        ("max_words", max_words, 1), ("min_words", min_words, 0), ("batch_size", batch_size, 1),
                        ("max_retries", max_retries, 0), ("max_consecutive_failures", max_consecutive_failures, 0)):
        if v < lo:
            raise ValueError(f"--{name} must be >= {lo}, got {v}")
    if sample is not None and sample < 1:
        raise ValueError(f"--sample must be >= 1, got {sample}")
    keys = Keys(text_key, synthetic_caption_key, tags_key, image_key, id_key)
    source = RowSource(input, keys, input_format)

    # ---------------------------------------------------------------------------- where to write
    output = output or _default_output(input, source.fmt, instruction_data)
    out_fmt = output_format or detect_format(output, "output")
    out_path, in_path = Path(output), Path(input)
    if out_path.resolve() == in_path.resolve() or _same_path(out_path, in_path):
        raise ValueError(f"--output {output} is the input; choose a new file (the input is never edited)")
    if source.fmt == "litdata" and in_path.resolve() in out_path.resolve().parents:
        raise ValueError(f"--output {output} is inside the input LitData directory; write it elsewhere")
    if out_fmt == "parquet":
        need_pyarrow()
        journal = str(out_path) + ".journal.jsonl"
        journal_fmt = "jsonl"
    else:
        journal, journal_fmt = str(out_path), out_fmt
    state_path = str(out_path) + ".describe.json"
    images_dir = str(out_path.with_suffix("")) + "_images"
    existing = [p for p in (journal, str(out_path)) if Path(p).exists()]
    if existing and not resume:
        raise FileExistsError(f"{existing[0]} exists; pass --resume true to continue that run, "
                              "or choose another --output")
    if resume and out_fmt == "parquet" and out_path.exists() and not Path(journal).exists():
        raise ValueError(f"cannot resume {output}: its journal {journal} is gone; choose another --output")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    template = PromptTemplate.from_file(prompt_template, max_words)
    cap = cap_words or max_words + max_words // 4

    # ---------------------------------------------------------------------------- what is left to do
    if source.fmt in ("csv", "tsv", "jsonl"):
        log.info("counting rows of %s", input)
    n = len(source)
    state = {"input": str(in_path.resolve()), "n_rows": n, "input_format": source.fmt,
             "input_bytes": in_path.stat().st_size if in_path.is_file() else None}
    if resume and Path(state_path).exists():
        old = json.loads(Path(state_path).read_text(encoding="utf-8"))
        if old.get("input") != state["input"] or old.get("n_rows") != n:
            raise ValueError(f"{output} was made from {old.get('input')} ({old.get('n_rows')} rows), not "
                             f"{state['input']} ({n} rows); choose another --output")
        if old.get("input_bytes") != state["input_bytes"]:
            log.warning("%s changed size since %s was started; rows are matched by their index", input, output)
    select = None
    if sample is not None and sample < n:
        select = set(random.Random(seed).sample(range(n), sample))

    # ---------------------------------------------------------------------------- the model
    stop = threading.Event()
    if backend == "openai":
        key = os.environ.get(api_key_env) or None
        if key is None:
            log.info("$%s is not set: sending no API key", api_key_env)
        client: Backend = OpenAIChatClient(base_url, model, key, timeout=timeout, max_retries=max_retries,
                                           backoff_base=backoff_base, backoff_max=backoff_max,
                                           temperature=temperature, max_tokens=max_tokens, extra_body=extra_body,
                                           concurrency=concurrency, stop_event=stop, api_key_env=api_key_env)
    elif backend == "transformers":
        if not model:
            raise ValueError("--backend transformers needs --model pointing to a local model directory")
        client = TransformersBackend(model, batch_size=batch_size, max_new_tokens=max_tokens,
                                     temperature=temperature, device=device)
    else:
        raise ValueError(f"--backend must be 'openai' or 'transformers', got {backend!r}")

    # The client is up (a bad key or URL stops here, before the output is touched); now read the output.
    summary = Summary(input=str(input), output=str(output), total=len(select) if select is not None else n)
    if resume and Path(journal).exists():
        ds = load_done(journal, journal_fmt, n, retry_failed)
        done = ds.done
        if select is None:
            for s in STATUSES:
                setattr(summary, s, ds.counts[s])
            summary.failed_rows = list(ds.failed)
        else:
            for i in select:
                if done[i]:
                    setattr(summary, STATUSES[done[i] - 1], getattr(summary, STATUSES[done[i] - 1]) + 1)
            summary.failed_rows = [f for f in ds.failed if f[0] in select]
        summary.done_before = summary.generated + summary.fallback + summary.failed
        log.info("resuming %s: %d rows already done", journal, summary.done_before)
    else:
        done = bytearray(n)

    _atomic_json(state_path, {**state, "status": "running", "output": str(output)})
    writer = RowWriter(journal, journal_fmt, images_dir, bytes_mode="b64" if out_fmt == "parquet" else "file")
    fallback_reasons: Counter = Counter()
    new_failed: list = []

    def messages(prompt: str) -> list[dict]:
        return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
               [{"role": "user", "content": prompt}]

    def fallback_text(row: dict) -> str:
        return row.get("synthetic_caption") or row.get("text") or ""

    def work(items):  # runs in a worker thread: only the network / model call
        try:
            answers = client.complete_batch([messages(p) for _, _, p in items])
        except (RequestFailed, FatalBackendError) as e:
            if isinstance(e, FatalBackendError):
                raise
            return [(it, None, client.redact(str(e))) for it in items]
        except Exception as e:  # a backend bug or OOM must not kill a 15M-row run: mark the rows, go on
            return [(it, None, client.redact(f"{type(e).__name__}: {e}")) for it in items]
        return [(it, a, None) for it, a in zip(items, answers)]

    written_since_flush, last_flush, consecutive_failed = 0, time.time(), 0
    last_fail_reason = ""

    def record(idx: int, row: dict, status: str, caption: str, reason: str, prompt: Optional[str] = None):
        nonlocal written_since_flush, last_flush, consecutive_failed, last_fail_reason
        out = dict(row)
        out.update(row=idx, generated_caption=caption, reason=reason, status=status)
        if instruction_data and prompt is not None:
            out["prompt"] = prompt
        writer.write(out)
        setattr(summary, status, getattr(summary, status) + 1)
        summary.processed += 1
        if status == "fallback":
            fallback_reasons[reason.split(" (")[0]] += 1
        if status == "failed":
            new_failed.append((idx, row.get("key"), reason))
            consecutive_failed += 1
            last_fail_reason = reason
        else:
            consecutive_failed = 0
        written_since_flush += 1
        if written_since_flush >= flush_every or time.time() - last_flush > 5.0:
            writer.flush()
            written_since_flush, last_flush = 0, time.time()
        pbar.update(1)
        pbar.set_postfix(gen=summary.generated, fb=summary.fallback, fail=summary.failed, refresh=False)
        if max_consecutive_failures and consecutive_failed >= max_consecutive_failures:
            raise RuntimeError(f"{consecutive_failed} rows failed in a row (last: {last_fail_reason}); "
                               f"is the server at {base_url} up? Finished rows are saved")

    def finish(idx: int, row: dict, prompt: str, answer: Optional[str], error: Optional[str]):
        if error is not None:
            return record(idx, row, "failed", "", error, prompt)
        clean = clean_answer(answer, cap)
        rejected = check_answer(clean, template, min_words)
        if rejected is None:
            return record(idx, row, "generated", clean, "", prompt)
        return record(idx, row, "fallback", fallback_text(row), rejected, prompt)

    from tqdm.auto import tqdm
    pbar = tqdm(total=summary.total, initial=summary.done_before, unit="row", dynamic_ncols=True,
                smoothing=0.05, mininterval=0.5, disable=not progress, desc="describe")
    pool = ThreadPoolExecutor(max_workers=client.concurrency, thread_name_prefix="describe")
    pending: dict[Future, list] = {}
    max_pending = client.concurrency * 2  # keep every worker busy without reading the whole input ahead

    def drain(max_left: int):  # process finished calls until at most `max_left` are in flight
        while len(pending) > max_left:
            finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in finished:
                pending.pop(fut)
                for (idx, row, prompt), answer, error in fut.result():  # FatalBackendError propagates here
                    finish(idx, row, prompt, answer, error)

    submitted = 0
    batch: list = []
    try:
        for idx, row, err in source.rows(lambda i: not done[i] and (select is None or i in select)):
            if max_rows is not None and submitted >= max_rows:
                summary.stopped = f"--max_rows {max_rows} reached"
                break
            submitted += 1
            if row is None:  # unreadable input line: nothing to write out, but counted and listed
                summary.failed += 1
                summary.processed += 1
                new_failed.append((idx, None, err))
                pbar.update(1)
                continue
            prompt_in = (row.get("text", ""), row.get("synthetic_caption", ""), normalize_tags(row.get("tags")))
            if not any(s.strip() for s in prompt_in):
                record(idx, row, "fallback", "", "all input texts empty")
                continue
            batch.append((idx, row, template.render(*prompt_in)))
            if len(batch) >= client.batch_size:
                pending[pool.submit(work, batch)] = batch
                batch = []
                if len(pending) >= max_pending:
                    drain(max_pending - 1)
        if batch:
            pending[pool.submit(work, batch)] = batch
        drain(0)
    except BaseException as e:
        stop.set()  # ends the workers' backoff sleeps; in-flight rows are not written and get redone on resume
        pool.shutdown(wait=False, cancel_futures=True)
        summary.stopped = "interrupted" if isinstance(e, KeyboardInterrupt) else client.redact(str(e))
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        pbar.close()
        writer.close()
        client.close()
        summary.elapsed = time.time() - t_start
        summary.fallback_reasons = dict(fallback_reasons)
        summary.retries = dict(getattr(client, "retries", {}) or {})
        summary.failed_rows = (summary.failed_rows + new_failed)
        summary.complete = summary.generated + summary.fallback + summary.failed == summary.total
        _atomic_json(state_path, {**state, "status": "complete" if summary.complete else "incomplete",
                                  "output": str(output), "counts": {s: getattr(summary, s) for s in STATUSES},
                                  "total": summary.total, "stopped": summary.stopped,
                                  "retries": summary.retries, "fallback_reasons": summary.fallback_reasons,
                                  "failed_rows": [list(f) for f in summary.failed_rows[:MAX_LISTED_FAILED]]})
        if summary.stopped and not summary.complete and sys.exc_info()[0] is not None:
            print(summary.format(), flush=True)

    if out_fmt == "parquet":
        journal_to_parquet(journal, str(out_path))
    if instruction_data:
        summary.instruction_pairs = write_instruction_data(journal, journal_fmt, instruction_data,
                                                           instruction_format, template, system_prompt, select)
    print(summary.format(), flush=True)
    return summary


def write_instruction_data(journal: str, fmt: str, path: str, layout: str, template: PromptTemplate,
                           system_prompt: Optional[str], select: Optional[set] = None) -> int:
    """(prompt, answer) pairs of the accepted answers, as LLaMA-Factory alpaca or sharegpt JSON.
    Also writes dataset_info.json beside it when there is none, so `dataset_dir` can point at the folder."""
    if layout not in ("alpaca", "sharegpt"):
        raise ValueError(f"--instruction_format must be alpaca or sharegpt, got {layout!r}")
    pairs = []
    for rec, complete in iter_records(journal, fmt):
        if rec is None or not complete or rec.get("status") != "generated":
            continue
        try:
            if select is not None and int(rec["row"]) not in select:
                continue
        except (KeyError, ValueError, TypeError):
            continue
        prompt = rec.get("prompt") or template.render(rec.get("text", ""), rec.get("synthetic_caption", ""),
                                                      normalize_tags(rec.get("tags")))
        answer = rec["generated_caption"]
        if layout == "alpaca":
            item = {"instruction": prompt, "input": "", "output": answer}
        else:
            item = {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}
        if system_prompt:
            item["system"] = system_prompt
        pairs.append(item)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _atomic_json(path, pairs)
    name = Path(path).stem
    entry = {"file_name": Path(path).name}
    if layout == "alpaca":
        entry["columns"] = {"prompt": "instruction", "query": "input", "response": "output", "system": "system"}
    else:
        entry.update(formatting="sharegpt", columns={"messages": "conversations", "system": "system"})
    info = Path(path).parent / "dataset_info.json"
    if not info.exists():
        _atomic_json(str(info), {name: entry})
    else:
        log.info("add to %s: %s", info, json.dumps({name: entry}))
    return len(pairs)
