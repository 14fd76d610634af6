"""What ``CLIPModule(micro_batch_size=...)`` costs and saves: one training step of the whole batch at once
against the same batch encoded in chunks with cached features (docs/training.md, "Large batches in little memory").

    python benchmarks/bench_micro_batch.py                       # batch 64, chunks of 64, 16 and 8
    python benchmarks/bench_micro_batch.py --batch 128 --micro 128,32

The towers are VisionRWKV (224/32) and TextRWKV (context 77, full-length captions) at width 384, depth 6.
Each setting runs in a fresh subprocess, which builds the model and batch, resets the kernel's peak-RSS
counter, runs one step (forward, loss, backward) and reads ``VmHWM``; "peak MiB" is the rise over the RSS
before the step, so it counts activations and gradients. The time is the median of the timed steps after one
warm-up. The chunked step encodes the batch twice (once without grad), so expect about 4/3 of the time; in
exchange its activation memory is that of one chunk, and its loss and gradients are the whole batch's
(asserted in tests/test_module.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(spec: dict) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_backbones import _reset_peak, _rss_kib
    from rwkv_clip.backbones import create_tower
    from rwkv_clip.module import CLIPModule

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    w, d, B = spec["width"], spec["depth"], spec["batch"]
    model = CLIPModule(
        create_tower("vision_rwkv_b32", width=w, depth=d, head_size=64, drop_path_rate=0.0),
        create_tower("text_rwkv_b32", width=w, depth=d, head_size=64, ffn_hidden=int(3.5 * w)),
        micro_batch_size=spec["micro"],
    ).train()
    images, tokens = torch.randn(B, 3, 224, 224), torch.randint(1, 49408, (B, 77))

    def step():
        model.zero_grad(set_to_none=True)
        if spec["micro"] < B:
            loss = model._cached_feature_loss(images, tokens)  # what training_step runs for micro_batch_size < B
        else:
            loss = model.contrastive_loss(*model(images, tokens))
        loss.backward()

    rss_before = _rss_kib("VmRSS")
    exact = _reset_peak()
    step()
    peak_mib = (_rss_kib("VmHWM") - rss_before) / 1024
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return dict(peak_mib=peak_mib, exact_peak=exact, time_s=statistics.median(times))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--micro", default="64,16,8", help="chunk sizes; the batch size itself means no chunks")
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        print(json.dumps(worker(json.loads(args._worker))))
        return 0

    print(f"one training step, batch {args.batch}, RWKV towers {args.width}x{args.depth}, {args.threads} threads")
    print(f"{'chunk':>6} | {'step s':>7} {'x whole':>7} | {'peak MiB':>9} {'x whole':>7}")
    base = None
    for micro in (int(m) for m in args.micro.split(",")):
        spec = dict(batch=args.batch, micro=micro, width=args.width, depth=args.depth, repeats=args.repeats,
                    threads=args.threads)
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(spec)],
                             capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if out.returncode != 0:
            print(f"{micro:>6} | error: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        base = base or (r if micro >= args.batch else None)
        rt = r["time_s"] / base["time_s"] if base else float("nan")
        rm = r["peak_mib"] / base["peak_mib"] if base else float("nan")
        label = "whole" if micro >= args.batch else str(micro)
        print(f"{label:>6} | {r['time_s']:>7.2f} {rt:>7.2f} | {r['peak_mib']:>9.0f} {rm:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
