"""What the three benchmark callbacks share: when to run, sharded embedding across ranks, logging and result files.

When they run (Lightning 2.6):
- fit: at the end of every ``every_n_epochs``-th epoch. If that epoch ends with a validation pass, inside
  ``on_validation_epoch_end`` (so ModelCheckpoint / EarlyStopping can monitor e.g. ``zeroshot/cifar10/top1``);
  otherwise (no val dataloader, or ``check_val_every_n_epoch`` skipped it) in ``on_train_epoch_end``.
- ``validate`` / ``test``: in ``on_validation_epoch_end`` / ``on_test_epoch_end``. If the datamodule has no
  val/test data Lightning skips the loop and every loop hook, so the run happens in ``teardown`` instead
  (the model is moved back to the strategy's device for it, metrics go straight to the loggers).
Standalone runs also print a table and write one CLIP_benchmark-style JSON per dataset and task.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Optional, Sequence

import lightning.pytorch as pl
import torch
from tqdm.auto import tqdm

from rwkv_clip.callbacks.datasets import EvalDataset, EvalImages, as_config, clip_eval_transform, collate_skip_none


class BenchmarkCallback(pl.Callback):
    task = ""  # CLIP_benchmark task name
    prefix = ""  # TensorBoard prefix

    def __init__(
        self,
        datasets: list[EvalDataset],
        every_n_epochs: int = 1,
        tokenizer: Optional[str] = None,
        image_size: Optional[int] = None,
        log_images: bool = True,
        output_dir: Optional[str] = None,
        prog_bar: bool = True,
    ):
        """
        Args:
            datasets: the evaluation sets (see ``EvalDataset``).
            every_n_epochs: during fit, run after every N-th epoch.
            tokenizer: tokenizer file for standalone use; default ``trainer.datamodule.tokenizer``.
            image_size: build a CLIP eval transform of this size; default ``trainer.datamodule.eval_transform``.
            log_images: add the pictures (retrieval grid, confusion matrix) to TensorBoard.
            output_dir: where validate/test write the result JSONs; default ``trainer.log_dir``.
            prog_bar: show each dataset's headline metric in the progress bar.
        """
        super().__init__()
        if not datasets:
            raise ValueError(f"{type(self).__name__}: 'datasets' is empty; list at least one evaluation set")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.datasets = [as_config(d) for d in datasets]
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"{type(self).__name__}: dataset names must be unique, got {names}")
        self.every_n_epochs = every_n_epochs
        self.tokenizer_path, self.image_size = tokenizer, image_size
        self.log_images, self.output_dir, self.prog_bar = log_images, output_dir, prog_bar
        self._sets: Optional[list[Any]] = None
        self._done_epoch = -1
        self._ran_stage = False
        self._tokenizer = None
        self.results: dict[str, dict[str, float]] = {}  # last results, by dataset name

    # ------------------------------------------------------------------ subclass API
    def build(self, cfg: EvalDataset) -> Any:
        """Read a dataset config into what ``evaluate`` needs (raises clear errors for missing files)."""
        raise NotImplementedError

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, dict[str, float]]:
        raise NotImplementedError

    def headline(self, cfg: EvalDataset) -> str:
        raise NotImplementedError

    def json_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return metrics

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._sets is None:  # read annotation files once, and fail at start-up rather than after an epoch
            self._sets = [self.build(cfg) for cfg in self.datasets]
        self._ran_stage = False

    def _due(self, trainer: pl.Trainer) -> bool:
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0 and self._done_epoch != trainer.current_epoch

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit":
            # Only the validation that closes the epoch (val_check_interval < 1 also validates mid-epoch).
            if not (self._due(trainer) and getattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch", True)):
                return
        self.run(trainer, pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due(trainer):
            self.run(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage in ("validate", "test") and not self._ran_stage and self._sets is not None:
            device = trainer.strategy.root_device
            pl_module.to(device)  # the strategy's teardown already moved it to the CPU
            try:
                self.run(trainer, pl_module, direct=True)
            finally:
                pl_module.cpu()

    # ------------------------------------------------------------------ running
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, direct: bool = False) -> dict:
        """Evaluate every dataset now, log, and (under validate/test) print a table and write JSONs."""
        self._ran_stage = True
        if trainer.state.fn == "fit":
            self._done_epoch = trainer.current_epoch
        was_training, sets = pl_module.training, self._sets
        if trainer.fast_dev_run:  # a smoke test: one batch of images per set (the classifier stays whole)
            self._sets = [_head(s) for s in sets]
        pl_module.eval()
        try:
            with torch.no_grad():
                self.results = self.evaluate(trainer, pl_module)
        finally:
            pl_module.train(was_training)
            self._sets = sets
        self._log(trainer, pl_module, direct)
        if trainer.state.fn in ("validate", "test"):
            out_dir = self.output_dir or trainer.log_dir or trainer.default_root_dir  # log_dir: a collective
            if trainer.global_rank == 0:
                print(self.table())
                self.write_json(trainer, pl_module, out_dir)
        return self.results

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, direct: bool) -> None:
        flat = {}
        for cfg in self.datasets:
            metrics = self.results.get(cfg.name, {})
            if metrics.get("skipped") and trainer.global_rank == 0:
                print(f"[{self.task}] {cfg.name}: skipped {int(metrics['skipped'])} sample(s) that failed to load")
            for k, v in metrics.items():
                if not (_is_ratio(k) or k == "weight_decay"):
                    continue  # counts go to the table / JSON, not to TensorBoard
                name = f"{self.prefix}/{cfg.name}/{k}"
                flat[name] = v
                if not direct:
                    # Every rank holds the same gathered numbers, so no sync is needed.
                    pl_module.log(name, v, prog_bar=self.prog_bar and k == self.headline(cfg), batch_size=1)
        if direct and trainer.global_rank == 0:
            for logger in trainer.loggers:
                logger.log_metrics(flat, step=trainer.global_step)

    def table(self) -> str:
        keys = list(dict.fromkeys(k for m in self.results.values() for k in m))  # metric order as computed
        keys = [k for k in keys if _is_ratio(k)] + [k for k in keys if not _is_ratio(k)]

        def fmt(m: dict, k: str) -> str:
            if k not in m:
                return "-"
            return f"{100 * m[k]:.2f}" if _is_ratio(k) else (f"{m[k]:g}" if k == "weight_decay" else str(int(m[k])))

        rows = [["dataset", *keys]] + [[name, *[fmt(m, k) for k in keys]] for name, m in self.results.items()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        return f"\n{self.task} (metrics in %)\n" + "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])

    def write_json(self, trainer: pl.Trainer, pl_module: pl.LightningModule, out_dir: str) -> list[str]:
        os.makedirs(out_dir, exist_ok=True)
        paths = []
        for name, metrics in self.results.items():
            record = {
                "dataset": name,
                "model": _model_name(pl_module),
                "pretrained": trainer.ckpt_path,
                "task": self.task,
                "metrics": self.json_metrics({k: v for k, v in metrics.items() if _is_ratio(k)}),
                "language": "en",
                "extra": {k: v for k, v in metrics.items() if not _is_ratio(k)},
            }
            path = os.path.join(out_dir, f"{self.task}_{name}.json")
            with open(path, "w") as f:
                json.dump(record, f, indent=2)
            paths.append(path)
        print(f"[{self.task}] wrote {len(paths)} result file(s) to {out_dir}")
        return paths

    # ------------------------------------------------------------------ shared pieces
    def transform(self, trainer: pl.Trainer) -> Callable:
        if self.image_size:
            return clip_eval_transform(self.image_size)
        t = getattr(trainer.datamodule, "eval_transform", None)
        if t is None:
            raise ValueError(
                f"{type(self).__name__}: no image transform: the datamodule has no 'eval_transform'; "
                "set the callback's image_size"
            )
        return t

    def tokenizer(self, trainer: pl.Trainer) -> Callable:
        if self.tokenizer_path:
            if self._tokenizer is None:
                from rwkv_clip.tokenizer import Tokenizer

                self._tokenizer = Tokenizer.load(self.tokenizer_path)
            return self._tokenizer
        tok = getattr(trainer.datamodule, "tokenizer", None)
        if tok is None:
            raise ValueError(
                f"{type(self).__name__}: no tokenizer: the datamodule has no 'tokenizer'; "
                "set the callback's tokenizer path"
            )
        return tok

    def embed_images(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, source, indices: Sequence[int], cfg: EvalDataset
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each rank embeds positions rank, rank+W, ... of ``indices``; all ranks get every embedding back.

        Returns (embeddings (n, D) float32, labels (n,), positions (n,) into ``indices``), sorted by position;
        samples that failed to load are missing (and counted in ``self.skipped``).
        """
        rank, world = trainer.global_rank, trainer.world_size
        mine = list(range(rank, len(indices), world))
        ds = EvalImages(source, [indices[p] for p in mine], self.transform(trainer))
        loader = torch.utils.data.DataLoader(
            ds, batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=collate_skip_none
        )
        device, precision, mine_t = pl_module.device, trainer.precision_plugin, torch.tensor(mine, dtype=torch.long)
        embs, labels, pos = [], [], []
        for batch in tqdm(loader, desc=f"{self.prefix} {cfg.name}", leave=False, disable=rank != 0):
            if batch is None:
                continue
            images, lab, j = batch
            with precision.forward_context():
                e = pl_module.encode_image(precision.convert_input(images.to(device)))
            embs.append(e.float())
            labels.append(lab)
            pos.append(mine_t[j])
        return gather_rows(trainer, len(indices), pos, embs, labels, device)

    def embed_texts(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, texts: Sequence[str], batch_size: int
    ) -> torch.Tensor:
        """(len(texts), D) float32 text embeddings; each rank embeds an interleaved share, then all gather."""
        rank, world = trainer.global_rank, trainer.world_size
        tok, precision, device = self.tokenizer(trainer), trainer.precision_plugin, pl_module.device
        mine = list(range(rank, len(texts), world))
        embs, pos = [], []
        for s in range(0, len(mine), batch_size):
            p = mine[s : s + batch_size]
            with precision.forward_context():
                embs.append(pl_module.encode_text(tok([texts[i] for i in p]).to(device)).float())
            pos.append(torch.tensor(p))
        emb, _, _ = gather_rows(trainer, len(texts), pos, embs, None, device)
        return emb

    def encode_text_fn(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Callable:
        precision = trainer.precision_plugin

        def encode(tokens: torch.Tensor) -> torch.Tensor:
            with precision.forward_context():
                return pl_module.encode_text(tokens).float()

        return encode


def gather_rows(
    trainer: pl.Trainer,
    total: int,
    pos: list[torch.Tensor],
    embs: list[torch.Tensor],
    labels: Optional[list[torch.Tensor]],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All-gather per-rank rows (padded to the same count, position -1 = padding) and sort them by position."""
    world = trainer.world_size
    p = torch.cat(pos).to(device) if pos else torch.zeros(0, dtype=torch.long, device=device)
    e = torch.cat(embs) if embs else torch.zeros(0, 0, device=device)
    lab = torch.cat(labels).to(device) if labels else torch.full((len(p),), -1, dtype=torch.long, device=device)
    if world > 1:
        rows = math.ceil(total / world)
        dim = int(trainer.strategy.all_gather(torch.tensor(e.shape[1], device=device)).max())
        pad_e = torch.zeros(rows, dim, device=device)
        pad_e[: len(p), : e.shape[1]] = e
        pad_p = torch.full((rows,), -1, dtype=torch.long, device=device)
        pad_p[: len(p)] = p
        pad_l = torch.full((rows,), -1, dtype=torch.long, device=device)
        pad_l[: len(p)] = lab
        e = trainer.strategy.all_gather(pad_e).reshape(-1, dim)
        p = trainer.strategy.all_gather(pad_p).reshape(-1)
        lab = trainer.strategy.all_gather(pad_l).reshape(-1)
        keep = p >= 0
        e, p, lab = e[keep], p[keep], lab[keep]
    order = torch.argsort(p)
    return e[order], lab[order], p[order]


def _is_ratio(metric: str) -> bool:
    return metric not in ("weight_decay", "num_samples", "num_texts", "skipped", "num_classes")


def _model_name(pl_module: pl.LightningModule) -> str:
    """e.g. ``CLIPModule(VisionRWKV, TextRWKV)``: CLIP_benchmark's "model" names the architecture."""
    towers = [type(getattr(pl_module, t)).__name__ for t in ("image_encoder", "text_encoder") if hasattr(pl_module, t)]
    return type(pl_module).__name__ + (f"({', '.join(towers)})" if towers else "")


def _head(s):
    return tuple(_head(x) for x in s) if isinstance(s, tuple) else s.head(max(s.cfg.batch_size, 2))
