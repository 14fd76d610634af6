"""Request: ask a model for one field of every row, many rows at a time.

A :class:`Stage` says what to ask for a row and how to judge the answer. The :class:`Runner` does the rest for any
stage: it keeps ``backend.concurrency`` calls of ``backend.batch_size`` rows in flight, hands every finished row to
the recorder, stops after too many failed requests in a row, and on Ctrl-C (or any error) cuts off the requests in
flight at once. Retries with backoff and the redaction of the API key live in the backend (``client.py``).

The three steps of RWKV-CLIP's description generation are three stages served by the same runner, output writer
and resume: :class:`CaptionStage` (``synthetic_caption`` from the image), :class:`TagStage` (``tags``) and
:class:`RewriteStage` (the LLM's ``generated_caption``).
"""

from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from rwkv_clip.describe.client import Backend, FatalBackendError, RequestFailed
from rwkv_clip.describe.prompt import PromptTemplate, check_answer, clean_answer, parse_tag_answer
from rwkv_clip.schema import GENERATED_CAPTION, IMAGE, SYNTHETIC_CAPTION, TAGS, TEXT, format_tags

log = logging.getLogger("rwkv_clip.describe")

STATUSES = ("generated", "fallback", "failed")


@dataclass(frozen=True)
class Outcome:
    """What became of one row's field: ``status`` generated (the model's answer) | fallback (decided without a
    usable answer) | failed (the request failed), the ``value`` written, and why."""

    status: str
    value: str
    reason: str = ""
    prompt: Optional[str] = None  # the request as sent, for instruction data


class Stage:
    """One field of a row, written by a model. Subclasses set ``field`` and ``backend`` and implement
    :meth:`plan` and :meth:`judge`; :meth:`ask` runs in a worker thread."""

    field: str
    backend: Backend

    def plan(self, row: dict[str, Any]) -> Any:
        """The request for this row, or an :class:`Outcome` when the row needs none (it has nothing to ask
        about). Such rows count neither for nor against the run's failure streak."""
        raise NotImplementedError

    def ask(self, requests: list[Any]) -> list[str]:
        """The model's answers, one per request; raises RequestFailed (or any error) when they failed."""
        raise NotImplementedError

    def judge(self, row: dict[str, Any], request: Any, answer: str) -> Outcome:
        raise NotImplementedError

    def failed(self, row: dict[str, Any], request: Any, error: str) -> Outcome:
        return Outcome("failed", "", error, request if isinstance(request, str) else None)


class RewriteStage(Stage):
    """RWKV-CLIP's diverse description: an LLM merges the raw text, the synthetic caption and the tags into one
    ``generated_caption``. Unusable answers (empty, a refusal, an echo of the prompt, too short) fall back to the
    synthetic caption, else the raw text."""

    field = GENERATED_CAPTION

    def __init__(self, backend: Backend, template: PromptTemplate, system_prompt: Optional[str], cap_words: int,
                 min_words: int) -> None:
        self.backend, self.template, self.system_prompt = backend, template, system_prompt
        self.cap_words, self.min_words = cap_words, min_words

    def plan(self, row: dict[str, Any]) -> Any:
        inputs = (row.get(TEXT, ""), row.get(SYNTHETIC_CAPTION, ""), format_tags(row.get(TAGS)))
        if not any(s.strip() for s in inputs):
            return Outcome("fallback", "", "all input texts empty")
        return self.template.render(*inputs)

    def messages(self, prompt: str) -> list[dict]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": prompt}]

    def ask(self, requests: list[str]) -> list[str]:
        return self.backend.complete_batch([self.messages(p) for p in requests])

    def judge(self, row: dict[str, Any], request: str, answer: str) -> Outcome:
        clean = clean_answer(answer, self.cap_words)
        rejected = check_answer(clean, self.template, self.min_words)
        if rejected is None:
            return Outcome("generated", clean, "", request)
        return Outcome("fallback", row.get(SYNTHETIC_CAPTION) or row.get(TEXT) or "", rejected, request)


class ImageStage(Stage):
    """A field written from the row's image. The image is read and decoded here, in the runner's thread: a row
    whose image is missing or unreadable becomes ``failed`` with the reason (it stays in the output, and a resume
    tries it again), without a request and without counting towards the failure streak."""

    def __init__(self, backend: Backend, template: PromptTemplate, system_prompt: Optional[str] = None,
                 max_image_side: int = 0) -> None:
        self.backend, self.template, self.system_prompt = backend, template, system_prompt
        self.max_image_side = max_image_side

    def plan(self, row: dict[str, Any]) -> Any:
        from rwkv_clip.describe.vision import UnreadableImage, load_image

        try:
            image = load_image(row.get(IMAGE), self.max_image_side)
        except UnreadableImage as e:
            return Outcome("failed", "", f"unreadable image: {e}")
        return self.system_prompt, self.template.render(row.get(TEXT, "")), image

    def ask(self, requests: list) -> list[str]:
        return self.backend.look(requests)


class CaptionStage(ImageStage):
    """Step 1 of RWKV-CLIP's description generation: a captioner writes ``synthetic_caption`` from the image.
    Unusable answers (empty, a refusal, an echo of the prompt, too short) fall back to "" with the reason."""

    field = SYNTHETIC_CAPTION

    def __init__(self, backend: Backend, template: PromptTemplate, system_prompt: Optional[str], cap_words: int,
                 min_words: int, max_image_side: int = 0) -> None:
        super().__init__(backend, template, system_prompt, max_image_side)
        self.cap_words, self.min_words = cap_words, min_words

    def judge(self, row: dict[str, Any], request: Any, answer: str) -> Outcome:
        clean = clean_answer(answer, self.cap_words)
        rejected = check_answer(clean, self.template, self.min_words)
        return Outcome("generated", clean) if rejected is None else Outcome("fallback", "", rejected)


class TagStage(ImageStage):
    """Step 2: a tagger lists the objects in the image as ``tags`` ("dog, ball, grass"), at most ``top_k``. An
    answer with no tag in it (a refusal, nothing above the CLIP tagger's threshold) falls back to ""."""

    field = TAGS

    def __init__(self, backend: Backend, template: PromptTemplate, system_prompt: Optional[str], top_k: int,
                 max_image_side: int = 0) -> None:
        super().__init__(backend, template, system_prompt, max_image_side)
        self.top_k = top_k

    def judge(self, row: dict[str, Any], request: Any, answer: str) -> Outcome:
        tags = parse_tag_answer(answer, self.top_k)
        return Outcome("generated", ", ".join(tags)) if tags else Outcome("fallback", "", "no tags in the answer")


class TooManyFailures(RuntimeError):
    """Many requests in a row failed: the server is probably down. The run stops (resumably)."""


class Runner:
    """Runs a stage over rows with ``stage.backend.concurrency`` calls in flight (see the module docstring)."""

    def __init__(self, stage: Stage, max_consecutive_failures: int = 0, server: str = "the server") -> None:
        self.stage, self.max_failures, self.server = stage, max_consecutive_failures, server
        self.streak, self.last_error = 0, ""

    def run(self, rows: Iterable[tuple[int, dict[str, Any]]],
            on_done: Callable[[int, dict[str, Any], Outcome], None]) -> None:
        """Ask for every ``(index, row)`` and call ``on_done(index, row, outcome)`` as each finishes (in
        completion order, in this thread). Rows in flight when it raises are not passed on: a resume redoes them."""
        backend = self.stage.backend
        pool = ThreadPoolExecutor(max_workers=backend.concurrency, thread_name_prefix="describe")
        pending: dict[Future, list] = {}
        max_pending = backend.concurrency * 2  # every worker busy, without reading the whole input ahead

        def drain(max_left: int) -> None:
            while len(pending) > max_left:
                finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for fut in finished:
                    pending.pop(fut)
                    for (idx, row, request), answer, error in fut.result():  # FatalBackendError propagates here
                        self._finish(idx, row, request, answer, error, on_done)

        batch: list = []
        try:
            for idx, row in rows:
                request = self.stage.plan(row)
                if isinstance(request, Outcome):
                    on_done(idx, row, request)
                    continue
                batch.append((idx, row, request))
                if len(batch) >= backend.batch_size:
                    pending[pool.submit(self._ask, batch)] = batch
                    batch = []
                    if len(pending) >= max_pending:
                        drain(max_pending - 1)
            if batch:
                pending[pool.submit(self._ask, batch)] = batch
            drain(0)
        except BaseException:
            backend.abort()  # the requests in flight end now, not at their timeout
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)

    def _ask(self, batch: list) -> list:
        """In a worker thread: only the model call. A failure marks the batch's rows, it never kills the run."""
        redact = self.stage.backend.redact
        try:
            answers = self.stage.ask([request for _, _, request in batch])
        except FatalBackendError:
            raise
        except RequestFailed as e:
            return [(item, None, redact(str(e))) for item in batch]
        except Exception as e:  # a backend bug or an OOM must not end a 15M-row run: mark the rows, go on
            return [(item, None, redact(f"{type(e).__name__}: {e}")) for item in batch]
        return [(item, answer, None) for item, answer in zip(batch, answers)]

    def _finish(self, idx: int, row: dict[str, Any], request: Any, answer: Optional[str], error: Optional[str],
                on_done: Callable[[int, dict[str, Any], Outcome], None]) -> None:
        if error is None:
            outcome = self.stage.judge(row, request, answer or "")
            self.streak = 0
        else:
            outcome = self.stage.failed(row, request, error)
            self.streak, self.last_error = self.streak + 1, error
        on_done(idx, row, outcome)
        if self.max_failures and self.streak >= self.max_failures:
            raise TooManyFailures(f"{self.streak} rows failed in a row (last: {self.last_error}); is {self.server} "
                                  "up? Finished rows are saved")
