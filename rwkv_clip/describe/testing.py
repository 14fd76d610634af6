"""A real OpenAI-compatible chat-completions server on 127.0.0.1, for tests, benchmarks and dry runs.

It answers deterministically (the answer is derived from a hash of the user message) and misbehaves on cue:
a marker `[[ACTION]]` or `[[ACTIONxN]]` anywhere in the user message (e.g. in the row's text) applies ACTION to
every request for that message, or only to the first N of them, after which it answers normally. Images sent
inline (vision requests) are decoded and answered from (see :func:`mock_answer`); a marker may also sit inside an
image file's bytes (e.g. a PNG text chunk), to make one image's requests misbehave.

ACTION: 500 | 503 | 429 (with Retry-After: 0) | 400 (echoes the Authorization header after `echo_prefix` filler
characters, to test redaction wherever the key falls in the body) |
hang (sleeps `hang_seconds` before answering) | drop (closes the connection without an answer) |
badjson (200 with a truncated body) | nochoices (200, JSON without choices) | refuse | empty | echo (answers
with the prompt) | prefix ('Here is the description: "..."') | long (a 300-word answer).
`server.force = "500"` makes every chat request fail that way until reset to None.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional, Sequence

_MARK = re.compile(r"\[\[([a-z0-9]+?)(?:x(\d+))?\]\]")


def mock_answer(content: str, images: Sequence[bytes] = ()) -> str:
    """The answer the mock server gives to a well-behaved request with this user message (its text) and images.
    With an image it answers like a vision model that looked at it: the colour of the image's mean pixel, an id
    of the request, and the size ("red object, mock photo 1a2b3c4d5e, 64x64 pixels")."""
    h = hashlib.sha1(content.encode("utf-8") + b"".join(hashlib.sha1(b).digest() for b in images)).hexdigest()[:10]
    if not images:
        return f"A mock photo {h} of the scene described in the row."
    from PIL import Image, ImageStat

    with Image.open(io.BytesIO(images[0])) as im:
        rgb = im.convert("RGB")
    r, g, b = ImageStat.Stat(rgb).mean
    colour = "gray" if max(r, g, b) - min(r, g, b) < 40 else \
        "yellow" if min(r, g) > 1.6 * b else ("red", "green", "blue")[(r, g, b).index(max(r, g, b))]
    return f"{colour} object, mock photo {h}, {rgb.width}x{rgb.height} pixels"


def request_text(content) -> tuple[str, list[bytes]]:
    """The text of a user message and the bytes of its inline images (OpenAI "content parts": text and
    image_url with a base64 data URI). Raises ValueError for an image that is not a base64 data URI."""
    if isinstance(content, str):
        return content, []
    texts, images = [], []
    for part in content:
        if part.get("type") == "text":
            texts.append(part["text"])
        elif part.get("type") == "image_url":
            url = part["image_url"]["url"]
            head, _, payload = url.partition(",")
            if not (head.startswith("data:image/") and head.endswith(";base64")):
                raise ValueError(f"not a base64 image data URI: {url[:40]!r}")
            images.append(base64.b64decode(payload, validate=True))
        else:
            raise ValueError(f"unknown content part {part.get('type')!r}")
    return "\n".join(texts), images


class MockChatServer:
    def __init__(self, delay: float = 0.0, api_key: Optional[str] = None, hang_seconds: float = 2.0,
                 model: str = "mock-model", echo_prefix: int = 0):
        self.delay, self.api_key, self.hang_seconds, self.model = delay, api_key, hang_seconds, model
        self.echo_prefix = echo_prefix
        self.force: Optional[str] = None
        self.lock = threading.Lock()
        self.seen: Counter = Counter()       # user message -> requests received
        self.log: list = []                  # (monotonic time, user message, action or "ok", status)
        self.auth_headers: set = set()
        self.images = 0                      # inline images received
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        assert self._httpd is not None, "start() the server first"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> "MockChatServer":
        server = self

        class Handler(_Handler):
            mock = server
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "MockChatServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def requests_for(self, needle: str) -> list:
        """Log entries of the requests whose user message contains `needle`."""
        with self.lock:
            return [e for e in self.log if needle in e[1]]

    def action(self, content: str) -> str:
        with self.lock:
            self.seen[content] += 1
            nth = self.seen[content]
        if self.force:
            return self.force
        m = _MARK.search(content)
        if m is None:
            return "ok"
        act, times = m.group(1), m.group(2)
        return act if times is None or nth <= int(times) else "ok"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real servers
    disable_nagle_algorithm = True  # headers and body go out in two writes: without this, +40 ms (delayed ACK)
    mock: MockChatServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, headers: Optional[dict] = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            self.close_connection = True

    def _json(self, status: int, obj, headers: Optional[dict] = None) -> None:
        self._send(status, json.dumps(obj).encode("utf-8"), headers)

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization")
        with self.mock.lock:
            self.mock.auth_headers.add(auth)
        if self.mock.api_key and auth != f"Bearer {self.mock.api_key}":
            self._json(401, {"error": {"message": "invalid api key"}})
            return False
        return True

    def do_GET(self) -> None:
        if not self._authorized():
            return
        if self.path.rstrip("/").endswith("/models"):
            self._json(200, {"object": "list", "data": [{"id": self.mock.model, "object": "model"}]})
        else:
            self._json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self._authorized():
            return
        if not self.path.endswith("/chat/completions"):
            self._json(404, {"error": {"message": f"no route {self.path}"}})
            return
        try:
            req = json.loads(body)
            content, images = request_text([m["content"] for m in req["messages"] if m["role"] == "user"][-1])
        except (ValueError, KeyError, IndexError, TypeError, binascii.Error):
            self._json(400, {"error": {"message": "bad request body"}})
            return
        text = content
        if images:  # the request is told apart by its images too; a marker may sit in an image's bytes
            content += "".join(f"\n[image {hashlib.sha1(b).hexdigest()[:12]}] "
                               + " ".join(m.group(0) for m in _MARK.finditer(b.decode("latin-1")))
                               for b in images)
            with self.mock.lock:
                self.mock.images += len(images)
        if req.get("model") != self.mock.model:
            self._json(404, {"error": {"message": f"The model `{req.get('model')}` does not exist."}})
            return
        act = self.mock.action(content)
        if self.mock.delay:
            time.sleep(self.mock.delay)
        status = 200
        try:
            answer = mock_answer(text, images)
        except Exception as e:  # a vision server answers 400 to an image it cannot decode
            self._json(400, {"error": {"message": f"cannot read the image: {e}"}})
            return
        if act in ("500", "503"):
            status = int(act)
            self._json(status, {"error": {"message": "internal error"}})
        elif act == "429":
            status = 429
            self._json(429, {"error": {"message": "rate limited"}}, {"Retry-After": "0"})
        elif act == "400":
            status = 400
            self._json(400, {"error": {"message": f"{'~' * self.mock.echo_prefix}bad request; headers were "
                                                  f"Authorization: {self.headers.get('Authorization')}"}})
        elif act == "drop":
            status = 0
            self.close_connection = True
        elif act == "badjson":
            self._send(200, b'{"id": "x", "choices": [{"message": {"content": "A tru')
        elif act == "nochoices":
            self._json(200, {"id": "x", "object": "chat.completion"})
        else:
            if act == "hang":
                time.sleep(self.mock.hang_seconds)
            elif act == "refuse":
                answer = "I'm sorry, but I can't help with describing this image."
            elif act == "empty":
                answer = ""
            elif act == "echo":
                answer = content
            elif act == "prefix":
                answer = f'Here is the description: "{answer}"'
            elif act == "long":
                answer = " ".join(["a bright red kite over the green field"] * 40) + "."
            self._json(200, {"id": "chatcmpl-mock", "object": "chat.completion", "model": self.mock.model,
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": answer}}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        with self.mock.lock:
            self.mock.log.append((time.monotonic(), content, act, status))


def sigkill_when_written(proc: subprocess.Popen, path, lines: int = 10, timeout: float = 90.0) -> None:
    """kill -9 ``proc`` as soon as ``path`` holds ``lines`` lines (a run killed mid-way, for resume tests)."""
    from pathlib import Path

    path = Path(path)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            if path.exists() and path.read_text().count("\n") >= lines:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def serve(delay: float = 0.0) -> None:
    """Run a mock chat-completions server on 127.0.0.1 until Ctrl-C, to try the describe command offline.

    Args:
        delay: Seconds the server adds to every request.
    """
    with MockChatServer(delay=delay) as s:
        print(f"mock server at {s.url} (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(3600)


if __name__ == "__main__":  # python -m rwkv_clip.describe.testing [--delay 0.05]
    import sys

    from rwkv_clip.command import run

    sys.exit(run(serve, prog="python -m rwkv_clip.describe.testing", interrupted="stopped"))
