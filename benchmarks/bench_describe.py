"""Description generation throughput: concurrency 16 vs 1 against a loopback chat server adding 50 ms a request.

    python benchmarks/bench_describe.py [--delay 0.05] [--rows1 40] [--rows16 480]

Target: >= 8x the rows/s at concurrency 16 (ideal 16x: requests overlap fully, the client's own work is small).
"""

import argparse
import contextlib
import io
import json
import logging
import tempfile
import time
from pathlib import Path

from rwkv_clip.describe import describe
from rwkv_clip.describe.testing import MockChatServer


def run(server: MockChatServer, folder: Path, rows: int, concurrency: int) -> float:
    inp = folder / f"in_{concurrency}.jsonl"
    inp.write_text("".join(json.dumps({"text": f"raw text {i}", "synthetic_caption": f"a caption {i}",
                                       "tags": "dog, ball"}) + "\n" for i in range(rows)))
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the run's summary
        s = describe(str(inp), str(folder / f"out_{concurrency}.jsonl"), base_url=server.url, model="mock-model",
                     concurrency=concurrency, progress=False)
    dt = time.perf_counter() - t
    assert s.complete and s.generated == rows, s.format()
    return rows / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay", type=float, default=0.05, help="seconds the server adds to every request")
    ap.add_argument("--rows1", type=int, default=40, help="rows for the concurrency-1 run")
    ap.add_argument("--rows16", type=int, default=480, help="rows for the concurrency-16 run")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with MockChatServer(delay=a.delay) as server, tempfile.TemporaryDirectory() as tmp:
        r1 = run(server, Path(tmp), a.rows1, 1)
        r16 = run(server, Path(tmp), a.rows16, 16)
    ratio = r16 / r1
    print(f"server delay {a.delay * 1000:.0f} ms/request")
    print(f"concurrency  1: {r1:7.1f} rows/s ({a.rows1} rows)")
    print(f"concurrency 16: {r16:7.1f} rows/s ({a.rows16} rows)")
    print(f"ratio: {ratio:.1f}x (target >= 8x: {'ok' if ratio >= 8 else 'MISSED'})")


if __name__ == "__main__":
    main()
