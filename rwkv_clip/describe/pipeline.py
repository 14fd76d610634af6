"""Steps 1 and 2 of RWKV-CLIP's diverse description generation, and the three steps in one run.

- :func:`caption` adds ``synthetic_caption`` (a vision model captions each image);
- :func:`tags` adds ``tags`` (a CLIP model over a tag vocabulary, or a vision model asked for the objects);
- :func:`describe_all` runs caption -> tags -> rewrite (:func:`rwkv_clip.describe.describe`), so image-alt-text
  pairs become a file that ``prepare`` reads with all three training texts.

Each is one :class:`~rwkv_clip.describe.request.Stage` run by :func:`~rwkv_clip.describe.core.run_step`, so they
share ``describe``'s concurrency, retries, crash-safe output, ``--resume``, summary and key redaction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from rwkv_clip.describe.client import Backend
from rwkv_clip.describe.core import _backend, _check_counts, run_step
from rwkv_clip.describe.prompt import DEFAULT_SYSTEM_PROMPT, PromptTemplate
from rwkv_clip.describe.read import RowReader, StepReader
from rwkv_clip.describe.record import OutputPaths, Summary
from rwkv_clip.describe.request import STATUSES, CaptionStage, RewriteStage, Stage, TagStage
from rwkv_clip.schema import IMAGE, Columns
from rwkv_clip.tables import Table

log = logging.getLogger("rwkv_clip.describe")

Format = Optional[Literal["csv", "tsv", "jsonl", "parquet", "litdata"]]
OutFormat = Optional[Literal["csv", "tsv", "jsonl", "parquet"]]


def _reader(input: str, image_key: str, text_key: str, id_key: str, input_format: Optional[str],
            max_image_side: int) -> RowReader:
    if max_image_side < 0:
        raise ValueError(f"--max_image_side must be >= 0 (0: never shrink), got {max_image_side}")
    return RowReader(input, Columns(key=id_key, image=image_key, text=text_key), input_format, required=(IMAGE,),
                     any_of=())


def _captioner(backend: str, base_url: str, model: Optional[str], api_key_env: str, timeout: float,
               max_retries: int, backoff_base: float, backoff_max: float, temperature: float, max_tokens: int,
               extra_body: Optional[dict], concurrency: int, batch_size: int, device: str,
               local_prompt: Optional[str], num_beams: int, trust_remote_code: bool) -> Backend:
    if backend == "transformers":
        if not model:
            raise ValueError("--backend transformers needs --model pointing to a local image-to-text model directory")
        from rwkv_clip.describe.vision import TransformersCaptioner

        return TransformersCaptioner(model, batch_size=batch_size, max_new_tokens=max_tokens, device=device,
                                     prompt=local_prompt, num_beams=num_beams, trust_remote_code=trust_remote_code)
    return _backend(backend, base_url, model, api_key_env, timeout, max_retries, backoff_base, backoff_max,
                    temperature, max_tokens, extra_body, concurrency, batch_size, device)


def _tagger(tagger: str, model: Optional[str], vocabulary: Optional[str], top_k: int, threshold: float,
            tag_templates: list[str], tokenizer: Optional[str], base_url: str, api_key_env: str, timeout: float,
            max_retries: int, backoff_base: float, backoff_max: float, temperature: float, max_tokens: int,
            extra_body: Optional[dict], concurrency: int, batch_size: int, device: str) -> Backend:
    if tagger == "clip":
        from rwkv_clip.describe.vision import ClipTagger, read_vocabulary

        if not model or not vocabulary:
            raise ValueError("--tagger clip needs --model (a CLIP checkpoint) and --vocabulary (one tag per line)")
        return ClipTagger(model, read_vocabulary(vocabulary), top_k, threshold, tag_templates, batch_size, device,
                          tokenizer)
    if tagger == "openai":
        return _backend("openai", base_url, model, api_key_env, timeout, max_retries, backoff_base, backoff_max,
                        temperature, max_tokens, extra_body, concurrency, batch_size, device)
    raise ValueError(f"--tagger must be 'clip' or 'openai', got {tagger!r}")


def caption(
    input: str,
    output: Optional[str] = None,
    backend: Literal["openai", "transformers"] = "openai",
    base_url: str = "http://localhost:8000/v1",
    model: Optional[str] = None,
    api_key_env: str = "OPENAI_API_KEY",
    concurrency: int = 16,
    timeout: float = 120.0,
    max_retries: int = 5,
    backoff_base: float = 1.0,
    backoff_max: float = 60.0,
    temperature: float = 0.2,
    max_tokens: int = 96,
    extra_body: Optional[dict] = None,
    prompt_template: Optional[str] = None,
    system_prompt: Optional[str] = None,
    max_words: int = 30,
    cap_words: Optional[int] = None,
    min_words: int = 3,
    max_image_side: int = 1024,
    local_prompt: Optional[str] = None,
    num_beams: int = 1,
    trust_remote_code: bool = False,
    image_key: str = "image",
    text_key: str = "text",
    id_key: str = "key",
    input_format: Format = None,
    output_format: OutFormat = None,
    resume: bool = False,
    retry_failed: bool = True,
    flush_every: int = 64,
    max_consecutive_failures: int = 200,
    sample: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "auto",
    max_rows: Optional[int] = None,
    progress: bool = True,
) -> Summary:
    """Add a synthetic_caption written from each row's image (step 1 of RWKV-CLIP's description generation).

    Example: python -m rwkv_clip.describe caption --input pairs.csv --base_url http://localhost:8000/v1

    Every row ends with `status` generated | fallback (the answer was empty, a refusal, too short or repeated the
    prompt: synthetic_caption = "") | failed (the image is missing or unreadable, or the request failed after all
    retries: synthetic_caption = ""), a `reason` and `row`, as `describe` writes them; a killed run continues with
    --resume true. A summary is printed and saved as OUTPUT.describe.json.

    Args:
        input: CSV/TSV, JSONL or Parquet file, or a prepared LitData directory, with an image column (a path
            relative to the input file, an absolute path, a data URI or bytes). Other columns are carried along.
        output: New file to write (.jsonl, .csv, .tsv or .parquet). Default: INPUT.captioned.<same suffix>.
            Image bytes (LitData/Parquet input) go to OUTPUT_images/ for CSV/JSONL output.
        backend: "openai" (an OpenAI-compatible server with a vision model: vLLM, llama.cpp server, Ollama; the
            image is sent inline as a base64 data URI) or "transformers" (a local image-to-text model directory:
            BLIP, GIT, Florence-2, VisionEncoderDecoder; needs `pip install 'rwkv-clip[describe]'`).
        base_url: The server, including /v1.
        model: Model name on the server (default: the first one listed by BASE_URL/models), or the local model
            directory for --backend transformers.
        api_key_env: Name of the environment variable holding the API key (never logged).
        concurrency: Requests in flight at once.
        timeout: Seconds to wait for the server on one request.
        max_retries: Retries per row on 429, 5xx, timeouts, connection errors and malformed responses.
        backoff_base: First retry delay in seconds; doubles each retry, with jitter.
        backoff_max: Longest retry delay in seconds.
        temperature: Sampling temperature (server).
        max_tokens: Longest answer in tokens (both backends).
        extra_body: Extra JSON fields for the request body.
        prompt_template: Text file with the instruction sent with each image; placeholders {max_words} and
            optionally {text} (the raw alt-text). Default: the shipped rwkv_clip/describe/caption_prompt.txt.
        system_prompt: System message (null for none).
        max_words: Word limit asked for in the prompt.
        cap_words: Hard cap on the cleaned caption in words (default: max_words + max_words // 4).
        min_words: Shorter captions are rejected (the row falls back to "").
        max_image_side: Images with a longer side are shrunk to it before they are sent (0: never).
        local_prompt: Text a --backend transformers model continues or its task token ("a picture of" for BLIP,
            "<CAPTION>" for Florence-2); default none.
        num_beams: Beam search width for --backend transformers (1: greedy).
        trust_remote_code: Let transformers run code shipped in the model directory (Florence-2 on older
            transformers). Only for directories you trust.
        image_key: Input column with the image.
        text_key: Input column with the raw web text (carried along; {text} in the prompt).
        id_key: Input column with a unique row id.
        input_format: Override the format detected from the input's suffix.
        output_format: Override the format detected from the output's suffix.
        resume: Continue an existing output: keep its finished rows, redo the rest.
        retry_failed: With --resume, retry the rows an earlier run marked failed.
        flush_every: Flush and fsync the output after this many rows (and at least every 5 s).
        max_consecutive_failures: Stop the run (resumable) after this many failed requests in a row; 0 = never.
            Unreadable images do not count.
        sample: Only process this many rows, drawn at random (seeded).
        seed: Seed for --sample.
        batch_size: Images per generate() call for --backend transformers.
        device: Device for --backend transformers ("auto": cuda if available).
        max_rows: Stop after this many new rows (a trial run; continue with --resume true).
        progress: Show a progress bar (rows/s, ETA).
    """
    _check_counts(concurrency=concurrency, flush_every=flush_every, max_words=max_words, min_words=min_words,
                  batch_size=batch_size, max_retries=max_retries, max_consecutive_failures=max_consecutive_failures,
                  sample=sample)
    reader = _reader(input, image_key, text_key, id_key, input_format, max_image_side)
    paths = OutputPaths.choose(input, reader.fmt, output, output_format, None, name="captioned")
    paths.check_fresh_or_resumable(resume)
    template = PromptTemplate.from_file(prompt_template, max_words, default="caption_prompt.txt", image=True)

    def make_stage() -> Stage:
        b = _captioner(backend, base_url, model, api_key_env, timeout, max_retries, backoff_base, backoff_max,
                       temperature, max_tokens, extra_body, concurrency, batch_size, device, local_prompt, num_beams,
                       trust_remote_code)
        return CaptionStage(b, template, system_prompt, cap_words or max_words + max_words // 4, min_words,
                            max_image_side)

    summary, _ = run_step(reader, paths, make_stage, step="caption", resume=resume, retry_failed=retry_failed,
                          flush_every=flush_every, max_consecutive_failures=max_consecutive_failures, sample=sample,
                          seed=seed, max_rows=max_rows, progress=progress, server=_server(backend, base_url))
    print(summary.format(), flush=True)
    return summary


def _server(backend: str, base_url: str) -> str:
    return f"the server at {base_url}" if backend == "openai" else "the model"


def tags(
    input: str,
    output: Optional[str] = None,
    tagger: Literal["clip", "openai"] = "clip",
    model: Optional[str] = None,
    vocabulary: Optional[str] = None,
    top_k: int = 5,
    threshold: float = 0.05,
    tag_templates: list[str] = ["a photo of a {}."],
    tokenizer: Optional[str] = None,
    base_url: str = "http://localhost:8000/v1",
    api_key_env: str = "OPENAI_API_KEY",
    concurrency: int = 16,
    timeout: float = 120.0,
    max_retries: int = 5,
    backoff_base: float = 1.0,
    backoff_max: float = 60.0,
    temperature: float = 0.0,
    max_tokens: int = 96,
    extra_body: Optional[dict] = None,
    prompt_template: Optional[str] = None,
    system_prompt: Optional[str] = None,
    max_image_side: int = 1024,
    image_key: str = "image",
    text_key: str = "text",
    id_key: str = "key",
    input_format: Format = None,
    output_format: OutFormat = None,
    resume: bool = False,
    retry_failed: bool = True,
    flush_every: int = 64,
    max_consecutive_failures: int = 200,
    sample: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "auto",
    max_rows: Optional[int] = None,
    progress: bool = True,
) -> Summary:
    """Add tags listing the objects in each row's image (step 2 of RWKV-CLIP's description generation).

    Example: python -m rwkv_clip.describe tags --input pairs.csv --model model.ckpt --vocabulary tags.txt

    Tags are written "dog, ball, grass", most likely first. Every row ends with `status` generated | fallback (no
    tag in the answer, or none above --threshold: tags = "") | failed (the image is missing or unreadable, or the
    request failed: tags = ""), a `reason` and `row`; --resume true continues a killed run.

    Args:
        input: CSV/TSV, JSONL or Parquet file, or a prepared LitData directory, with an image column.
        output: New file to write. Default: INPUT.tagged.<same suffix>.
        tagger: "clip" (zero-shot over --vocabulary with a CLIP model: a checkpoint of this project or a released
            RWKV-CLIP file) or "openai" (a vision model on an OpenAI-compatible server, asked for the objects).
        model: The CLIP checkpoint for --tagger clip; the model name on the server for --tagger openai (default:
            the first one listed).
        vocabulary: For --tagger clip: a text file with one tag per line (# starts a comment).
        top_k: Keep at most this many tags per image.
        threshold: --tagger clip: keep only tags whose probability (softmax over the vocabulary) is at least this.
        tag_templates: --tagger clip: prompts for each tag ({} is the tag); their text embeddings are averaged.
        tokenizer: --tagger clip: a tokenizer for the model when its checkpoint names none (tokenizer.json,
            CLIP's merges file, or "clip").
        base_url: --tagger openai: the server, including /v1.
        api_key_env: Name of the environment variable holding the API key (never logged).
        concurrency: Requests in flight at once (--tagger openai).
        timeout: Seconds to wait for the server on one request.
        max_retries: Retries per row on 429, 5xx, timeouts, connection errors and malformed responses.
        backoff_base: First retry delay in seconds; doubles each retry, with jitter.
        backoff_max: Longest retry delay in seconds.
        temperature: Sampling temperature (server).
        max_tokens: Longest answer in tokens (server).
        extra_body: Extra JSON fields for the request body.
        prompt_template: --tagger openai: text file with the instruction sent with each image; placeholders
            {max_words} (set to --top_k) and optionally {text}. Default: rwkv_clip/describe/tags_prompt.txt.
        system_prompt: System message (null for none).
        max_image_side: Images with a longer side are shrunk to it before they are sent (0: never).
        image_key: Input column with the image.
        text_key: Input column with the raw web text (carried along).
        id_key: Input column with a unique row id.
        input_format: Override the format detected from the input's suffix.
        output_format: Override the format detected from the output's suffix.
        resume: Continue an existing output: keep its finished rows, redo the rest.
        retry_failed: With --resume, retry the rows an earlier run marked failed.
        flush_every: Flush and fsync the output after this many rows (and at least every 5 s).
        max_consecutive_failures: Stop the run (resumable) after this many failed requests in a row; 0 = never.
        sample: Only process this many rows, drawn at random (seeded).
        seed: Seed for --sample.
        batch_size: Images per forward pass for --tagger clip.
        device: Device for --tagger clip ("auto": cuda if available).
        max_rows: Stop after this many new rows (continue with --resume true).
        progress: Show a progress bar (rows/s, ETA).
    """
    _check_counts(concurrency=concurrency, flush_every=flush_every, top_k=top_k, batch_size=batch_size,
                  max_retries=max_retries, max_consecutive_failures=max_consecutive_failures,
                  sample=sample)
    reader = _reader(input, image_key, text_key, id_key, input_format, max_image_side)
    paths = OutputPaths.choose(input, reader.fmt, output, output_format, None, name="tagged")
    paths.check_fresh_or_resumable(resume)
    template = PromptTemplate.from_file(prompt_template, top_k, default="tags_prompt.txt", image=True)

    def make_stage() -> Stage:
        b = _tagger(tagger, model, vocabulary, top_k, threshold, tag_templates, tokenizer, base_url, api_key_env,
                    timeout, max_retries, backoff_base, backoff_max, temperature, max_tokens, extra_body, concurrency,
                    batch_size, device)
        return TagStage(b, template, system_prompt, top_k, max_image_side)

    summary, _ = run_step(reader, paths, make_stage, step="tags", resume=resume, retry_failed=retry_failed,
                          flush_every=flush_every, max_consecutive_failures=max_consecutive_failures, sample=sample,
                          seed=seed, max_rows=max_rows, progress=progress,
                          server=_server("openai" if tagger == "openai" else "clip", base_url))
    print(summary.format(), flush=True)
    return summary


# ------------------------------------------------------------------------------------------------- all three

STEPS = ("caption", "tags", "describe")


@dataclass
class PipelineSummary:
    """The summaries of the steps ``describe all`` ran, in order."""

    output: str
    steps: dict = field(default_factory=dict)  # step -> Summary
    stopped: Optional[str] = None

    @property
    def complete(self) -> bool:
        return len(self.steps) == len(STEPS) and all(s.complete for s in self.steps.values())

    @property
    def ok(self) -> bool:
        """Every step is done for every row and no row failed in any step (exit status 0)."""
        return self.complete and not any(s.failed for s in self.steps.values())

    def format(self) -> str:
        lines = [f"describe all -> {self.output}"]
        for step in STEPS:
            s = self.steps.get(step)
            if s is None:
                lines.append(f"  {step:9s} not run")
                continue
            lines.append(f"  {step:9s} rows {s.total}: generated {s.generated} | fallback {s.fallback} | failed "
                         f"{s.failed} | not done {s.total - s.generated - s.fallback - s.failed}; this run "
                         f"{s.processed} rows in {s.elapsed:.1f} s ({s.rows_per_s:.1f} rows/s)")
            for r, k, reason in s.failed_rows[:3]:
                lines.append(f"    failed row {r}" + (f" (key {k})" if k else "") + f": {reason}")
            if s.failed > 3:
                lines.append(f"    ... {s.failed} failed rows in all: see {s.output}.describe.json")
        if self.stopped:
            lines.append(f"  STOPPED EARLY: {self.stopped}. Rerun with --resume true to continue.")
        return "\n".join(lines)


def _statuses(journal: str, n: int) -> bytearray:
    """Per input row, 1 + the STATUSES index of a finished step's record (0: no record)."""
    codes = bytearray(n)
    for row in Table(journal, "jsonl"):
        if row.values is not None and row.values.get("status") in STATUSES:
            codes[int(row.values["row"])] = STATUSES.index(row.values["status"]) + 1
    return codes


def _stale(upstream: dict[str, bytearray]):
    """``stale(record)``: the record was made from an upstream status that has changed since (a failed caption
    that a resume then wrote): the step redoes that row."""
    def stale(record: dict) -> bool:
        try:
            i = int(record["row"])
        except (KeyError, TypeError, ValueError):
            return False
        for step, codes in upstream.items():
            now = STATUSES[codes[i] - 1] if 0 <= i < len(codes) and codes[i] else ""
            if record.get(f"{step}_status", now) != now:
                return True
        return False
    return stale


def describe_all(
    input: str,
    output: Optional[str] = None,
    base_url: str = "http://localhost:8000/v1",
    model: Optional[str] = None,
    api_key_env: str = "OPENAI_API_KEY",
    caption_backend: Literal["openai", "transformers"] = "openai",
    caption_model: Optional[str] = None,
    caption_base_url: Optional[str] = None,
    caption_prompt_template: Optional[str] = None,
    caption_max_words: int = 30,
    local_prompt: Optional[str] = None,
    tagger: Literal["clip", "openai"] = "clip",
    tag_model: Optional[str] = None,
    tag_base_url: Optional[str] = None,
    tag_tokenizer: Optional[str] = None,
    vocabulary: Optional[str] = None,
    top_k: int = 5,
    threshold: float = 0.05,
    tag_templates: list[str] = ["a photo of a {}."],
    tags_prompt_template: Optional[str] = None,
    prompt_template: Optional[str] = None,
    system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT,
    max_words: int = 40,
    concurrency: int = 16,
    timeout: float = 120.0,
    max_retries: int = 5,
    backoff_base: float = 1.0,
    backoff_max: float = 60.0,
    max_image_side: int = 1024,
    image_key: str = "image",
    text_key: str = "text",
    id_key: str = "key",
    input_format: Format = None,
    output_format: OutFormat = None,
    resume: bool = False,
    retry_failed: bool = True,
    flush_every: int = 64,
    max_consecutive_failures: int = 200,
    sample: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "auto",
    max_rows: Optional[int] = None,
    progress: bool = True,
) -> PipelineSummary:
    """Caption, tag and describe every image-alt-text pair in one resumable run: the three texts RWKV-CLIP trains on.

    Example: python -m rwkv_clip.describe all --input pairs.csv --base_url http://localhost:8000/v1
    --tag_model model.ckpt --vocabulary tags.txt --output pairs.described.parquet, then
    python -m rwkv_clip.datamodules.prepare --input pairs.described.parquet ...

    The steps run one after the other, each over all rows: caption (writes synthetic_caption), tags (tags),
    describe (generated_caption from the three). Steps 1 and 2 write OUTPUT.steps/caption.jsonl and tags.jsonl
    (keep the folder: --resume continues from it, and image bytes from LitData/Parquet input are saved in it);
    the last writes OUTPUT. Each row of OUTPUT carries every step's outcome: caption_status, caption_reason,
    tags_status, tags_reason, and status, reason for the description (generated | fallback | failed). A row whose
    image cannot be read is kept, failed in steps 1 and 2, and described from its raw text. A rerun with --resume
    true continues whichever step was cut, and redoes later steps' rows whose caption or tags changed since.

    Args:
        input: CSV/TSV, JSONL or Parquet file, or a prepared LitData directory, with an image column and
            optionally the raw text.
        output: New file to write (.jsonl, .csv, .tsv or .parquet). Default: INPUT.described.<same suffix>.
        base_url: OpenAI-compatible server for the description (and, unless overridden, for the vision steps).
        model: LLM on the server for the description (default: the first one listed).
        api_key_env: Name of the environment variable holding the API key (never logged).
        caption_backend: "openai" (a vision model on a server) or "transformers" (a local model directory).
        caption_model: Vision model name on the server, or the local model directory.
        caption_base_url: Server for captions (default: --base_url).
        caption_prompt_template: Caption instruction file (default: rwkv_clip/describe/caption_prompt.txt).
        caption_max_words: Word limit of the captions.
        local_prompt: Prefix or task token for a transformers captioner (see `caption --help`).
        tagger: "clip" (zero-shot over --vocabulary) or "openai" (a vision model on a server).
        tag_model: The CLIP checkpoint (--tagger clip) or the vision model name on the server (--tagger openai).
        tag_base_url: Server for tags (default: --caption_base_url, else --base_url).
        tag_tokenizer: --tagger clip: a tokenizer for a checkpoint that names none (see `tags --help`).
        vocabulary: --tagger clip: one tag per line.
        top_k: At most this many tags per image.
        threshold: --tagger clip: least probability of a kept tag.
        tag_templates: --tagger clip: prompts for each tag ({} is the tag).
        tags_prompt_template: --tagger openai: instruction file (default: rwkv_clip/describe/tags_prompt.txt).
        prompt_template: Description prompt (default: rwkv_clip/describe/prompt.txt).
        system_prompt: System message for the description.
        max_words: Word limit of the descriptions.
        concurrency: Requests in flight at once (server steps).
        timeout: Seconds to wait for a server on one request.
        max_retries: Retries per row on 429, 5xx, timeouts, connection errors and malformed responses.
        backoff_base: First retry delay in seconds; doubles each retry, with jitter.
        backoff_max: Longest retry delay in seconds.
        max_image_side: Images with a longer side are shrunk to it before they are sent (0: never).
        image_key: Input column with the image.
        text_key: Input column with the raw web text.
        id_key: Input column with a unique row id.
        input_format: Override the format detected from the input's suffix.
        output_format: Override the format detected from the output's suffix.
        resume: Continue an earlier run of the same command.
        retry_failed: With --resume, retry the rows an earlier run marked failed (in every step).
        flush_every: Flush and fsync each output after this many rows.
        max_consecutive_failures: Stop (resumable) after this many failed requests in a row; 0 = never.
        sample: Only process this many rows, drawn at random (seeded).
        seed: Seed for --sample.
        batch_size: Images per batch for local models (transformers captioner, CLIP tagger).
        device: Device for local models ("auto": cuda if available).
        max_rows: Stop step 1 after this many new rows (a trial run; continue with --resume true).
        progress: Show a progress bar per step (rows/s, ETA).
    """
    from rwkv_clip.describe.record import OutputPaths as Paths

    _check_counts(concurrency=concurrency, flush_every=flush_every, max_words=max_words, top_k=top_k,
                  caption_max_words=caption_max_words, batch_size=batch_size, max_retries=max_retries,
                  max_consecutive_failures=max_consecutive_failures, sample=sample)
    reader = _reader(input, image_key, text_key, id_key, input_format, max_image_side)
    final = Paths.choose(input, reader.fmt, output, output_format, None, name="described")
    steps_dir = Path(final.path + ".steps")
    step_paths = {s: Paths.choose(input, reader.fmt, str(steps_dir / f"{s}.jsonl"), "jsonl", None)
                  for s in STEPS[:2]}
    step_paths["describe"] = final
    for p in step_paths.values():
        p.check_fresh_or_resumable(resume)
    caption_template = PromptTemplate.from_file(caption_prompt_template, caption_max_words,
                                                default="caption_prompt.txt", image=True)
    tags_template = PromptTemplate.from_file(tags_prompt_template, top_k, default="tags_prompt.txt", image=True)
    template = PromptTemplate.from_file(prompt_template, max_words)
    caption_url = caption_base_url or base_url
    tag_url = tag_base_url or caption_url
    server = dict(api_key_env=api_key_env, timeout=timeout, max_retries=max_retries, backoff_base=backoff_base,
                  backoff_max=backoff_max, extra_body=None, concurrency=concurrency, batch_size=batch_size,
                  device=device)
    run = dict(retry_failed=retry_failed, flush_every=flush_every, max_consecutive_failures=max_consecutive_failures,
               progress=progress)
    summary = PipelineSummary(output=final.path)
    n = len(reader)

    def step(name: str, reader_: RowReader, make_stage, server_desc: str, **kw) -> bool:
        s, _ = run_step(reader_, step_paths[name], make_stage, step=name, server=server_desc,
                        resume=resume, **run, **kw)
        summary.steps[name] = s
        if not s.complete:
            summary.stopped = f"step {name}: {s.stopped or 'not every row done'}"
        return s.complete

    try:
        ok = step("caption", reader, lambda: CaptionStage(
            _captioner(caption_backend, caption_url, caption_model, temperature=0.2, max_tokens=96,
                       local_prompt=local_prompt, num_beams=1, trust_remote_code=False, **server),
            caption_template, None, caption_max_words + caption_max_words // 4, 3, max_image_side),
            _server(caption_backend, caption_url), sample=sample, seed=seed, max_rows=max_rows)
        caption_codes = _statuses(step_paths["caption"].journal, n) if ok else None
        ok = ok and step("tags", StepReader(step_paths["caption"].journal, n, "caption"), lambda: TagStage(
            _tagger(tagger, tag_model, vocabulary, top_k, threshold, tag_templates, tag_tokenizer, tag_url,
                    temperature=0.0, max_tokens=96, **server),
            tags_template, None, top_k, max_image_side),
            _server("openai" if tagger == "openai" else "clip", tag_url), sample=None, seed=seed, max_rows=None,
            stale=_stale({"caption": caption_codes}))
        tag_codes = _statuses(step_paths["tags"].journal, n) if ok else None
        ok = ok and step("describe", StepReader(step_paths["tags"].journal, n, "tags"), lambda: RewriteStage(
            _backend("openai", base_url, model, temperature=0.2, max_tokens=128, **server),
            template, system_prompt, max_words + max_words // 4, 3),
            f"the server at {base_url}", sample=None, seed=seed, max_rows=None,
            stale=_stale({"caption": caption_codes, "tags": tag_codes}))
    finally:
        print(summary.format(), flush=True)
    return summary
