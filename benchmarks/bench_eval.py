"""Cost of the zero-shot benchmarks.

1. Zero-shot classification throughput of RWKV-CLIP-B/32 (configs/rwkv_clip_b32.yaml towers, random weights) on
   the CPU: images/s of a full ZeroShotClassification run (data loading + image tower + classifier build), and
   of the image tower alone. Data: the demo's test split, resized to 224 px.
2. The share of a demo training epoch (configs/demo.yaml, 1 epoch) spent in the benchmark callbacks; target < 20%.
3. Linear probe fit time on a few thousand 640-d features.

    python benchmarks/bench_eval.py                 # all three
    python benchmarks/bench_eval.py --skip-demo-epoch --images 64
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rwkv_clip.callbacks import (  # noqa: E402
    BenchmarkCallback,
    ZeroShotClassification,
    linear_probe,
    load_classification,
)


def build_b32():
    """RWKV-CLIP-B/32 with random weights: the towers of configs/rwkv_clip_b32.yaml, no projection."""
    from rwkv_clip.backbones import create_tower
    from rwkv_clip.module import CLIPModule

    return CLIPModule(create_tower("vision_rwkv_b32"), create_tower("text_rwkv_b32")).eval()


def bench_b32(args) -> None:
    import lightning as L

    from rwkv_clip.datamodules.demo import ensure_demo_data

    torch.manual_seed(0)
    root = ensure_demo_data(args.demo_root)
    model = build_b32()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, precision=args.precision,
                        enable_progress_bar=False, enable_model_summary=False)
    zs = ZeroShotClassification(
        datasets=[dict(name="demo", source="litdata", root="test", classnames="classnames.json",
                       templates="templates.json", max_samples=args.images, batch_size=args.batch_size)],
        root=root, tokenizer=os.path.join(root, "tokenizer.json"), image_size=224, log_images=False,
    )
    zs.setup(trainer, model, "validate")
    demo = load_classification(zs.datasets[0])
    n_cls, n_tpl = len(demo.classnames), len(demo.templates)
    x = torch.randn(args.batch_size, 3, 224, 224)
    with torch.no_grad(), trainer.precision_plugin.forward_context():
        model.encode_image(x[:2])  # warm-up
        t = time.perf_counter()
        model.encode_image(x)
        tower = args.batch_size / (time.perf_counter() - t)
    spent = {}
    from rwkv_clip.callbacks import base

    build = base.Env.classifier

    def timed_classifier(*a):
        t0 = time.perf_counter()
        out = build(*a)
        spent["classifier"] = time.perf_counter() - t0
        return out

    base.Env.classifier = timed_classifier
    t = time.perf_counter()
    zs.run(trainer, model, in_loop=False)
    total = time.perf_counter() - t
    images_only = total - spent["classifier"]
    print(f"B/32 zero-shot on CPU ({torch.get_num_threads()} threads, precision {args.precision}):")
    print(f"  image tower alone, batch {args.batch_size} at 224 px: {tower:.1f} images/s")
    print(f"  full ZeroShotClassification run: {args.images} images, {n_cls} classes x {n_tpl} templates "
          f"in {total:.1f} s = {args.images / total:.1f} images/s (classifier build included)")
    print(f"    of which classifier build ({n_cls * n_tpl} prompts, context 77): {spent['classifier']:.1f} s; "
          f"images (load + embed): {images_only:.1f} s = {args.images / images_only:.1f} images/s")


def bench_demo_epoch(args) -> None:
    from rwkv_clip.cli import main

    log_dir = tempfile.mkdtemp(prefix="bench_eval_")
    cli = main(args=["--config", args.demo_config, "--trainer.max_epochs=1",
                     f"--trainer.logger.init_args.save_dir={log_dir}", f"--trainer.default_root_dir={log_dir}",
                     "--trainer.enable_progress_bar=false"], run=False)
    eval_time = {}
    for cb in cli.trainer.callbacks:
        if isinstance(cb, BenchmarkCallback):
            orig = cb.run

            def timed(trainer, pl_module, in_loop=True, _orig=orig, _name=type(cb).__name__):
                t = time.perf_counter()
                out = _orig(trainer, pl_module, in_loop)
                eval_time[_name] = eval_time.get(_name, 0.0) + time.perf_counter() - t
                return out

            cb.run = timed
    if not eval_time and not any(isinstance(c, BenchmarkCallback) for c in cli.trainer.callbacks):
        raise SystemExit(f"{args.demo_config} has no benchmark callbacks under trainer.callbacks")

    class EpochTimer(__import__("lightning").Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.elapsed = time.perf_counter() - self.t0

    timer = EpochTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    spent = sum(eval_time.values())
    share = spent / timer.elapsed
    print(f"demo epoch ({args.demo_config}, {torch.get_num_threads()} threads): {timer.elapsed:.1f} s in all, "
          f"of which benchmark callbacks {spent:.1f} s = {100 * share:.1f}% "
          + "(" + ", ".join(f"{k} {v:.1f} s" for k, v in eval_time.items()) + ")")
    for cb in cli.trainer.callbacks:
        if isinstance(cb, BenchmarkCallback):
            print(f"  {type(cb).__name__}: " + ", ".join(f"{k}={v:.3f}" for k, v in cb.results.get("demo", {}).items()))
    print(f"  target < 20%: {'OK' if share < 0.2 else 'OVER'}")


def bench_linear_probe(args) -> None:
    torch.manual_seed(0)
    n, d, c = args.probe_samples, 640, 10
    centers = torch.randn(c, d)
    y = torch.randint(0, c, (2 * n,))
    x = torch.nn.functional.normalize(centers[y] + 2.0 * torch.randn(2 * n, d), dim=1)
    t = time.perf_counter()
    m = linear_probe(x[:n], y[:n], x[n:], y[n:], c)  # the default grid of 6 weight decays
    dt = time.perf_counter() - t
    print(f"linear probe: {n} train + {n} test features of {d} dims, {c} classes, 6 weight decays + refit: "
          f"{dt:.2f} s (top1 {m['top1']:.3f}, weight_decay {m['weight_decay']:g})")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=96, help="images for the B/32 zero-shot run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", default="32-true", help="trainer precision for the B/32 run, e.g. bf16-mixed")
    p.add_argument("--demo-root", default="data/demo")
    p.add_argument("--demo-config", default="configs/demo.yaml", help="config whose 1-epoch fit is timed")
    p.add_argument("--probe-samples", type=int, default=2500)
    p.add_argument("--skip-b32", action="store_true")
    p.add_argument("--skip-demo-epoch", action="store_true")
    p.add_argument("--skip-probe", action="store_true")
    a = p.parse_args()
    if not a.skip_probe:
        bench_linear_probe(a)
    if not a.skip_b32:
        bench_b32(a)
    if not a.skip_demo_epoch:
        bench_demo_epoch(a)
