"""What the benchmark callbacks share: when they run, what they embed with, and what they log, print and write.

When they run:
- ``fit``: at the end of every ``every_n_epochs``-th training epoch (after that epoch's validation), where
  ModelCheckpoint and EarlyStopping can monitor e.g. ``zeroshot/imagenet1k/top1``.
- ``validate`` / ``test``: at the end of the loop. With no val/test batches (``limit_val_batches: 0``, as in
  ``configs/eval/clip_benchmark.yaml``) Lightning runs no loop hooks, so they run in ``teardown``.

Images are preprocessed, and texts tokenised, by the first of: the callback's ``image_size`` / ``tokenizer``, the
datamodule's ``eval_transform`` / ``tokenizer``, the model's ``get_preprocess()`` / ``get_tokenizer()``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch

from rwkv_clip.callbacks.datasets import (
    CLASSIFICATION_SETS,
    RETRIEVAL_SETS,
    EvalDataset,
    as_config,
    headline_metric,
)
from rwkv_clip.callbacks.embed import Ranks, embed_images, embed_texts, zeroshot_classifier

COUNTS = ("num_samples", "num_texts", "skipped")  # go to the JSON's "extra", not to the loggers


@dataclass
class Env:
    """The model, preprocessing and ranks of one evaluation, as the plain functions of ``embed`` take them."""

    trainer: pl.Trainer
    pl_module: pl.LightningModule
    transform: Callable
    tokenizer: Optional[Callable]
    ranks: Ranks

    @property
    def device(self) -> torch.device:
        return self.pl_module.device

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        precision = self.trainer.precision_plugin
        with precision.forward_context():
            return self.pl_module.encode_image(precision.convert_input(images))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        with self.trainer.precision_plugin.forward_context():
            return self.pl_module.encode_text(tokens)

    def images(self, data: Any, indices: list[int], cfg: EvalDataset, labels: bool = True):
        return embed_images(self.encode_image, data, indices, self.transform, self.ranks, cfg.batch_size,
                            cfg.num_workers, self.device, labels, desc=cfg.name)

    def texts(self, texts: list[str], cfg: EvalDataset) -> torch.Tensor:
        return embed_texts(self.encode_text, self.tokenizer, texts, self.ranks, cfg.batch_size, self.device)

    def classifier(self, classnames: list[str], templates: list[str], class_batch_size: int) -> torch.Tensor:
        return zeroshot_classifier(self.encode_text, self.tokenizer, classnames, templates, self.ranks,
                                   class_batch_size, self.device)


class BenchmarkCallback(pl.Callback):
    task = ""  # CLIP_benchmark's task name
    prefix = ""  # of the logged metric names
    needs_text = True

    def __init__(
        self,
        datasets: list[EvalDataset],
        root: Optional[str] = None,
        every_n_epochs: int = 1,
        image_size: Optional[int] = None,
        tokenizer: Optional[str] = None,
        log_images: bool = True,
        output_dir: Optional[str] = None,
        prog_bar: bool = True,
    ):
        """
        Args:
            datasets: the evaluation sets (see ``rwkv_clip.callbacks.EvalDataset``).
            root: the directory that the sets' relative paths start from.
            every_n_epochs: during fit, run after every N-th training epoch.
            image_size: preprocess with CLIP's eval transform at this size (else the datamodule's or the model's).
            tokenizer: a tokenizer file, as ``rwkv_clip.tokenizer.Tokenizer.load`` reads it (else the datamodule's
                or the model's).
            log_images: add pictures (confusion matrix, top captions) to TensorBoard.
            output_dir: where validate / test write the result JSONs; default the run's ``log_dir``.
            prog_bar: show each set's headline metric in the progress bar.
        """
        super().__init__()
        if not datasets:
            raise ValueError(f"{type(self).__name__}: 'datasets' is empty; list at least one evaluation set")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.datasets = [as_config(d, root) for d in datasets]
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"{type(self).__name__}: dataset names must be unique, got {names}")
        for d in self.datasets:
            headline_metric(d, self.task)  # a bad metric name fails here, not after an epoch
        self.every_n_epochs, self.image_size, self.tokenizer = every_n_epochs, image_size, tokenizer
        self.log_images, self.output_dir, self.prog_bar = log_images, output_dir, prog_bar
        self.results: dict[str, dict[str, float]] = {}  # the last results, by set name
        self._sets: Optional[list[Any]] = None
        self._pending = False
        self._loaded_tokenizer = None

    # ---------------------------------------------------------------- what each benchmark does
    def load(self, cfg: EvalDataset) -> Any:
        """Read one set (at setup, so a missing file fails before training)."""
        raise NotImplementedError

    def evaluate(self, env: Env, cfg: EvalDataset, data: Any) -> dict[str, float]:
        raise NotImplementedError

    def json_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return metrics

    # ---------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._sets is None:
            self._sets = [self.load(cfg) for cfg in self.datasets]
        self._pending = stage in ("validate", "test")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.run(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":  # not fit's validation: fit runs at the training epoch's end
            self.run(trainer, pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._pending = False

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._pending:  # validate / test without batches: no loop hook ran
            pl_module.to(trainer.strategy.root_device)  # the strategy's teardown has moved it to the CPU
            try:
                self.run(trainer, pl_module, in_loop=False)
            finally:
                pl_module.cpu()

    # ---------------------------------------------------------------- running
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, in_loop: bool = True) -> dict:
        """Evaluate every set now and log the results; under validate / test also write JSONs and print."""
        self._pending = False
        ranks = Ranks(trainer.global_rank, trainer.world_size, trainer.strategy.all_gather)
        env = Env(trainer, pl_module, self._transform(trainer, pl_module),
                  self._tokenizer(trainer, pl_module) if self.needs_text else None, ranks)
        sets = self._sets
        if trainer.fast_dev_run:  # a smoke test: one batch of images per set
            sets = [_head(s, cfg.batch_size) for s, cfg in zip(sets, self.datasets)]
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                self.results = {cfg.name: self.evaluate(env, cfg, s) for cfg, s in zip(self.datasets, sets)}
        finally:
            pl_module.train(was_training)
        self._log(trainer, pl_module, in_loop)
        if trainer.state.fn in ("validate", "test"):
            out_dir = self.output_dir or trainer.log_dir or trainer.default_root_dir  # log_dir is a collective
            if trainer.global_rank == 0:
                self.write_json(trainer, pl_module, out_dir)
                benchmarks = [c for c in trainer.callbacks if isinstance(c, BenchmarkCallback)]
                if benchmarks[-1] is self:  # the last one prints the table of all of them
                    print(summary_table(benchmarks))
        return self.results

    def _transform(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Callable:
        if self.image_size:
            from rwkv_clip.datamodules.image_text import eval_transform

            return eval_transform(self.image_size)
        return self._from_run(trainer, pl_module, "eval_transform", "get_preprocess", "image preprocessing", "image_size")

    def _tokenizer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Callable:
        if self.tokenizer:
            if self._loaded_tokenizer is None:
                from rwkv_clip.tokenizer import Tokenizer

                self._loaded_tokenizer = Tokenizer.load(self.tokenizer)
            return self._loaded_tokenizer
        return self._from_run(trainer, pl_module, "tokenizer", "get_tokenizer", "tokenizer", "tokenizer")

    def _from_run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, datamodule_attr: str, model_getter: str,
                  what: str, setting: str) -> Any:
        """What the callback was not given: the datamodule's attribute, else the model's getter."""
        value = getattr(trainer.datamodule, datamodule_attr, None)
        if value is not None:
            return value
        if callable(getattr(pl_module, model_getter, None)):
            return getattr(pl_module, model_getter)()
        raise ValueError(f"{type(self).__name__}: no {what}: set the callback's {setting}, use a datamodule with "
                         f"a {datamodule_attr}, or a model with {model_getter}()")

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, in_loop: bool) -> None:
        flat, headlines = {}, set()
        for cfg in self.datasets:
            metrics = self.results.get(cfg.name, {})
            if metrics.get("skipped") and trainer.global_rank == 0:
                print(f"[{self.task}] {cfg.name}: skipped {metrics['skipped']} sample(s) that failed to load")
            flat.update({f"{self.prefix}/{cfg.name}/{k}": v for k, v in metrics.items() if k not in COUNTS})
            headlines.add(f"{self.prefix}/{cfg.name}/{headline_metric(cfg, self.task)}")
        if in_loop:  # every rank holds the same gathered numbers: no sync needed
            for name, value in flat.items():
                pl_module.log(name, value, prog_bar=self.prog_bar and name in headlines, batch_size=1)
        elif trainer.global_rank == 0:
            for logger in trainer.loggers:
                logger.log_metrics(flat, step=trainer.global_step)
                logger.save()

    def write_json(self, trainer: pl.Trainer, pl_module: pl.LightningModule, out_dir: str) -> list[str]:
        """One CLIP_benchmark result file per set: ``<out_dir>/<task>_<set>.json``."""
        os.makedirs(out_dir, exist_ok=True)
        towers = [type(getattr(pl_module, t)).__name__ for t in ("image_encoder", "text_encoder")
                  if hasattr(pl_module, t)]
        model = type(pl_module).__name__ + (f"({', '.join(towers)})" if towers else "")
        paths = []
        for name, metrics in self.results.items():
            record = {"dataset": name, "model": model, "pretrained": trainer.ckpt_path, "task": self.task,
                      "metrics": self.json_metrics({k: v for k, v in metrics.items() if k not in COUNTS}),
                      "language": "en", "extra": {k: v for k, v in metrics.items() if k in COUNTS}}
            paths.append(os.path.join(out_dir, f"{self.task}_{name}.json"))
            with open(paths[-1], "w") as f:
                json.dump(record, f, indent=2)
        print(f"[{self.task}] wrote {len(paths)} result file(s) to {out_dir}")
        return paths


def _head(s: Any, n: int) -> Any:
    return tuple(_head(x, n) for x in s) if isinstance(s, tuple) else replace(s, indices=s.indices[:n])


# ---------------------------------------------------------------- the summary table

_PAPER_ORDER = list(CLASSIFICATION_SETS) + list(RETRIEVAL_SETS)  # CIFAR-10 ... Aircraft, ImageNet; COCO, Flickr


def _rows_to_text(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def summary_table(callbacks: list[BenchmarkCallback]) -> str:
    """The paper's layout: one row of headline metrics per classification task (the sets, then their mean), and
    recall@K in both directions per retrieval set, in %."""
    title = lambda name: {**CLASSIFICATION_SETS, **RETRIEVAL_SETS}.get(name, (name,))[0]  # noqa: E731
    order = lambda cfg: _PAPER_ORDER.index(cfg.name) if cfg.name in _PAPER_ORDER else len(_PAPER_ORDER)  # noqa: E731
    blocks = []
    for cb in callbacks:
        cfgs = sorted((c for c in cb.datasets if c.name in cb.results), key=order)
        if not cfgs:
            continue
        if cb.task == "zeroshot_retrieval":
            ks = cb.recall_k
            rows = [["", *[f"I→T R@{k}" for k in ks], *[f"T→I R@{k}" for k in ks]]]
            for c in cfgs:
                m = cb.results[c.name]
                rows.append([title(c.name), *[f"{100 * m[f'{d}_retrieval_recall@{k}']:.2f}"
                                              for d in ("text", "image") for k in ks]])
            blocks.append(f"{cb.task} (%; I→T: image to text, T→I: text to image)\n{_rows_to_text(rows)}")
            continue
        heads = [headline_metric(c, "zeroshot_classification") for c in cfgs]
        values = [100 * cb.results[c.name][h] for c, h in zip(cfgs, heads)]
        mark = {"top1": "", "mean_per_class_recall": "*", "top5": " (top-5)"}
        header = ["", *[title(c.name) + mark[h] for c, h in zip(cfgs, heads)]]
        row = [cb.prefix, *[f"{v:.2f}" for v in values]]
        if len(cfgs) > 1:
            header.append(f"mean ({len(cfgs)})")
            row.append(f"{sum(values) / len(values):.2f}")
        blocks.append(f"{cb.task} (%; top-1, * mean per-class recall)\n{_rows_to_text([header, row])}")
    return "\n\n" + "\n\n".join(blocks) + "\n"
