"""Backends that turn chat messages into answers.

`OpenAIChatClient` speaks the OpenAI chat-completions protocol (POST {base_url}/chat/completions), which vLLM,
llama.cpp server, Ollama, TGI and hosted APIs all serve. Stdlib only: one keep-alive http.client connection per
worker thread, retries with exponential backoff and jitter on 429, 5xx, timeouts, dropped connections and
malformed responses. The API key is only ever placed in the Authorization header and is redacted from every
error message this module produces (from the whole server reply, before it is cut short for the message).
``abort()`` stops a run at once: requests in flight are cut off instead of waiting for their timeout.

`TransformersBackend` runs a local causal LM from a directory (transformers imported lazily).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import random
import socket
import ssl
import threading
from collections import Counter
from typing import TYPE_CHECKING, Optional
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from rwkv_clip.describe.vision import LoadedImage

log = logging.getLogger("rwkv_clip.describe")


class RequestFailed(Exception):
    """This row's request failed for good (retries exhausted, or a non-retryable 4xx). The row is marked failed."""


class FatalBackendError(RuntimeError):
    """Every row would fail the same way (bad API key, wrong URL or model): stop the run instead."""


class _Retryable(Exception):
    def __init__(self, reason: str, kind: str, retry_after: Optional[float] = None):
        super().__init__(reason)
        self.reason, self.kind, self.retry_after = reason, kind, retry_after


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random = random,
                  retry_after: Optional[float] = None) -> float:
    """Delay before retry number `attempt` (0-based): base * 2**attempt capped at `cap`, times a jitter in
    [0.5, 1] ("equal jitter": spreads clients apart yet keeps the delay growing). A server's Retry-After
    (seconds) is honoured when longer, up to `cap`."""
    d = min(cap, base * (2 ** attempt)) * (0.5 + 0.5 * rng.random())
    if retry_after is not None and retry_after > d:
        d = min(cap, retry_after)
    return d


class Backend:
    """Interface used by the runner: `complete_batch(list of message lists) -> list of answer strings`.
    The runner keeps `concurrency` calls in flight, each with up to `batch_size` rows."""

    batch_size: int = 1
    concurrency: int = 1

    def complete(self, messages: list[dict]) -> str:
        raise NotImplementedError

    def complete_batch(self, batch: list[list[dict]]) -> list[str]:
        return [self.complete(m) for m in batch]

    def look(self, batch: list[tuple[Optional[str], str, "LoadedImage"]]) -> list[str]:
        """Answers about images: one per ``(system prompt or None, user prompt, image)``. A chat backend gets the
        image inline, as OpenAI-compatible vision servers take it (a base64 data URI in an ``image_url`` part);
        local vision models (``rwkv_clip.describe.vision``) override this."""
        return self.complete_batch([image_messages(system, prompt, image) for system, prompt, image in batch])

    def redact(self, s: str) -> str:
        return s

    def abort(self) -> None:
        """Stop what is in flight as soon as possible (Ctrl-C, or the run stopped)."""

    def close(self) -> None:
        pass


def image_messages(system: Optional[str], prompt: str, image: "LoadedImage") -> list[dict]:
    """Chat messages asking ``prompt`` about ``image``: the image first, then the text (the order llava-style
    models were trained with)."""
    content = [{"type": "image_url", "image_url": {"url": image.data_uri()}}, {"type": "text", "text": prompt}]
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]


class OpenAIChatClient(Backend):
    def __init__(self, base_url: str, model: Optional[str] = None, api_key: Optional[str] = None,
                 timeout: float = 60.0, max_retries: int = 5, backoff_base: float = 1.0, backoff_max: float = 60.0,
                 temperature: float = 0.2, max_tokens: int = 128, extra_body: Optional[dict] = None,
                 concurrency: int = 32, stop_event: Optional[threading.Event] = None,
                 api_key_env: str = "OPENAI_API_KEY"):
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"--base_url {base_url!r} must look like http://localhost:8000/v1")
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError("concurrency must be >= 1, max_retries >= 0 and timeout > 0")
        self.base_url = base_url.rstrip("/")
        self._scheme, self._host = u.scheme, u.hostname
        self._port = u.port or (443 if u.scheme == "https" else 80)
        self._prefix = u.path.rstrip("/")
        self._api_key = api_key or None
        self._api_key_env = api_key_env
        self.timeout, self.max_retries = timeout, max_retries
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self.temperature, self.max_tokens = temperature, max_tokens
        self.extra_body = dict(extra_body or {})
        self.concurrency = concurrency
        self.stop_event = stop_event or threading.Event()
        self._local = threading.local()
        self._conns: set = set()  # every thread's open connection, so abort() can cut them off
        self._rng = random.Random()
        self._lock = threading.Lock()
        self.retries: Counter = Counter()  # kind -> count
        self.requests = 0
        self.model = model or self.detect_model()

    # -------------------------------------------------------------------------------------- plumbing
    def redact(self, s: str) -> str:
        if self._api_key:
            s = s.replace(self._api_key, "***")
        return s

    def _headers(self) -> dict:
        h = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "rwkv-clip-describe"}
        if self._api_key:
            h["Authorization"] = f"Bearer {self._api_key}"
        return h

    def _conn(self) -> tuple[http.client.HTTPConnection, bool]:
        c = getattr(self._local, "conn", None)
        if c is not None:
            return c, True
        if self._scheme == "https":
            c = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout,
                                            context=ssl.create_default_context())
        else:
            c = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        self._local.conn = c
        with self._lock:
            self._conns.add(c)
        return c, False

    def _drop_conn(self) -> None:
        c = getattr(self._local, "conn", None)
        self._local.conn = None
        if c is not None:
            with self._lock:
                self._conns.discard(c)
            with contextlib.suppress(Exception):
                c.close()

    def abort(self) -> None:
        """No request or retry starts any more, and the sockets of the requests in flight are shut down, so their
        threads return now instead of after the timeout."""
        self.stop_event.set()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            sock = getattr(c, "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _request(self, method: str, path: str, body: Optional[bytes]) -> tuple[int, dict, bytes]:
        """One HTTP exchange on this thread's keep-alive connection -> (status, headers, body)."""
        for fresh_try in range(2):
            if self.stop_event.is_set():
                raise RequestFailed("aborted")
            conn, reused = self._conn()
            try:
                conn.request(method, self._prefix + path, body=body, headers=self._headers())
                resp = conn.getresponse()
                data = resp.read()
            except (socket.timeout, TimeoutError) as e:
                self._drop_conn()
                raise _Retryable(f"timeout after {self.timeout:g} s", "timeout") from e
            except (OSError, http.client.HTTPException) as e:
                self._drop_conn()
                if self.stop_event.is_set():
                    raise RequestFailed("aborted") from None
                # A kept-alive connection the server closed while idle: reconnect once without counting a retry.
                if reused and fresh_try == 0 and isinstance(e, (http.client.RemoteDisconnected, ConnectionResetError,
                                                                BrokenPipeError, http.client.CannotSendRequest)):
                    continue
                raise _Retryable(self.redact(f"connection error: {type(e).__name__}: {e}"), "connection") from e
            if resp.will_close:
                self._drop_conn()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        raise AssertionError("unreachable")

    def _snippet(self, data: bytes, limit: int = 300) -> str:
        """The start of a server reply for a message: the key is removed from the whole reply first, so cutting
        it short can never leave part of the key behind."""
        if self._api_key:
            data = data.replace(self._api_key.encode("utf-8"), b"***")
        return self.redact(" ".join(data.decode("utf-8", "replace").split())[:limit])

    def _check_status(self, status: int, headers: dict, data: bytes) -> None:
        if 200 <= status < 300:
            return
        msg = f"HTTP {status}: {self._snippet(data)}"
        if status == 429 or status >= 500 or status == 408:
            ra = headers.get("retry-after")
            try:
                ra = float(ra) if ra is not None else None
            except ValueError:
                ra = None
            raise _Retryable(msg, "429" if status == 429 else "5xx", ra)
        if status in (401, 403):
            raise FatalBackendError(f"{msg} from {self.base_url}; check the API key in ${self._api_key_env}")
        if status == 404:
            raise FatalBackendError(f"{msg} from {self.base_url}; check --base_url (it usually ends in /v1) "
                                    f"and --model {self.model!r}")
        raise RequestFailed(msg)

    def _with_retries(self, fn):
        last = None
        for attempt in range(self.max_retries + 1):
            if self.stop_event.is_set():
                raise RequestFailed("aborted")
            try:
                with self._lock:
                    self.requests += 1
                return fn()
            except _Retryable as e:
                last = e
                if attempt == self.max_retries:
                    break
                with self._lock:
                    self.retries[e.kind] += 1
                delay = backoff_delay(attempt, self.backoff_base, self.backoff_max, self._rng, e.retry_after)
                log.debug("retry %d in %.2fs: %s", attempt + 1, delay, e.reason)
                if self.stop_event.wait(delay):
                    raise RequestFailed("aborted")
        raise RequestFailed(f"{last.reason} (after {self.max_retries + 1} attempts)")

    # -------------------------------------------------------------------------------------- API
    def detect_model(self) -> str:
        """GET {base_url}/models and use the first model served (vLLM, llama.cpp and Ollama serve this)."""
        def once():
            status, headers, data = self._request("GET", "/models", None)
            self._check_status(status, headers, data)
            try:
                models = [m["id"] for m in json.loads(data)["data"]]
            except (ValueError, KeyError, TypeError) as e:
                raise _Retryable(f"malformed /models response: {self._snippet(data)}", "bad response") from e
            if not models:
                raise FatalBackendError(f"{self.base_url}/models lists no model; pass --model")
            return models
        self.model = "?"
        try:
            models = self._with_retries(once)
        except (RequestFailed, FatalBackendError) as e:
            raise FatalBackendError(f"could not list the models at {self.base_url}/models ({e}); "
                                    "pass --model") from None
        if len(models) > 1:
            log.warning("server serves %d models; using %r (pass --model to choose)", len(models), models[0])
        log.info("using model %r from %s/models", models[0], self.base_url)
        return models[0]

    def complete(self, messages: list[dict]) -> str:
        payload = {"model": self.model, "messages": messages, "temperature": self.temperature,
                   "max_tokens": self.max_tokens, **self.extra_body}
        body = json.dumps(payload).encode("utf-8")

        def once():
            status, headers, data = self._request("POST", "/chat/completions", body)
            self._check_status(status, headers, data)
            try:
                msg = json.loads(data)["choices"][0]["message"]
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise _Retryable(f"malformed response: {self._snippet(data)!r}", "bad response") from e
            content = msg.get("content") if isinstance(msg, dict) else None
            return content if isinstance(content, str) else ""

        return self._with_retries(once)

    def close(self) -> None:
        self._drop_conn()


class TransformersBackend(Backend):
    """A local causal LM (`transformers` AutoModelForCausalLM) from a directory, batched greedy/sampled decoding.
    For machines without a server; a vLLM server is much faster on the same GPU."""

    def __init__(self, model_dir: str, batch_size: int = 8, max_new_tokens: int = 128, temperature: float = 0.0,
                 device: str = "auto"):
        from pathlib import Path
        if not Path(model_dir).is_dir():
            raise ValueError(f"--model {model_dir!r} must be a local model directory for --backend transformers")
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise ImportError("--backend transformers needs the `transformers` package: pip install transformers "
                              "(or serve the model with vLLM and use the default openai backend)") from e
        self.torch = torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left", local_files_only=True)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype, local_files_only=True)
        self.model.to(device).eval()
        self.batch_size, self.concurrency = batch_size, 1  # one GPU: batch inside one worker
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.model_name = model_dir

    def _text(self, messages: list[dict]) -> str:
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in messages) + "\n\nDescription:"

    def complete_batch(self, batch: list[list[dict]]) -> list[str]:
        torch = self.torch
        texts = [self._text(m) for m in batch]
        enc = self.tok(texts, return_tensors="pt", padding=True,
                       add_special_tokens=not getattr(self.tok, "chat_template", None)).to(self.device)
        kw = dict(max_new_tokens=self.max_new_tokens, pad_token_id=self.tok.pad_token_id)
        if self.temperature > 0:
            kw.update(do_sample=True, temperature=self.temperature)
        else:
            kw.update(do_sample=False)
        with torch.inference_mode():
            out = self.model.generate(**enc, **kw)
        return self.tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
