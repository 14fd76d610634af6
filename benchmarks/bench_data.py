"""Is the streaming loader fast enough for the demo? Loader samples/s next to the demo model's training samples/s.

    python benchmarks/bench_data.py                       # configs/demo.yaml, num_workers 0 1 2
    python benchmarks/bench_data.py --config configs/demo.yaml --batches 30 --train-steps 20

The loader figure covers the whole per-sample path: read from LitData chunks, JPEG decode, RandomResizedCrop +
flip + normalise, text choice and tokenisation, collation. The model figure is one optimiser step of the demo's
CLIPModule (forward, loss, backward, AdamW) with batches already in memory, timed inside ``Trainer.fit``.
ratio = loader / model: above 1 the loader keeps up (with that many workers running beside training).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def loader_rate(dm, num_workers: int, batches: int) -> float:
    """Samples/s of train_dataloader() with ``num_workers``, after one warm-up batch (worker start-up)."""
    dm.num_workers = num_workers
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        try:
            images, _ = next(it)
        except StopIteration:
            it = iter(loader)
            images, _ = next(it)
        n += images.shape[0]
    return n / (time.perf_counter() - t0)


def train_rate(model, dm, steps: int) -> float:
    """Training samples/s of the model: step time only (data already in memory), via Trainer.fit."""
    import lightning as L

    images, tokens = next(iter(dm.train_dataloader()))
    # One real batch, replayed: batch_size=None hands each (images, tokens) tuple over as it is.
    batches = torch.utils.data.DataLoader([(images, tokens)] * (steps + 3), batch_size=None)

    class Timer(L.Callback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.times.append(time.perf_counter() - self.t0)

    timer = Timer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=len(batches), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer], gradient_clip_val=1.0)
    trainer.fit(model, train_dataloaders=batches)
    times = timer.times[3:]  # skip warm-up steps
    return images.shape[0] * len(times) / sum(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batches", type=int, default=30, help="timed loader batches per setting")
    p.add_argument("--train-steps", type=int, default=20, help="timed optimiser steps")
    args = p.parse_args()

    from rwkv_clip.cli import main as cli_main

    # Build model and data exactly as `python main.py fit --config ...` would, without running anything.
    cli = cli_main(args=["--config", args.config, "--trainer.logger=false"], run=False)
    model, dm = cli.model, cli.datamodule
    dm.prepare_data()
    dm.setup("fit")
    threads = torch.get_num_threads()
    print(f"config {args.config}: batch {dm.batch_size}, image {dm.image_size}px, context {dm.context_length}, "
          f"torch threads {threads}, {os.cpu_count()} CPUs")

    model_sps = train_rate(model, dm, args.train_steps)
    torch.set_num_threads(threads)
    print(f"\nmodel training: {model_sps:8.1f} samples/s  ({model_sps / dm.batch_size:.2f} steps/s)\n")
    print(f"{'num_workers':>11} | {'loader samples/s':>16} | {'loader / model':>14}")
    print("-" * 48)
    rates = {}
    for nw in args.workers:
        rates[nw] = loader_rate(dm, nw, args.batches)
        print(f"{nw:>11} | {rates[nw]:16.1f} | {rates[nw] / model_sps:14.2f}")
    nw = dm.hparams.get("num_workers", 1)
    configured = rates.get(nw)
    if configured is not None:
        verdict = "does NOT limit" if configured >= model_sps else "LIMITS"
        print(f"\nWith the config's num_workers={nw} the loader {verdict} the demo "
              f"(loader {configured:.0f} vs model {model_sps:.0f} samples/s).")
    print("Note: on a shared machine both figures drop; the worker processes compete with training for cores.")


if __name__ == "__main__":
    main()
