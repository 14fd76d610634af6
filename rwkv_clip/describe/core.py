"""The description generation run: read rows -> request a field from the model -> record each finished row.

``describe()`` checks the options and wires the three stages (``read.py``, ``request.py``, ``record.py``); it
also resumes, summarises, and optionally exports (prompt, answer) pairs for instruction tuning.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional

from rwkv_clip.describe.client import Backend, OpenAIChatClient, TransformersBackend
from rwkv_clip.describe.prompt import DEFAULT_SYSTEM_PROMPT, PromptTemplate
from rwkv_clip.describe.read import RowReader
from rwkv_clip.describe.record import OutputPaths, OutputWriter, Recorder, Summary, load_done
from rwkv_clip.describe.request import STATUSES, RewriteStage, Runner, Stage
from rwkv_clip.schema import SYNTHETIC_CAPTION, TAGS, TEXT, Columns, format_tags
from rwkv_clip.tables import Table, keep_rows, write_json_atomic

log = logging.getLogger("rwkv_clip.describe")
MAX_LISTED_FAILED = 10_000  # in the .describe.json summary; the output file has them all (status=failed)


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
    (also spelled `python -m rwkv_clip.describe rewrite ...`). The captions and tags come from the `caption` and
    `tags` subcommands, and `all` runs the three steps: `python -m rwkv_clip.describe all --help`.

    Every row ends with `status` generated | fallback (the answer was empty, a refusal, too short or repeated
    the prompt: generated_caption = the synthetic caption, else the raw text) | failed (the request failed after
    all retries: generated_caption = ""), a `reason`, and `row` (its 0-based index in the input). Rows are
    appended in completion order and fsync'ed every `flush_every` rows; a killed run continues with
    `--resume true`, skipping the rows already done. A summary is printed and saved as OUTPUT.describe.json.
    Input rows that cannot be read (bad JSON, a malformed CSV row, invalid UTF-8) are counted as failed and
    listed with their file and line.

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
        max_consecutive_failures: Stop the run (resumable) after this many failed requests in a row, e.g. when
            the server is down (rows that need no request do not interrupt the streak); 0 = never.
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
    _check_counts(concurrency=concurrency, flush_every=flush_every, max_words=max_words, min_words=min_words,
                  batch_size=batch_size, max_retries=max_retries, max_consecutive_failures=max_consecutive_failures,
                  sample=sample)
    # Everything that can be wrong with the input, the output path or the prompt fails here, before any output.
    reader = RowReader(input, Columns(key=id_key, image=image_key, text=text_key,
                                      synthetic_caption=synthetic_caption_key, tags=tags_key), input_format)
    paths = OutputPaths.choose(input, reader.fmt, output, output_format, instruction_data)
    paths.check_fresh_or_resumable(resume)
    template = PromptTemplate.from_file(prompt_template, max_words)

    def make_stage() -> Stage:
        backend_ = _backend(backend, base_url, model, api_key_env, timeout, max_retries, backoff_base, backoff_max,
                            temperature, max_tokens, extra_body, concurrency, batch_size, device)
        return RewriteStage(backend_, template, system_prompt, cap_words or max_words + max_words // 4, min_words)

    summary, select = run_step(reader, paths, make_stage, step="describe", resume=resume,
                               retry_failed=retry_failed, flush_every=flush_every,
                               max_consecutive_failures=max_consecutive_failures, sample=sample, seed=seed,
                               max_rows=max_rows, progress=progress, server=f"the server at {base_url}",
                               keep_prompts=bool(instruction_data))
    if instruction_data:
        summary.instruction_pairs = write_instruction_data(paths.journal, paths.journal_fmt, instruction_data,
                                                           instruction_format, template, system_prompt, select)
    print(summary.format(), flush=True)
    return summary


def _check_counts(sample: Optional[int] = None, **values: int) -> None:
    lowest = {"min_words": 0, "max_retries": 0, "max_consecutive_failures": 0}
    for name, v in values.items():
        if v < lowest.get(name, 1):
            raise ValueError(f"--{name} must be >= {lowest.get(name, 1)}, got {v}")
    if sample is not None and sample < 1:
        raise ValueError(f"--sample must be >= 1, got {sample}")


def run_step(reader: RowReader, paths: OutputPaths, make_stage: Callable[[], Stage], *, step: str, resume: bool,
             retry_failed: bool, flush_every: int, max_consecutive_failures: int, sample: Optional[int], seed: int,
             max_rows: Optional[int], progress: bool, server: str, keep_prompts: bool = False,
             stale: Optional[Callable[[dict], bool]] = None) -> tuple[Summary, Optional[set]]:
    """Run one stage over the reader's rows into ``paths``: check a resume, build the stage (``make_stage``: the
    model is up, or a bad key, URL or model stops here, before the output is touched), continue or start the
    output, run, and write the state file ``OUTPUT.describe.json``. ``stale(record)``: records of an earlier run
    to redo (``describe all`` redoes a step's rows whose input changed). Returns the summary and the --sample."""
    t_start = time.time()
    n = len(reader)
    state = {"input": str(Path(reader.path).resolve()), "n_rows": n, "input_format": reader.fmt,
             "input_bytes": os.path.getsize(reader.path) if os.path.isfile(reader.path) else None, "step": step}
    if resume and os.path.exists(paths.state):
        old = json.loads(Path(paths.state).read_text(encoding="utf-8"))
        if old.get("input") != state["input"] or old.get("n_rows") != n:
            raise ValueError(f"{paths.path} was made from {old.get('input')} ({old.get('n_rows')} rows), not "
                             f"{state['input']} ({n} rows); choose another --output")
        if old.get("input_bytes") != state["input_bytes"] and stale is None:
            log.warning("%s changed size since %s was started; rows are matched by their index", reader.path,
                        paths.path)
    select = set(random.Random(seed).sample(range(n), sample)) if sample is not None and sample < n else None

    t_setup = time.time()
    stage = make_stage()
    backend = stage.backend
    summary = Summary(input=str(reader.path), output=str(paths.path), step=step,
                      total=len(select) if select is not None else reader.total, setup_s=time.time() - t_setup)
    if resume and stale is not None and os.path.exists(paths.journal):
        keep_rows(paths.journal, paths.journal_fmt, lambda _, r: r.values is None or not stale(r.values))
    done = _resume(paths, n, retry_failed, select, summary) if resume and os.path.exists(paths.journal) \
        else bytearray(n)
    Path(paths.path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(paths.state, {**state, "status": "running", "output": str(paths.path)})
    recorder = Recorder(OutputWriter(paths, stage.field), summary, flush_every, progress, keep_prompts=keep_prompts)
    runner = Runner(stage, max_consecutive_failures, server=server)

    def rows_to_do() -> Iterator[tuple[int, dict]]:
        for taken, (idx, row, error) in enumerate(reader.rows(lambda i: not done[i] and (select is None
                                                                                          or i in select))):
            if max_rows is not None and taken >= max_rows:
                summary.stopped = f"--max_rows {max_rows} reached"
                return
            if row is None:
                recorder.unreadable(idx, error)
            else:
                yield idx, row

    try:
        runner.run(rows_to_do(), recorder.record)
    except BaseException as e:
        summary.stopped = "interrupted" if isinstance(e, KeyboardInterrupt) else backend.redact(str(e))
        raise
    finally:
        recorder.close()
        backend.close()
        summary.elapsed = time.time() - t_start
        summary.retries = dict(getattr(backend, "retries", {}) or {})
        summary.complete = summary.generated + summary.fallback + summary.failed == summary.total
        write_json_atomic(paths.state, {
            **state, "status": "complete" if summary.complete else "incomplete", "output": str(paths.path),
            "counts": summary.counts(), "total": summary.total, "stopped": summary.stopped,
            "retries": summary.retries, "fallback_reasons": summary.fallback_reasons,
            "failed_rows": [list(f) for f in summary.failed_rows[:MAX_LISTED_FAILED]]})
        if summary.unreadable:
            log.warning("%d input rows could not be read; they are counted as failed, with the line and the reason "
                        "in the summary", summary.unreadable)
        if summary.stopped and not summary.complete and sys.exc_info()[0] is not None:
            print(summary.format(), flush=True)

    if paths.fmt == "parquet":
        paths.write_parquet()
    return summary, select


def _backend(kind: str, base_url: str, model: Optional[str], api_key_env: str, timeout: float, max_retries: int,
             backoff_base: float, backoff_max: float, temperature: float, max_tokens: int,
             extra_body: Optional[dict], concurrency: int, batch_size: int, device: str) -> Backend:
    if kind == "openai":
        key = os.environ.get(api_key_env) or None
        if key is None:
            log.info("$%s is not set: sending no API key", api_key_env)
        return OpenAIChatClient(base_url, model, key, timeout=timeout, max_retries=max_retries,
                                backoff_base=backoff_base, backoff_max=backoff_max, temperature=temperature,
                                max_tokens=max_tokens, extra_body=extra_body, concurrency=concurrency,
                                api_key_env=api_key_env)
    if kind == "transformers":
        if not model:
            raise ValueError("--backend transformers needs --model pointing to a local model directory")
        return TransformersBackend(model, batch_size=batch_size, max_new_tokens=max_tokens, temperature=temperature,
                                   device=device)
    raise ValueError(f"--backend must be 'openai' or 'transformers', got {kind!r}")


def _resume(paths: OutputPaths, n: int, retry_failed: bool, select: Optional[set], summary: Summary) -> bytearray:
    """Read what an earlier run wrote into ``summary``; returns, per input row, whether it is done."""
    ds = load_done(paths.journal, paths.journal_fmt, n, retry_failed)
    if select is None:
        for s in STATUSES:
            setattr(summary, s, ds.counts[s])
        summary.failed_rows = list(ds.failed)
    else:
        for i in select:
            if ds.done[i]:
                status = STATUSES[ds.done[i] - 1]
                setattr(summary, status, getattr(summary, status) + 1)
        summary.failed_rows = [f for f in ds.failed if f[0] in select]
    summary.done_before = summary.generated + summary.fallback + summary.failed
    log.info("resuming %s: %d rows already done", paths.journal, summary.done_before)
    return ds.done


def write_instruction_data(journal: str, fmt: str, path: str, layout: str, template: PromptTemplate,
                           system_prompt: Optional[str], select: Optional[set] = None) -> int:
    """(prompt, answer) pairs of the accepted answers, as LLaMA-Factory alpaca or sharegpt JSON.
    Also writes dataset_info.json beside it when there is none, so `dataset_dir` can point at the folder."""
    if layout not in ("alpaca", "sharegpt"):
        raise ValueError(f"--instruction_format must be alpaca or sharegpt, got {layout!r}")
    pairs = []
    for row in Table(journal, fmt):
        rec = row.values
        if rec is None or not row.ended or rec.get("status") != "generated":
            continue
        try:
            if select is not None and int(rec["row"]) not in select:
                continue
        except (KeyError, ValueError, TypeError):
            continue
        prompt = rec.get("prompt") or template.render(rec.get(TEXT, ""), rec.get(SYNTHETIC_CAPTION, ""),
                                                      format_tags(rec.get(TAGS)))
        answer = rec["generated_caption"]
        if layout == "alpaca":
            item = {"instruction": prompt, "input": "", "output": answer}
        else:
            item = {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}
        if system_prompt:
            item["system"] = system_prompt
        pairs.append(item)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, pairs)
    name = Path(path).stem
    entry = {"file_name": Path(path).name}
    if layout == "alpaca":
        entry["columns"] = {"prompt": "instruction", "query": "input", "response": "output", "system": "system"}
    else:
        entry.update(formatting="sharegpt", columns={"messages": "conversations", "system": "system"})
    info = Path(path).parent / "dataset_info.json"
    if not info.exists():
        write_json_atomic(str(info), {name: entry})
    else:
        log.info("add to %s: %s", info, json.dumps({name: entry}))
    return len(pairs)
